"""The attacked patches: brain-containing targets, (composite) references at the same location, and their mixtures."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mixpriv.constants import DEFAULT_DIRICHLET_ALPHA
from mixpriv.mixing.composite import draw_reference_weights, weighted_sum
from mixpriv.privacy.bss.options import SeparationOptions
from mixpriv.validation import InputError, check_finite, check_spatial_dims

_UNIT_SLACK = 1e-4


def _check_images(images: Sequence[torch.Tensor], name: str, patch: int) -> list[torch.Tensor]:
    if len(images) == 0:
        raise InputError(f"{name} is empty")
    checked = []
    for index, image in enumerate(images):
        label = f"{name}[{index}]"
        check_spatial_dims(image, label)
        check_finite(image, label)
        if image.ndim != 4 or image.shape[0] != 1:
            raise InputError(f"{label} must be one volume (1, D, H, W), got shape {tuple(image.shape)}")
        if min(image.shape[1:]) < patch:
            raise InputError(f"{label} of shape {tuple(image.shape)} is smaller than the {patch}³ patch")
        if image.min() < -_UNIT_SLACK or image.max() > 1 + _UNIT_SLACK:
            raise InputError(f"{label} has values in [{float(image.min()):.4g}, {float(image.max()):.4g}], "
                             "outside [0, 1]")
        checked.append(image.float().clamp(0, 1))
    return checked


def _crop(image: torch.Tensor, corner: Sequence[int], patch: int) -> torch.Tensor:
    d, h, w = corner
    return image[:, d:d + patch, h:h + patch, w:w + patch]


def draw_patches(
    scans: Sequence[torch.Tensor], bank: Sequence[torch.Tensor], num_patches: int, patch: int,
    generator: torch.Generator, min_mean: float = 0.05, references_per_mix: int = 1,
    dirichlet_alpha: float = DEFAULT_DIRICHLET_ALPHA, max_tries: int = 1000,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Brain-containing target patches and reference patches at the same location, (P, 1, p, p, p) each.

    Each patch takes a random scan and a random corner where the target's mean intensity reaches
    ``min_mean``; then ``references_per_mix`` distinct random references of the scan's shape,
    cropped at that corner and summed with Dirichlet weights (the composite reference of K-way
    mixing, :mod:`mixpriv.mixing.composite`; a single reference as it is). The client mixes whole
    volumes voxel by voxel, so a patch of the mixture is the mixture of the patches. The targets
    are drawn first: one seed gives the same targets whatever the number of references.

    Example:
        >>> targets, refs = draw_patches([torch.rand(1, 8, 8, 8)], [torch.rand(1, 8, 8, 8)], 2, 4,
        ...                              torch.Generator().manual_seed(0))
        >>> targets.shape, refs.shape
        (torch.Size([2, 1, 4, 4, 4]), torch.Size([2, 1, 4, 4, 4]))
    """
    located = _locate_targets(scans, num_patches, patch, generator, min_mean, max_tries)
    references = _references_at(located, bank, patch, generator, references_per_mix, dirichlet_alpha)
    return torch.stack([target for *_, target in located]), references


def _locate_targets(scans: Sequence[torch.Tensor], num_patches: int, patch: int, generator: torch.Generator,
                    min_mean: float, max_tries: int) -> list[tuple]:
    """(scan shape, corner, target patch) of ``num_patches`` random brain-containing patches."""
    located = []
    for _ in range(num_patches):
        for _ in range(max_tries):
            scan = scans[int(torch.randint(len(scans), (1,), generator=generator))]
            corner = [int(torch.randint(s - patch + 1, (1,), generator=generator)) for s in scan.shape[1:]]
            target = _crop(scan, corner, patch)
            if float(target.mean()) >= min_mean:
                located.append((scan.shape, corner, target.clone()))
                break
        else:
            raise InputError(f"no {patch}³ patch with mean intensity >= {min_mean} in {max_tries} tries: "
                             "are the scans mostly background?")
    return located


