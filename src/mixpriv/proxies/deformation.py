"""Key-dependent, reversible non-linear deformations: the client's transform of Deformation-Proxy.

A :class:`DeformationKey` is the client's secret: a seed and the size and smoothness of the
deformation it draws. The seed draws Gaussian noise at a coarse control grid; trilinear
upsampling and a Gaussian blur make it a smooth stationary velocity field ``v`` whose peak is
``magnitude`` voxels. Scaling and squaring integrates ``v`` into the displacement of the
diffeomorphism ``exp(v)`` and ``-v`` into that of its inverse ``exp(-v)``, so the inverse is exact
up to the interpolation of the integration (no second network and no cycle loss are needed).

Conventions, used by every function here:

* a displacement field ``u`` is (N, 3, D, H, W), in voxels, its channels ordered like the axes
  (D, H, W);
* :func:`warp` pulls back: ``warp(image, u)(x) = image(x + u(x))``, so
  ``warp(warp(image, forward), inverse)`` returns ``image``;
* sampling is :func:`torch.nn.functional.grid_sample` with ``align_corners=True`` (voxel ``i`` of
  an axis of ``n`` sits at ``-1 + 2 i / (n - 1)``, so voxel units are exact) and border padding.

Example:
    >>> key = DeformationKey(seed=7, magnitude=3.0)
    >>> forward, inverse = key_fields([key], (16, 16, 16))
    >>> image = torch.linspace(0, 1, 16).expand(1, 1, 16, 16, 16)
    >>> restored = warp(warp(image, forward), inverse)
    >>> bool((restored - image)[..., 4:-4, 4:-4, 4:-4].abs().max() < 0.01)
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# The displacement of one scaling-and-squaring step must keep |grad u| well below 1 (its
# Frobenius norm bounds the operator norm; below 1, I + grad u cannot fold). Each of the key's
# velocity and a learned correction may use half of that budget.
FOLD_BUDGET = 0.5


@dataclass(frozen=True)
class DeformationKey:
    """The secret that draws one deformation (a plain, JSON-serialisable record).

    Args:
        seed: the secret seed (a non-negative integer).
        magnitude: peak of the velocity field, in voxels (the displacement's peak is close to it).
        control_spacing: distance between the random control points, in voxels (the deformation's
            wavelength: larger is smoother).
        smoothing: sigma (voxels) of the Gaussian blur applied after upsampling (0: none).
        steps: scaling-and-squaring steps (the velocity is divided by ``2 ** steps``).

    Raises:
        ValueError: an out-of-range parameter; :meth:`velocity` also refuses a key whose magnitude
            would fold the field on the given grid.

    Example:
        >>> key = DeformationKey(seed=1, magnitude=2.0)
        >>> v = key.velocity((12, 12, 12))
        >>> v.shape, round(float(v.abs().max()), 4), bool(torch.equal(v, key.velocity((12, 12, 12))))
        (torch.Size([3, 12, 12, 12]), 2.0, True)
    """

    seed: int
    magnitude: float = 4.0
    control_spacing: float = 12.0
    smoothing: float = 3.0
    steps: int = 6

    def __post_init__(self) -> None:
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"a deformation key's seed must be a non-negative integer, got {self.seed!r}")
        if not (math.isfinite(self.magnitude) and self.magnitude >= 0):
            raise ValueError(f"a deformation key's magnitude must be a finite number of voxels >= 0, "
                             f"got {self.magnitude!r}")
        if not self.control_spacing >= 1:
            raise ValueError(f"control_spacing must be at least 1 voxel, got {self.control_spacing!r}")
        if not self.smoothing >= 0:
            raise ValueError(f"smoothing must be a sigma >= 0 voxels, got {self.smoothing!r}")
        if not isinstance(self.steps, int) or not 0 <= self.steps <= 16:
            raise ValueError(f"steps must be an integer in [0, 16], got {self.steps!r}")

    @classmethod
    def from_mm(cls, seed: int, magnitude_mm: float, spacing: float | Sequence[float], **kwargs) -> DeformationKey:
        """A key whose peak velocity is ``magnitude_mm`` on a grid of isotropic ``spacing`` (mm).

        Example:
            >>> DeformationKey.from_mm(3, 8.0, [2.0, 2.0, 2.0]).magnitude
            4.0
        """
        values = [float(spacing)] if isinstance(spacing, (int, float)) else [float(s) for s in spacing]
        if not values or min(values) <= 0 or max(values) != min(values):
            raise ValueError(f"from_mm needs one positive isotropic spacing, got {spacing!r}")
        return cls(seed, magnitude=magnitude_mm / values[0], **kwargs)

    def velocity(self, shape: Sequence[int], device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The key's stationary velocity field (3, D, H, W) in voxels on a grid of ``shape``.

        Drawn on the CPU from the seed alone (the same key gives the same field on any device),
        then moved to ``device``.
        """
        shape = tuple(int(n) for n in shape)
        if len(shape) != 3 or min(shape) < 2:
            raise ValueError(f"a deformation needs a 3D grid of at least 2 voxels per axis, got {shape}")
        points = [max(2, math.ceil((n - 1) / self.control_spacing) + 1) for n in shape]
        noise = torch.randn((1, 3, *points), generator=torch.Generator().manual_seed(self.seed))
        dense = gaussian_smooth(F.interpolate(noise, size=shape, mode="trilinear", align_corners=True),
                                self.smoothing)
        peak = dense.abs().amax()
        velocity = dense * (self.magnitude / peak) if peak > 0 else torch.zeros_like(dense)
        step = 3 * max_gradient(velocity) / 2 ** self.steps
        if step >= FOLD_BUDGET:
            raise ValueError(
                f"deformation key magnitude {self.magnitude:g} voxels would fold the field: with control_spacing "
                f"{self.control_spacing:g}, smoothing {self.smoothing:g} and {self.steps} scaling-and-squaring "
                f"steps one step moves {step:.2f} (must stay below {FOLD_BUDGET}); raise steps or the spacing, "
                "or lower the magnitude")
        return velocity[0].to(device=device, dtype=dtype)


def gaussian_smooth(volume: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur (sigma in voxels, edges replicated) of a (N, C, D, H, W) tensor.

    Example:
        >>> impulse = torch.zeros(1, 1, 9, 9, 9); impulse[..., 4, 4, 4] = 1
        >>> round(float(gaussian_smooth(impulse, 1.0).sum()), 4)
        1.0
    """
    if sigma <= 0:
        return volume
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, device=volume.device, dtype=volume.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = volume.shape[1]
    for axis in range(3):
        view = [1, 1, 1]
        view[axis] = kernel.numel()
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        weight = kernel.view(1, 1, *view).expand(channels, 1, *view)
        volume = F.conv3d(F.pad(volume, pad, mode="replicate"), weight, groups=channels)
    return volume


def max_gradient(displacement: torch.Tensor) -> torch.Tensor:
    """The largest forward difference of any component of a (N, 3, D, H, W) field along any axis."""
    return torch.stack([displacement.diff(dim=dim).abs().amax() for dim in (-3, -2, -1)]).amax()


def _sampling_grid(displacement: torch.Tensor) -> torch.Tensor:
    """grid_sample's (N, D, H, W, 3) grid (x, y, z order, align_corners=True) for ``x + u(x)``."""
    if displacement.ndim != 5 or displacement.shape[1] != 3:
        raise ValueError(f"a displacement field must be (N, 3, D, H, W), got shape {tuple(displacement.shape)}")
    sizes = displacement.shape[2:]
    axes = [torch.arange(n, device=displacement.device, dtype=displacement.dtype) for n in sizes]
    identity = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    scale = torch.tensor([2.0 / (n - 1) for n in sizes], device=displacement.device, dtype=displacement.dtype)
    normalised = (identity + displacement) * scale.view(1, 3, 1, 1, 1) - 1
    return normalised.flip(1).movedim(1, -1)


def warp(image: torch.Tensor, displacement: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Resample (N, C, D, H, W) ``image`` at ``x + u(x)`` (trilinear for ``"bilinear"``).

    Integer images (label maps) may only be warped with ``mode="nearest"`` and keep their dtype. A
    field of batch size 1 is applied to every image.

    Example:
        >>> image = torch.arange(4.0).view(1, 1, 1, 1, 4).expand(1, 1, 2, 2, 4)
        >>> shift = torch.zeros(1, 3, 2, 2, 4); shift[:, 2] = 1.0   # sample one voxel further along W
        >>> warp(image, shift)[0, 0, 0, 0].tolist()
        [1.0, 2.0, 3.0, 3.0]
    """
    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"warp mode must be 'bilinear' or 'nearest', got {mode!r}")
    if image.ndim != 5 or image.shape[2:] != displacement.shape[2:]:
        raise ValueError(f"image {tuple(image.shape)} and displacement {tuple(displacement.shape)} must be "
                         "(N, C, D, H, W) and (N, 3, D, H, W) on one grid")
    if displacement.shape[0] == 1 and image.shape[0] > 1:
        displacement = displacement.expand(image.shape[0], -1, -1, -1, -1)
    if displacement.shape[0] != image.shape[0]:
        raise ValueError(f"{image.shape[0]} images but {displacement.shape[0]} displacement fields")
    integer = not image.is_floating_point()
    if integer and mode != "nearest":
        raise ValueError(f"an integer image ({image.dtype}, a label map?) can only be warped with mode='nearest'")
    source = image.to(displacement.dtype) if integer or image.dtype != displacement.dtype else image
    warped = F.grid_sample(source, _sampling_grid(displacement), mode=mode, padding_mode="border",
                           align_corners=True)
    return warped.round().to(image.dtype) if integer else warped


def warp_probabilities(probabilities: torch.Tensor, displacement: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Warp class probabilities (N, C, D, H, W) trilinearly and renormalise them to sum to 1."""
    warped = warp(probabilities, displacement).clamp_min(0)
    return warped / warped.sum(1, keepdim=True).clamp_min(eps)


def integrate_velocity(velocity: torch.Tensor, steps: int) -> torch.Tensor:
    """Displacement (N, 3, D, H, W) of ``exp(v)`` by scaling and squaring: ``u <- u + u o (id + u)``."""
    displacement = velocity / 2 ** steps
    for _ in range(steps):
        displacement = displacement + warp(displacement, displacement)
    return displacement


def key_fields(keys: Sequence[DeformationKey], shape: Sequence[int],
               device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and inverse displacements (N, 3, D, H, W) of one key per sample, on ``device``.

    All keys must use the same number of steps (one batch is integrated at once).
    """
    velocity = key_velocities(keys, shape, device)
    steps = keys[0].steps
    return integrate_velocity(velocity, steps), integrate_velocity(-velocity, steps)


def key_velocities(keys: Sequence[DeformationKey], shape: Sequence[int],
                   device: torch.device | str | None = None) -> torch.Tensor:
    """The keys' velocity fields stacked to (N, 3, D, H, W)."""
    if not keys:
        raise ValueError("no deformation keys given")
    if len({key.steps for key in keys}) != 1:
        raise ValueError(f"keys of one batch must share their steps, got {sorted({key.steps for key in keys})}")
    return torch.stack([key.velocity(shape, device) for key in keys])


def jacobian_determinant(displacement: torch.Tensor) -> torch.Tensor:
    """Determinant (N, D, H, W) of the Jacobian of ``x + u(x)`` by central differences (> 0: no folding).

    Example:
        >>> float(jacobian_determinant(torch.zeros(1, 3, 4, 4, 4)).min())
        1.0
    """
    if displacement.ndim != 5 or displacement.shape[1] != 3:
        raise ValueError(f"a displacement field must be (N, 3, D, H, W), got shape {tuple(displacement.shape)}")
    gradients = torch.stack(torch.gradient(displacement, dim=(2, 3, 4)), dim=2)  # (N, 3 comps, 3 axes, ...)
    jacobian = gradients.movedim((1, 2), (-2, -1)) + torch.eye(3, device=displacement.device,
                                                               dtype=displacement.dtype)
    return torch.linalg.det(jacobian)
