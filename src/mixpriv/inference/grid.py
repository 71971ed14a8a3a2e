"""Whole-volume inference over an overlapping patch grid, on preallocated accumulators.

As nnU-Net's predictor does, patches are sliced straight from the input tensors, the outputs are
weighted by one spatial window and added into one preallocated accumulator on the device the
model runs on, and the sum of the windows divides once at the end. As with MONAI's inferers the
grid is kept apart from the model: ``fn`` is any callable from a dict of patch batches to an
output batch, so a segmenter, an unmixer or the fused private pipeline plug in.

The grid uses as few patches as cover each side with at least ``overlap`` voxels shared by
neighbours, spread evenly (TorchIO's grid steps by ``patch - overlap`` and packs the slack
into the last patch): on the 88 x 104 x 88 cohort with 48³ patches and the default overlap
of 12 voxels, 3 x 3 x 3 = 27 patches, as TorchIO's grid.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mixpriv.validation import InputError

PatchFunction = Callable[[dict[str, torch.Tensor]], torch.Tensor]
OVERLAP_MODES = ("hann", "average")


def default_overlap(patch_size: int) -> int:
    """The least overlap of neighbouring patches: a quarter of a patch (12 voxels of a 48³ patch).

    Every voxel is predicted by a patch that sees at least ``overlap / 2`` voxels of context
    beyond it wherever a neighbour exists, and the Hann window gives a patch's border voxels
    almost no weight where patches do overlap. An eighth of a patch (12 instead of 27 patches
    on the cohort volume) cost 0.004 mean Dice, baseline and private alike
    (``benchmarks/private_inference.py --compare``).
    """
    return patch_size // 4


def grid_starts(size: int, patch_size: int, overlap: int) -> list[int]:
    """Start indices of the fewest patches that cover ``size`` voxels sharing at least ``overlap``.

    Example:
        >>> grid_starts(88, 48, 6), grid_starts(104, 48, 6), grid_starts(30, 48, 6)
        ([0, 40], [0, 28, 56], [0])
    """
    if not 0 <= overlap < patch_size:
        raise InputError(f"the patch overlap must lie in [0, {patch_size}), got {overlap}")
    if size <= patch_size:
        return [0]
    count = math.ceil((size - overlap) / (patch_size - overlap))
    return [round(i * (size - patch_size) / (count - 1)) for i in range(count)]


def patch_window(patch_size: int, mode: str = "hann", device: torch.device | str = "cpu") -> torch.Tensor:
    """The (p, p, p) weight of a patch's voxels: TorchIO's Hann window, or ones (``average``)."""
    if mode not in OVERLAP_MODES:
        raise InputError(f"unknown overlap mode {mode!r}; choose one of {OVERLAP_MODES}")
    if mode == "average":
        return torch.ones(patch_size, patch_size, patch_size, device=device)
    line = torch.hann_window(patch_size + 2, periodic=False, device=device)[1:-1]
    return line[:, None, None] * line[None, :, None] * line[None, None, :]


@dataclass(frozen=True)
class PatchGrid:
    """The patch positions over a volume of spatial ``shape`` (zero-padded to a patch where smaller).

    Example:
        >>> grid = PatchGrid((88, 104, 88), 48)
        >>> len(grid), grid.starts[1]
        (27, (0, 0, 20))
    """

    shape: tuple[int, int, int]
    patch_size: int
    overlap: int | None = None

    @property
    def padded_shape(self) -> tuple[int, int, int]:
        return tuple(max(side, self.patch_size) for side in self.shape)

    @property
    def starts(self) -> list[tuple[int, int, int]]:
        overlap = default_overlap(self.patch_size) if self.overlap is None else self.overlap
        return list(itertools.product(*(grid_starts(side, self.patch_size, overlap) for side in self.padded_shape)))

    def __len__(self) -> int:
        return len(self.starts)

    def region(self, start: Sequence[int]) -> tuple[slice, slice, slice]:
        return tuple(slice(s, s + self.patch_size) for s in start)

    def pad(self, volume: torch.Tensor) -> torch.Tensor:
        """Zero-pad the last three axes to ``padded_shape`` (the volume itself when nothing is padded)."""
        missing = [p - s for p, s in zip(self.padded_shape, volume.shape[-3:])]
        if not any(missing):
            return volume
        return F.pad(volume, [p for side in reversed(missing) for p in (0, side)])

    def crop(self, volume: torch.Tensor) -> torch.Tensor:
        """Undo :meth:`pad` on the last three axes."""
        d, h, w = self.shape
        return volume[..., :d, :h, :w]

    def window_sum(self, window: torch.Tensor) -> torch.Tensor:
        """The sum of the patch windows over the grid (padded_shape), what the accumulators are divided by."""
        total = torch.zeros(self.padded_shape, device=window.device)
        for start in self.starts:
            total[self.region(start)] += window
        return total


def sliding_window(
    fn: PatchFunction,
    volumes: Mapping[str, torch.Tensor],
    patch_size: int,
    overlap: int | None = None,
    batch_size: int = 2,
    device: torch.device | str = "cpu",
    progress: bool = False,
    overlap_mode: str = "hann",
) -> torch.Tensor:
    """Apply ``fn`` patch-wise to ``volumes`` and stitch the outputs with one spatial window.

    Args:
        fn: maps ``{name: (B, C_name, p, p, p)}`` to ``(B, C_out, p, p, p)``.
        volumes: ``{name: (C_name, D, H, W)}`` tensors sharing their spatial shape (any dtype:
            patches keep it).
        patch_size: cubic patch side.
        overlap: least number of voxels shared by neighbouring patches; default
            :func:`default_overlap`.
        batch_size: patch positions per call of ``fn``.
        device: where ``fn`` runs and the output accumulates.
        progress: show a progress bar over patch batches.
        overlap_mode: ``hann`` (smooth blending) or ``average``.

    Returns:
        ``(C_out, D, H, W)`` float32 tensor on ``device``.

    Example:
        >>> x = torch.rand(2, 20, 24, 18)
        >>> y = sliding_window(lambda b: b["x"] * 2, {"x": x}, patch_size=16)
        >>> torch.allclose(y, x * 2, atol=1e-5)
        True
    """
    if not volumes:
        raise InputError("sliding_window needs at least one volume")
    for name, volume in volumes.items():
        if volume.ndim != 4:
            raise InputError(f"volume {name!r} must be (C, D, H, W), got shape {tuple(volume.shape)}")
    shapes = {name: tuple(v.shape[1:]) for name, v in volumes.items()}
    if len(set(shapes.values())) != 1:
        raise InputError(f"volumes must share their spatial shape, got {shapes}")
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}")
    grid = PatchGrid(next(iter(shapes.values())), patch_size, overlap)
    padded = {name: grid.pad(volume) for name, volume in volumes.items()}
    window = patch_window(patch_size, overlap_mode, device)
    starts = grid.starts
    output: torch.Tensor | None = None
    with torch.no_grad():
        batches = range(0, len(starts), batch_size)
        for first in tqdm(batches, desc="patches", disable=not progress, leave=False):
            regions = [grid.region(start) for start in starts[first:first + batch_size]]
            # A lone last patch goes with a copy of itself (whose output is dropped): PyTorch runs a batch of
            # one through its slow convolution for few-channel 3x3x3 kernels (oneDNN wants N > 1 or
            # N*C*D*H > 20480); measured on the 2-core CPU, the segmenter took 58.5 ms for one 48^3 patch and
            # 44.9 ms for two.
            sent = regions * 2 if len(regions) == 1 < batch_size else regions
            inputs = {name: torch.stack([volume[(slice(None), *region)] for region in sent]).to(device)
                      for name, volume in padded.items()}
            outputs = fn(inputs).float()
            if output is None:
                output = torch.zeros(outputs.shape[1], *grid.padded_shape, device=device)
            for region, patch in zip(regions, outputs):
                output[(slice(None), *region)].addcmul_(patch, window)  # no patch-sized temporary
        output /= grid.window_sum(window)
    return grid.crop(output).contiguous()
