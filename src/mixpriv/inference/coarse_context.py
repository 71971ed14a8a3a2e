"""Learned unmixing of whole stitched volumes by the coarse-context unmixer, each stage at its own resolution.

:class:`~mixpriv.networks.unmixer.ContextAdaINUnmixer` needs a patch's field of view only in
its coarse U-Net (its instance norms); everything else works voxel by voxel. So, on the K
stitched mixed probabilities (the server's answer, or the local segmenter's over the grid):

1. the mixed probabilities and the references' labels are pooled once per volume;
2. the coarse U-Net runs over a grid of coarse patches, each the training patch divided by the
   context scale (so that every instance norm sees the field of view it was trained on), all K
   mixtures of a position in one batch, stitched with the grid's window;
3. the stitched coarse logits are upsampled once per mixture, and the per-voxel head and the
   3x3x3 refinement run once per voxel (:meth:`~mixpriv.networks.unmixer.ContextAdaINUnmixer.finish`).

Run per full-resolution patch instead, the pooling, the upsampling and the accumulation of the
upsampled context cost about as much as the coarse U-Net itself, on 3.7 times as many voxels
as the volume has (27 overlapping 48³ patches on the cohort volume). On one patch that covers
the volume, this is the unmixer's forward pass on that patch.
"""

from __future__ import annotations

import torch

from mixpriv.inference.grid import default_overlap, sliding_window
from mixpriv.inference.mixtures import Mixtures
from mixpriv.networks.unmixer import ContextAdaINUnmixer
from mixpriv.validation import InputError

#: Coarse patch positions per call of the coarse U-Net (each carries all K mixtures).
COARSE_POSITIONS_PER_CALL = 8


def unmix_volumes(
    unmixer: ContextAdaINUnmixer,
    mixed: torch.Tensor,
    mixtures: Mixtures,
    patch_size: int,
    overlap: int | None = None,
) -> torch.Tensor:
    """Target class probabilities (K, C, D, H, W) from the stitched mixed probabilities of ``mixtures``.

    Args:
        unmixer: a trained coarse-context unmixer.
        mixed: the segmenter's stitched class probabilities of the K mixtures (K, C, D, H, W);
            the work runs on its device.
        mixtures: the mixtures with their secrets (references, weights, λ).
        patch_size: the model's training patch side; coarse patches are this divided by the
            unmixer's context scale.
        overlap: the full-resolution grid's least overlap (default: a quarter of a patch), also
            divided by the scale.

    Example:
        >>> probabilities = unmix_volumes(model.unmixer, run.mixed_probabilities, run.mixtures, 48)  # doctest: +SKIP
    """
    scale = unmixer.spec.context_scale
    if patch_size % scale:
        raise InputError(f"the patch size {patch_size} is not a multiple of the unmixer's context scale {scale}")
    coarse_patch = patch_size // scale
    coarse_overlap = default_overlap(coarse_patch) if overlap is None else overlap // scale
    lambdas = mixtures.lambdas.to(mixed.device, mixed.dtype)
    references = mixtures.reference_probabilities().to(mixed.device, mixed.dtype)
    features = unmixer.coarse_features(mixed, references, lambdas)
    k, channels, *coarse_shape = features.shape

    def coarse_logits(patches: dict[str, torch.Tensor]) -> torch.Tensor:
        items = patches["features"]
        positions, spatial = items.shape[0], items.shape[2:]
        logits = unmixer.coarse_logits(items.reshape(positions * k, channels, *spatial), lambdas.repeat(positions))
        return logits.reshape(positions, -1, *spatial)

    coarse = sliding_window(coarse_logits, {"features": features.reshape(k * channels, *coarse_shape)}, coarse_patch,
                            coarse_overlap, COARSE_POSITIONS_PER_CALL, mixed.device)
    coarse = coarse.reshape(k, -1, *coarse_shape)
    out = torch.empty_like(mixed)
    for i in range(k):  # one mixture at a time: the refinement's hidden layer is the largest tensor
        context = unmixer.upsample(coarse[i:i + 1], mixed.shape[2:])
        logits = unmixer.finish(mixed[i:i + 1], references[i:i + 1], lambdas[i:i + 1], context)
        out[i] = torch.softmax(logits.float(), dim=1)[0]
    return out
