"""Fresh random warps of the references: a key whose references never recur exactly.

A key holds a finite set of references, and a server that receives many mixtures sees each of
them again and again; the key-recovery attacker (:mod:`mixpriv.privacy.attackers.traffic`)
averages the mixtures that share a reference to estimate it and subtracts it. Warping every
reference by a fresh random diffeomorphism for every mixture (drawn from the client's generator,
never sent) makes each mixture's reference a new, equally plausible brain, with its label map
warped the same way, so the unmixing stays exact: the labels still describe the reference that
was mixed.

The warps are Deformation-Proxy's key-seeded stationary velocity fields
(:class:`~mixpriv.proxies.deformation.DeformationKey`, integrated by scaling and squaring, so
they never fold), drawn and integrated on a grid ``COARSE`` times coarser than the references'
(the fields are smooth: their control points lie 12 voxels apart) and upsampled trilinearly, so a
warp costs little more than resampling the reference once; images are resampled trilinearly,
label maps by nearest neighbour.

Example:
    >>> images = torch.rand(2, 12, 12, 12)
    >>> labels = (images > 0.5).to(torch.uint8)
    >>> warped, warped_labels = warp_references(images, labels, 2.0, torch.Generator().manual_seed(0))
    >>> warped.shape, warped_labels.dtype, bool((warped - images).abs().max() > 0.1)
    (torch.Size([2, 12, 12, 12]), torch.uint8, True)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mixpriv.proxies.deformation import DeformationKey, integrate_velocity, key_velocities, warp

_SEED_BOUND = 2 ** 62
#: How much coarser than the references the warps are drawn and integrated.
COARSE = 4
#: References warped at once (bounds the memory of the full-resolution fields).
CHUNK = 8


def warp_references(images: torch.Tensor, labels: torch.Tensor | None, magnitude: float,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Warp each of N references (N, D, H, W) and its label map (N, D, H, W) by its own fresh diffeomorphism.

    The warps are drawn (one seed per reference) at once and computed ``CHUNK`` references at a time,
    so memory grows with the chunk, not with N; the result does not depend on the chunking.

    Args:
        images: the references' images.
        labels: their integer label maps, on the same grid (``None``: images only).
        magnitude: peak displacement in voxels (0: returned as they are).
        generator: source of the warps' seeds (the client's generator: a fresh draw per call).

    Raises:
        ValueError: a magnitude that would fold the field on this grid (the message says what to change).
    """
    if magnitude == 0:
        return images, labels
    seeds = torch.randint(0, _SEED_BOUND, (images.shape[0],), generator=generator).tolist()
    parts = [_warp_by_seeds(images[start:start + CHUNK], None if labels is None else labels[start:start + CHUNK],
                            magnitude, seeds[start:start + CHUNK]) for start in range(0, len(seeds), CHUNK)]
    warped = torch.cat([image for image, _ in parts])
    return warped, None if labels is None else torch.cat([label for _, label in parts])


def _warp_by_seeds(images: torch.Tensor, labels: torch.Tensor | None, magnitude: float,
                   seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Warp references (n, D, H, W) and their label maps by the warps of ``seeds`` (one each)."""
    shape = tuple(images.shape[1:])
    coarse = tuple(max(2, round(n / COARSE)) for n in shape)
    base = DeformationKey(0)  # the default smoothness, in the references' voxels
    keys = [DeformationKey(int(seed), magnitude=float(magnitude) / COARSE, control_spacing=base.control_spacing / COARSE,
                           smoothing=base.smoothing / COARSE) for seed in seeds]
    field = integrate_velocity(key_velocities(keys, coarse, images.device), base.steps)
    scale = torch.tensor([(n - 1) / (c - 1) for n, c in zip(shape, coarse)], device=field.device)
    forward = F.interpolate(field, size=shape, mode="trilinear", align_corners=True) * scale.reshape(1, 3, 1, 1, 1)
    warped_labels = None if labels is None else warp(labels[:, None], forward, mode="nearest")[:, 0]
    return warp(images[:, None], forward)[:, 0], warped_labels
