"""Whole-volume inference over an overlapping patch grid (``tio.GridSampler`` / ``GridAggregator``).

Like MONAI's inferers, the grid is kept apart from the model: ``fn`` is any callable from a
dict of patch batches to an output batch, so a segmenter, an unmixer or a TTA ensemble plug in.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
import torchio as tio
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from mixpriv.validation import InputError

PatchFunction = Callable[[dict[str, torch.Tensor]], torch.Tensor]


def sliding_window(
    fn: PatchFunction,
    volumes: Mapping[str, torch.Tensor],
    patch_size: int,
    overlap: int | None = None,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    progress: bool = False,
    overlap_mode: str = "hann",
) -> torch.Tensor:
    """Apply ``fn`` patch-wise to ``volumes`` and stitch the outputs.

    Args:
        fn: maps ``{name: (B, C_name, p, p, p)}`` to ``(B, C_out, p, p, p)``.
        volumes: ``{name: (C_name, D, H, W)}`` tensors sharing their spatial shape.
        patch_size: cubic patch side.
        overlap: voxels shared by neighbouring patches (even); default a quarter of a patch.
        batch_size: patches per call of ``fn``.
        device: where ``fn`` runs; outputs are aggregated on the CPU.
        progress: show a progress bar over patch batches.
        overlap_mode: ``hann`` (smooth blending) or ``average``.

    Returns:
        ``(C_out, D, H, W)`` float tensor.

    Example:
        >>> x = torch.rand(2, 20, 24, 18)
        >>> y = sliding_window(lambda b: b["x"] * 2, {"x": x}, patch_size=16)
        >>> torch.allclose(y, x * 2, atol=1e-5)
        True
    """
    if not volumes:
        raise InputError("sliding_window needs at least one volume")
    shapes = {name: tuple(v.shape[1:]) for name, v in volumes.items()}
    for name, volume in volumes.items():
        if volume.ndim != 4:
            raise InputError(f"volume {name!r} must be (C, D, H, W), got shape {tuple(volume.shape)}")
    if len(set(shapes.values())) != 1:
        raise InputError(f"volumes must share their spatial shape, got {shapes}")
    shape = next(iter(shapes.values()))
    overlap = patch_size // 4 if overlap is None else overlap
    overlap -= overlap % 2
    # The grid needs every side to hold at least one patch: zero-pad small volumes.
    padding = [max(0, patch_size - s) for s in shape]
    pad_arg = [p for side in reversed(padding) for p in (0, side)]
    subject = tio.Subject(
        {name: tio.ScalarImage(tensor=F.pad(v.float(), pad_arg)) for name, v in volumes.items()}
    )
    sampler = tio.GridSampler(subject, patch_size, overlap)
    aggregator = tio.inference.GridAggregator(sampler, overlap_mode=overlap_mode)
    loader = DataLoader(sampler, batch_size=batch_size)
    with torch.inference_mode():
        for batch in tqdm(loader, desc="patches", disable=not progress, leave=False):
            inputs = {name: batch[name][tio.DATA].to(device) for name in volumes}
            aggregator.add_batch(fn(inputs).float().cpu(), batch[tio.LOCATION])
    output = aggregator.get_output_tensor()
    return output[:, : shape[0], : shape[1], : shape[2]].contiguous()
