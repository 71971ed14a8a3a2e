"""The client-side unmixing network: a small U-Net whose normalisations are AdaIN on lambda.

It receives the server's mixed segmentation ``y_m`` (probabilities), the reference's one-hot
segmentation ``y_r`` and the mixing weight ``lam`` and predicts the target's segmentation
(logits). Every normalisation is an adaptive instance norm whose scale and shift are
predicted from ``lam`` (Huang & Belongie 2017), so one network serves every weight.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mixpriv.constants import MIN_UNMIX_LAMBDA
from mixpriv.mixing.functional import naive_unmix


class AdaIN3d(nn.Module):
    """Instance norm whose affine parameters are a function of a scalar condition.

    Example:
        >>> norm = AdaIN3d(4)
        >>> norm(torch.randn(2, 4, 8, 8, 8), torch.tensor([0.7, 0.9])).shape
        torch.Size([2, 4, 8, 8, 8])
    """

    def __init__(self, channels: int, hidden: int = 32) -> None:
        super().__init__()
        self.norm = nn.InstanceNorm3d(channels, affine=False)
        self.to_scale_shift = nn.Sequential(nn.Linear(1, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 2 * channels))
        nn.init.zeros_(self.to_scale_shift[-1].weight)
        nn.init.zeros_(self.to_scale_shift[-1].bias)

    def forward(self, x: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        scale, shift = self.to_scale_shift(lam.reshape(-1, 1).to(x.dtype)).chunk(2, dim=1)
        shape = (x.shape[0], x.shape[1], 1, 1, 1)
        return self.norm(x) * (1 + scale.reshape(shape)) + shift.reshape(shape)


class AdaINBlock(nn.Module):
    """Two (conv 3x3x3 -> AdaIN(lam) -> LeakyReLU) layers."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, padding=1)
        self.norm1 = AdaIN3d(out_channels)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1)
        self.norm2 = AdaIN3d(out_channels)

    def forward(self, x: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        x = F.leaky_relu(self.norm1(self.conv1(x), lam), 0.01)
        return F.leaky_relu(self.norm2(self.conv2(x), lam), 0.01)


@dataclass(frozen=True)
class UnmixerSpec:
    """Serialisable description of the unmixer.

    ``channels=(8, 16)`` gives the paper's four convolutional blocks: two encoder blocks
    (full and half resolution), one decoder block and one refinement block.
    ``include_naive`` adds the naive unmixing (Eq. 4) of the inputs as extra input channels:
    a fixed function of (y_m, y_r, lam) that gives the network a head start.
    ``context_scale`` > 1 runs those four blocks on inputs average-pooled by that factor and adds
    their (upsampled) output to a per-voxel linear map of the full-resolution inputs
    (:class:`ContextAdaINUnmixer`); 1 runs them at full resolution (:class:`AdaINUnmixer`), which
    on a CPU costs about as much as the light segmenter.
    ``refine_channels`` > 0 (context unmixer only) adds a thin full-resolution correction: one
    3x3x3 convolution with that many channels on (logits, y_r), then a 1x1 back to the classes,
    added to the logits. It sees what the coarse path cannot: where the reference's boundaries cut
    through the mixture's.
    """

    channels: tuple[int, ...] = (8, 16)
    include_naive: bool = True
    context_scale: int = 1
    refine_channels: int = 0

    def __post_init__(self) -> None:
        if not self.channels or any(int(c) < 1 for c in self.channels):
            raise ValueError(f"unmixer channels must be positive, got {self.channels}")
        if int(self.context_scale) < 1:
            raise ValueError(f"unmixer context_scale must be at least 1, got {self.context_scale}")
        if int(self.refine_channels) < 0:
            raise ValueError(f"unmixer refine_channels must be 0 or more, got {self.refine_channels}")
        if self.refine_channels and self.context_scale < 2:
            raise ValueError("unmixer refine_channels needs context_scale >= 2 (the full-resolution unmixer "
                             "refines at full resolution already)")

    @classmethod
    def from_dict(cls, spec: Mapping) -> UnmixerSpec:
        values = dict(spec)
        if "channels" in values:
            values["channels"] = tuple(values["channels"])
        return cls(**values)

    def to_dict(self) -> dict:
        values = asdict(self)
        values["channels"] = list(self.channels)
        return values


class AdaINUnmixer(nn.Module):
    """U-Net unmixer ``U(y_m, y_r, lam) -> logits of y``.

    Args:
        num_classes: number of label channels C of ``y_m`` and ``y_r``.
        spec: channels per level and input options.

    Example:
        >>> net = AdaINUnmixer(4)
        >>> y_m = torch.softmax(torch.randn(2, 4, 16, 16, 16), 1); y_r = torch.softmax(torch.randn(2, 4, 16, 16, 16), 1)
        >>> net(y_m, y_r, torch.tensor([0.7, 0.8])).shape
        torch.Size([2, 4, 16, 16, 16])
    """

    def __init__(self, num_classes: int, spec: UnmixerSpec | Mapping | None = None) -> None:
        super().__init__()
        spec = spec if isinstance(spec, UnmixerSpec) else UnmixerSpec.from_dict(spec or {})
        self.spec = spec
        self.num_classes = num_classes
        self.in_channels = (3 if spec.include_naive else 2) * num_classes
        channels: Sequence[int] = spec.channels
        self.encoders = nn.ModuleList(
            AdaINBlock(c_in, c_out) for c_in, c_out in zip((self.in_channels, *channels[:-1]), channels)
        )
        self.decoders = nn.ModuleList(
            AdaINBlock(channels[i + 1] + channels[i], channels[i]) for i in reversed(range(len(channels) - 1))
        )
        self.refine = AdaINBlock(channels[0], channels[0])
        self.head = nn.Conv3d(channels[0], num_classes, 1)

    @property
    def size_divisor(self) -> int:
        """Spatial sizes must be divisible by this number."""
        return self.spec.context_scale * 2 ** (len(self.spec.channels) - 1)

    def _inputs(self, mixed_probs: torch.Tensor, reference_one_hot: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        inputs = [mixed_probs, reference_one_hot]
        if self.spec.include_naive:
            # Clamped so that a tiny lambda cannot blow the feature up (Eq. 4 divides by lambda).
            inputs.append(naive_unmix(mixed_probs, reference_one_hot, lam.clamp_min(MIN_UNMIX_LAMBDA)))
        return torch.cat(inputs, dim=1)

    def _unet(self, x: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """The four AdaIN blocks and the head: features (N, in, ...) -> logits (N, C, ...)."""
        skips = []
        for level, block in enumerate(self.encoders):
            if level > 0:
                x = F.max_pool3d(x, 2)
            x = block(x, lam)
            skips.append(x)
        for block, skip in zip(self.decoders, reversed(skips[:-1])):
            x = F.interpolate(x, size=skip.shape[2:], mode="trilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1), lam)
        return self.head(self.refine(x, lam))

    def forward(self, mixed_probs: torch.Tensor, reference_one_hot: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        lam = _per_sample(lam, mixed_probs)
        return self._unet(self._inputs(mixed_probs, reference_one_hot, lam), lam)


#: Initial gain of the naive channel in the context unmixer's per-voxel head (see ``_start_as_naive``).
NAIVE_GAIN = 5.0


class ContextAdaINUnmixer(AdaINUnmixer):
    """The unmixer with its U-Net at a coarser resolution: ``U = A(lam)·y_m + B(lam)·y_r + up(unet(pool(...)))``.

    The four AdaIN blocks see the inputs average-pooled by ``spec.context_scale`` (spatial
    context: which class a noisy region should be); a per-voxel linear map of the
    full-resolution inputs ``(y_m, y_r, naive)`` keeps the boundaries sharp. The naive
    channel is linear in ``(y_m, y_r)`` for a given lam, so the full-resolution map is folded
    into two per-sample C x C matrices. With ``spec.refine_channels`` a thin full-resolution
    convolution on (logits, y_r) corrects the sum, started at zero. On a 48³ patch it takes about
    a tenth of the light segmenter's multiply-adds (a quarter of its time on a 2-core CPU; the
    full-resolution unmixer takes more than the segmenter). Its stages are public so that an
    inference pipeline can run each at the resolution it needs, once per voxel of a whole volume:
    :meth:`coarse_features` (pooling), :meth:`coarse_logits` (per coarse patch: the instance norms),
    :meth:`upsample` and :meth:`finish` (voxel by voxel, and 3x3x3 neighbourhoods).

    Example:
        >>> net = ContextAdaINUnmixer(4, {"channels": [16, 32], "context_scale": 4})
        >>> y_m = torch.softmax(torch.randn(2, 4, 16, 16, 16), 1); y_r = torch.softmax(torch.randn(2, 4, 16, 16, 16), 1)
        >>> net(y_m, y_r, torch.tensor([0.7, 0.8])).shape
        torch.Size([2, 4, 16, 16, 16])
    """

    def __init__(self, num_classes: int, spec: UnmixerSpec | Mapping | None = None) -> None:
        super().__init__(num_classes, spec)
        if self.spec.context_scale < 2:
            raise ValueError(f"ContextAdaINUnmixer needs context_scale >= 2, got {self.spec.context_scale}")
        self.pointwise = nn.Conv3d(self.in_channels, num_classes, 1)
        self.refinement = (_Refinement(2 * num_classes, self.spec.refine_channels, num_classes)
                           if self.spec.refine_channels else None)
        self._start_as_naive()

    def _start_as_naive(self) -> None:
        """Initialise the network to the naive unmixing (Eq. 4), sharpened: logits = NAIVE_GAIN x naive.

        A per-voxel linear head needs large weights for confident logits, which Adam reaches only
        after thousands of steps; started here, training begins at the naive method's accuracy and
        learns corrections (the coarse U-Net's zeroed head adds nothing until it has learned some).
        """
        with torch.no_grad():
            self.pointwise.weight.zero_()
            self.pointwise.bias.zero_()
            if self.spec.include_naive:
                c = self.num_classes
                self.pointwise.weight[:, 2 * c:, 0, 0, 0] = NAIVE_GAIN * torch.eye(c)
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def _pointwise_matrices(self, lam: torch.Tensor) -> torch.Tensor:
        """The 1x1 layer on (y_m, y_r, naive) folded into one (N, C, 2C) matrix on (y_m, y_r) per sample.

        naive = (y_m - (1 - lam) y_r) / lam is linear in (y_m, y_r) for a given lam.
        """
        c = self.num_classes
        weight = self.pointwise.weight.reshape(c, -1, c)  # (out, input group, in)
        on_mixed, on_reference = weight[:, 0], weight[:, 1]
        if self.spec.include_naive:
            lam = lam.clamp_min(MIN_UNMIX_LAMBDA).reshape(-1, 1, 1)  # as in the naive input channels
            on_mixed = on_mixed + weight[:, 2] / lam
            on_reference = on_reference - weight[:, 2] * ((1 - lam) / lam)
        else:
            on_mixed, on_reference = on_mixed.expand(lam.shape[0], c, c), on_reference.expand(lam.shape[0], c, c)
        return torch.cat([on_mixed, on_reference], dim=2)

    def coarse_features(self, mixed_probs: torch.Tensor, reference_one_hot: torch.Tensor,
                        lam: torch.Tensor) -> torch.Tensor:
        """The coarse U-Net's inputs (N, in, ...): the inputs average-pooled by ``context_scale``.

        Works on a patch or a whole volume; a side that is not a multiple of the scale is first
        padded by repeating its last voxels (:meth:`upsample` crops that off again).
        """
        lam = _per_sample(lam, mixed_probs)
        scale = self.spec.context_scale
        missing = [-side % scale for side in mixed_probs.shape[2:]]
        if any(missing):
            padding = [p for side in reversed(missing) for p in (0, side)]
            mixed_probs = F.pad(mixed_probs, padding, mode="replicate")
            reference_one_hot = F.pad(reference_one_hot, padding, mode="replicate")
        return self._inputs(F.avg_pool3d(mixed_probs, scale), F.avg_pool3d(reference_one_hot, scale), lam)

    def coarse_logits(self, features: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """The coarse U-Net's logits (plus the head's bias) on :meth:`coarse_features` of one patch (N, C, ...).

        The one part that needs a patch's field of view (its instance norms): an inference pipeline
        runs it over a grid of coarse patches of the training patch's size, the rest voxel by voxel.
        """
        return self._unet(features, _per_sample(lam, features)) + self.pointwise.bias.reshape(1, -1, 1, 1, 1)

    def upsample(self, coarse: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """Coarse logits (N, C, ...) trilinearly upsampled to the full-resolution ``size`` (padding cropped)."""
        scale = self.spec.context_scale
        padded = [side + (-side % scale) for side in size]
        context = F.interpolate(coarse, size=padded, mode="trilinear", align_corners=False)
        return context[..., :size[0], :size[1], :size[2]]

    def context(self, mixed_probs: torch.Tensor, reference_one_hot: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """The coarse U-Net's logits (plus the head's bias) on one patch, upsampled to its size (N, C, ...)."""
        features = self.coarse_features(mixed_probs, reference_one_hot, lam)
        return self.upsample(self.coarse_logits(features, lam), mixed_probs.shape[2:])

    def finish(self, mixed_probs: torch.Tensor, reference_one_hot: torch.Tensor, lam: torch.Tensor,
               context: torch.Tensor) -> torch.Tensor:
        """Logits (N, C, ...), channels-last in memory, from the inputs and their :meth:`context`.

        Per voxel (the folded head) and per 3x3x3 neighbourhood (the refinement): it runs on a
        patch or on a whole volume whose context was stitched from patches alike. The work runs
        channels-last, where a voxel's channels are contiguous: the folded 1x1 layer is one batched
        matrix product that adds the context in place (``baddbmm``), and the refinement reads
        ``[logits | y_r]`` from one buffer.
        """
        lam = _per_sample(lam, mixed_probs)
        n, c, *spatial = mixed_probs.shape
        inputs = _channels_last_buffer(mixed_probs, reference_one_hot.to(mixed_probs.dtype))
        logits = torch.baddbmm(_voxels(context), _voxels(inputs), self._pointwise_matrices(lam).transpose(1, 2))
        if self.refinement is not None:
            logits = self.refinement(logits, inputs[:, c:], spatial)
        return logits.reshape(n, *spatial, c).permute(0, 4, 1, 2, 3)

    def forward(self, mixed_probs: torch.Tensor, reference_one_hot: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """Logits (N, C, ...): :meth:`finish` of the :meth:`context` of the same inputs."""
        return self.finish(mixed_probs, reference_one_hot, lam, self.context(mixed_probs, reference_one_hot, lam))


class _Refinement(nn.Module):
    """conv 3x3x3 on [logits | y_r] -> LeakyReLU -> per-voxel linear map, added to the logits.

    The last map starts at zero: a correction that starts at nothing. Channels-last throughout:
    on a CPU, PyTorch's channels-first Conv3d is 2-3x slower for these few channels, a 1x1 Conv3d
    10x slower than the matrix product, and an out-of-place LeakyReLU on a channels-last tensor
    6x slower than in place.
    """

    def __init__(self, in_channels: int, channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, channels, 3, padding=1)
        self.weight = nn.Parameter(torch.zeros(out_channels, channels))
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def forward(self, logits: torch.Tensor, reference: torch.Tensor, spatial: Sequence[int]) -> torch.Tensor:
        """Refined logits (N, V, C) from logits (N, V, C) and the reference (N, C, ...)."""
        n, _, c = logits.shape
        inputs = _channels_last_buffer(logits.reshape(n, *spatial, c).permute(0, 4, 1, 2, 3), reference)
        hidden = F.leaky_relu(self.conv(inputs), 0.01, inplace=True)
        return torch.baddbmm(logits + self.bias, _voxels(hidden), self.weight.t().expand(n, -1, -1))


def _channels_last_buffer(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """``torch.cat([first, second], 1)`` written straight into channels-last memory."""
    buffer = torch.empty((first.shape[0], first.shape[1] + second.shape[1], *first.shape[2:]), dtype=first.dtype,
                         device=first.device, memory_format=torch.channels_last_3d)
    buffer[:, :first.shape[1]] = first
    buffer[:, first.shape[1]:] = second
    return buffer


def _voxels(volume: torch.Tensor) -> torch.Tensor:
    """(N, C, ...) -> (N, V, C), a view when ``volume`` is channels-last."""
    return volume.movedim(1, -1).reshape(volume.shape[0], -1, volume.shape[1])


def _per_sample(lam: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """lam as a (N,) tensor on ``like``'s device and dtype (a scalar is shared by the batch)."""
    lam = torch.as_tensor(lam, dtype=like.dtype, device=like.device).reshape(-1)
    return lam.expand(like.shape[0]) if lam.numel() == 1 and like.shape[0] > 1 else lam


def build_unmixer(num_classes: int, spec: UnmixerSpec | Mapping | None = None) -> AdaINUnmixer:
    """The unmixer a spec describes: full resolution, or a coarse U-Net with a per-voxel head.

    Example:
        >>> type(build_unmixer(4, {"context_scale": 4})).__name__, type(build_unmixer(4)).__name__
        ('ContextAdaINUnmixer', 'AdaINUnmixer')
    """
    spec = spec if isinstance(spec, UnmixerSpec) else UnmixerSpec.from_dict(spec or {})
    return (ContextAdaINUnmixer if spec.context_scale > 1 else AdaINUnmixer)(num_classes, spec)