def _references_at(located: Sequence[tuple], bank: Sequence[torch.Tensor], patch: int, generator: torch.Generator,
                   references_per_mix: int, dirichlet_alpha: float) -> torch.Tensor:
    """One (composite) reference patch (P, 1, p, p, p) at each located target's corner."""
    references = []
    for shape, corner, _ in located:
        compatible = [r for r in bank if r.shape == shape]
        if len(compatible) < references_per_mix:
            raise InputError(f"{len(compatible)} reference(s) of the scan's shape {tuple(shape)}, "
                             f"{references_per_mix} needed: the client mixes volumes of one shape")
        chosen = torch.randperm(len(compatible), generator=generator)[:references_per_mix].tolist()
        weights = draw_reference_weights(references_per_mix, dirichlet_alpha, generator)
        references.append(weighted_sum([_crop(compatible[i], corner, patch) for i in chosen], weights))
    return torch.stack(references)


def draw_mixtures(
    scans: Sequence[torch.Tensor], bank: Sequence[torch.Tensor], lambda_range: tuple[float, float],
    options: SeparationOptions, seed: int, references_per_mix: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The attacked patches: target, (composite) reference, λ ~ U(lambda_range) and their mixture.

    The draw depends on ``seed`` only (not on the attack that follows), so every attack and mixing
    setting with one seed sees the same target patches.

    Example:
        >>> target, reference, lam, mixture = draw_mixtures(
        ...     [torch.rand(1, 8, 8, 8)], [torch.rand(1, 8, 8, 8)], (0.6, 0.8),
        ...     SeparationOptions(patch_size=4, num_patches=2, min_mean=0.0), seed=0)
        >>> torch.allclose(mixture, lam.reshape(-1, 1, 1, 1, 1) * target
        ...                + (1 - lam.reshape(-1, 1, 1, 1, 1)) * reference)
        True
    """
    low, high = lambda_range
    generator = torch.Generator().manual_seed(seed)
    target, reference = draw_patches(scans, bank, options.num_patches, options.patch_size, generator,
                                     options.min_mean, references_per_mix)
    lam = low + (high - low) * torch.rand(options.num_patches, generator=generator)
    weight = lam.reshape(-1, 1, 1, 1, 1)
    return target, reference, lam, weight * target + (1 - weight) * reference


def draw_request_mixtures(
    scans: Sequence[torch.Tensor], bank: Sequence[torch.Tensor], lambda_range: tuple[float, float],
    options: SeparationOptions, seed: int, k: int, references_per_mix: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The attacked patches of whole requests: each target with K references, λ's and mixtures.

    The targets are those of :func:`draw_mixtures` with the same ``seed``.

    Returns:
        target (P, 1, p, p, p), references (P, K, 1, p, p, p), λ (P, K), mixtures (P, K, 1, p, p, p).

    Example:
        >>> scans, bank = [torch.rand(1, 8, 8, 8)], [torch.rand(1, 8, 8, 8), torch.rand(1, 8, 8, 8)]
        >>> options = SeparationOptions(patch_size=4, num_patches=2, min_mean=0.0)
        >>> target, references, lam, mixtures = draw_request_mixtures(scans, bank, (0.2, 0.5), options, seed=0, k=3)
        >>> mixtures.shape, torch.equal(target, draw_mixtures(scans, bank, (0.2, 0.5), options, seed=0)[0])
        (torch.Size([2, 3, 1, 4, 4, 4]), True)
    """
    low, high = lambda_range
    generator = torch.Generator().manual_seed(seed)
    located = _locate_targets(scans, options.num_patches, options.patch_size, generator, options.min_mean, 1000)
    references = torch.stack([_references_at(located, bank, options.patch_size, generator, references_per_mix,
                                             DEFAULT_DIRICHLET_ALPHA) for _ in range(k)], dim=1)
    lam = low + (high - low) * torch.rand(options.num_patches, k, generator=generator)
    target = torch.stack([t for *_, t in located])
    weight = lam.reshape(*lam.shape, 1, 1, 1, 1)
    return target, references, lam, weight * target[:, None] + (1 - weight) * references
