"""Deformation-Proxy's flow-field generator: the key's random velocity, corrected by a small network.

Kim et al. train a flow-field generator adversarially, so that a Siamese discriminator cannot tell
whether two deformed images show one patient. Here the generator's basis is the analytic
:class:`~mixpriv.proxies.deformation.DeformationKey` velocity (a smooth random field drawn from the
secret seed); a small 3D convolutional network sees that velocity (and, by default, the image) and
adds a bounded, smooth correction. The sum stays a stationary velocity field, integrated by scaling
and squaring in both directions, so the learned deformation keeps an exact inverse and cannot fold.
The network's last layer starts at zero: before training, the generator is the analytic one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from mixpriv.proxies.deformation import (
    FOLD_BUDGET,
    DeformationKey,
    gaussian_smooth,
    integrate_velocity,
    key_velocities,
)


@dataclass(frozen=True)
class DeformationSpec:
    """How the client deforms: the keys' parameters and the learned correction (a plain dict in hparams).

    Args:
        magnitude, control_spacing, smoothing, steps: those of every :class:`DeformationKey` (voxels).
        learned: add the network's correction (False: the analytic key field alone).
        channels: widths of the network's stride-2 stages (its depth is their number).
        residual_magnitude: bound (voxels) on the correction's velocity.
        condition_on_image: the network also sees the image (else only the key's velocity).

    Example:
        >>> spec = DeformationSpec.from_dict({"magnitude": 3.0, "channels": [4]})
        >>> spec.key(5).magnitude, DeformationSpec.from_dict(spec.to_dict()) == spec
        (3.0, True)
    """

    magnitude: float = 4.0
    control_spacing: float = 12.0
    smoothing: float = 3.0
    steps: int = 6
    learned: bool = True
    channels: tuple[int, ...] = (8, 16)
    residual_magnitude: float = 2.0
    condition_on_image: bool = True

    @classmethod
    def from_dict(cls, spec: Mapping | None) -> DeformationSpec:
        spec = dict(spec or {})
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise ValueError(f"deformation spec has unknown keys {unknown}; it takes {sorted(known)}")
        if "channels" in spec:
            spec["channels"] = tuple(int(width) for width in spec["channels"])
        return cls(**spec)

    def to_dict(self) -> dict:
        return {**asdict(self), "channels": list(self.channels)}

    def key(self, seed: int) -> DeformationKey:
        """The key of ``seed`` with this spec's parameters."""
        return DeformationKey(seed, magnitude=self.magnitude, control_spacing=self.control_spacing,
                              smoothing=self.smoothing, steps=self.steps)


class FlowFieldGenerator(nn.Module):
    """Velocity, forward and inverse displacement of images (N, 1, D, H, W) under one key each.

    Example:
        >>> generator = FlowFieldGenerator(DeformationSpec(channels=(4,)))
        >>> image = torch.rand(2, 1, 16, 16, 16)
        >>> forward, inverse = generator(image, [DeformationSpec().key(0), DeformationSpec().key(1)])
        >>> forward.shape, inverse.shape
        (torch.Size([2, 3, 16, 16, 16]), torch.Size([2, 3, 16, 16, 16]))
    """

    def __init__(self, spec: DeformationSpec) -> None:
        super().__init__()
        self.spec = spec
        spec.key(0)  # validates the key parameters now, not at the first batch
        self.net: nn.Module | None = None
        if not spec.learned:
            return
        if not spec.channels or min(spec.channels) < 1:
            raise ValueError(f"a learned deformation needs at least one positive channel width, got {spec.channels}")
        if not spec.residual_magnitude >= 0:
            raise ValueError(f"residual_magnitude must be >= 0 voxels, got {spec.residual_magnitude!r}")
        self._check_residual_cannot_fold()
        layers, previous = [], 3 + int(spec.condition_on_image)
        for width in spec.channels:
            layers += [nn.Conv3d(previous, width, 3, stride=2, padding=1),
                       nn.InstanceNorm3d(width, affine=True), nn.LeakyReLU(0.2, inplace=True)]
            previous = width
        head = nn.Conv3d(previous, 3, 3, padding=1)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        self.net = nn.Sequential(*layers, head)

    def _check_residual_cannot_fold(self) -> None:
        """Refuse a correction bound that could fold: bound its gradient through upsampling and blur."""
        spec = self.spec
        per_axis = spec.residual_magnitude * 2 / 2 ** len(spec.channels)
        if spec.smoothing > 0:
            per_axis = min(per_axis, spec.residual_magnitude * math.sqrt(2 / math.pi) / spec.smoothing)
        step = 3 * per_axis / 2 ** spec.steps
        if step >= FOLD_BUDGET:
            raise ValueError(f"residual_magnitude {spec.residual_magnitude:g} voxels could fold the field (one "
                             f"scaling-and-squaring step could move {step:.2f}, must stay below {FOLD_BUDGET}); "
                             "lower it, or raise smoothing or steps")

    def velocity(self, image: torch.Tensor, keys: Sequence[DeformationKey]) -> torch.Tensor:
        """Stationary velocity (N, 3, D, H, W) in voxels: the keys' fields plus the learned correction."""
        if image.ndim != 5 or image.shape[0] != len(keys):
            raise ValueError(f"expected images (N, C, D, H, W) and one key per image, got {tuple(image.shape)} "
                             f"and {len(keys)} keys")
        shape = image.shape[2:]
        base = key_velocities(keys, shape, image.device)
        if self.net is None:
            return base
        inputs = base / max(self.spec.magnitude, 1e-6)
        if self.spec.condition_on_image:
            inputs = torch.cat([inputs, image.float()], 1)
        coarse = torch.tanh(self.net(inputs)) * self.spec.residual_magnitude
        residual = F.interpolate(coarse, size=tuple(shape), mode="trilinear", align_corners=True)
        return base + gaussian_smooth(residual, self.spec.smoothing)

    def forward(self, image: torch.Tensor, keys: Sequence[DeformationKey]) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and inverse displacements (N, 3, D, H, W): ``exp(v)`` and ``exp(-v)``."""
        velocity = self.velocity(image, keys)
        return integrate_velocity(velocity, self.spec.steps), integrate_velocity(-velocity, self.spec.steps)
