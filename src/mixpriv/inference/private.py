"""The private pipeline on whole volumes: mix (client), segment (server), unmix + TTA (client).

    m_k  = lam_k * x + (1 - lam_k) * r_k                 k = 1..K    (Eq. 5)
    p_mk = S(m_k)                                        server, all K in one batched pass
    p_k  = U(p_mk, y_rk, lam_k)  or naive Eq. 4           client
    p    = mean_k p_k,  variance = var_k p_k             (Eq. 6, uncertainty)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from mixpriv.constants import DEFAULT_LAMBDA_RANGE
from mixpriv.inference.grid import sliding_window
from mixpriv.mixing.bank import ReferenceBank
from mixpriv.mixing.functional import mix, naive_unmix, probabilities_from_unmixed
from mixpriv.mixing.transforms import _fit_one_hot_to_shape, _fit_to_shape
from mixpriv.validation import InputError, check_finite, check_lambda_range

UNMIX_METHODS = ("learned", "naive")


@dataclass
class PrivateSegmentation:
    """Result of a private segmentation with K references.

    Attributes:
        per_reference: unmixed class probabilities for each reference (K, C, D, H, W).
        probabilities: TTA average over the K references (C, D, H, W) (Eq. 6).
        variance: per-voxel, per-class variance over the K references (C, D, H, W);
            zero when K = 1.
    """

    per_reference: torch.Tensor

    @property
    def probabilities(self) -> torch.Tensor:
        return self.per_reference.mean(0)

    @property
    def variance(self) -> torch.Tensor:
        if self.per_reference.shape[0] < 2:
            return torch.zeros_like(self.per_reference[0])
        return self.per_reference.var(0, unbiased=False)

    @property
    def labels(self) -> torch.Tensor:
        """Label map (D, H, W) of the averaged probabilities."""
        return self.probabilities.argmax(0)

    def first(self, k: int) -> PrivateSegmentation:
        """The ensemble of the first ``k`` references only (for Dice-versus-K curves)."""
        return PrivateSegmentation(self.per_reference[:k])


@dataclass
class Mixtures:
    """What the client keeps (lambdas, reference labels) and what it sends (mixtures)."""

    mixtures: torch.Tensor  # (K, 1, D, H, W) — the only thing sent to the server
    reference_one_hot: torch.Tensor  # (K, C, D, H, W) — secret
    lambdas: torch.Tensor  # (K,) — secret
    reference_indices: list[int]  # secret


def draw_lambdas(k: int, lambda_range: Sequence[float] = DEFAULT_LAMBDA_RANGE,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw K mixing weights uniformly in ``lambda_range``."""
    low, high = check_lambda_range(lambda_range)
    return low + (high - low) * torch.rand(k, generator=generator)


def mix_with_references(
    image: torch.Tensor,
    bank: ReferenceBank,
    k: int,
    lambda_range: Sequence[float] = DEFAULT_LAMBDA_RANGE,
    generator: torch.Generator | None = None,
    reference_indices: Sequence[int] | None = None,
    lambdas: torch.Tensor | None = None,
) -> Mixtures:
    """Mix a preprocessed image (1, D, H, W) with K references of the bank (client side)."""
    if image.ndim != 4 or image.shape[0] != 1:
        raise InputError(f"image must have shape (1, D, H, W), got {tuple(image.shape)}")
    check_finite(image, "image")
    if k < 1:
        raise InputError(f"the number of references K must be at least 1, got {k}")
    indices = list(reference_indices) if reference_indices is not None else bank.sample_indices(k, generator)
    lambdas = draw_lambdas(len(indices), lambda_range, generator) if lambdas is None else lambdas
    mixtures, references = [], []
    for index, lam in zip(indices, lambdas):
        reference_image, reference_one_hot = bank.get(index)
        reference_image = _fit_to_shape(reference_image, image.shape[1:])
        references.append(_fit_one_hot_to_shape(reference_one_hot, image.shape[1:]))
        mixtures.append(mix(image.float(), reference_image, float(lam)))
    return Mixtures(torch.stack(mixtures), torch.stack(references), torch.as_tensor(lambdas).float(), indices)


def segment_mixtures(
    segment: Callable[[torch.Tensor], torch.Tensor],
    mixtures: torch.Tensor,
    patch_size: int,
    overlap: int | None = None,
    batch_size: int = 2,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> torch.Tensor:
    """Server side: class probabilities (K, C, D, H, W) of K mixtures (K, 1, D, H, W).

    The K mixtures are stacked as channels so each grid position runs all K in one batch.
    """
    k = mixtures.shape[0]

    def run(patches: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = patches["mixtures"]  # (B, K, p, p, p)
        probs = segment(batch.reshape(-1, 1, *batch.shape[2:]))  # (B*K, C, p, p, p)
        return probs.reshape(batch.shape[0], -1, *batch.shape[2:])

    stacked = sliding_window(run, {"mixtures": mixtures[:, 0]}, patch_size, overlap, batch_size, device, progress)
    return stacked.reshape(k, -1, *stacked.shape[1:])


def unmix_volumes(
    mixed_probs: torch.Tensor,
    reference_one_hot: torch.Tensor,
    lambdas: torch.Tensor,
    method: str = "learned",
    unmixer: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    patch_size: int = 48,
    overlap: int | None = None,
    batch_size: int = 2,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Client side: target probabilities (K, C, D, H, W) from the server's output."""
    if method not in UNMIX_METHODS:
        raise InputError(f"unknown unmixing method {method!r}; choose one of {UNMIX_METHODS}")
    if method == "naive":
        return probabilities_from_unmixed(naive_unmix(mixed_probs, reference_one_hot, lambdas))
    if unmixer is None:
        raise InputError("learned unmixing needs an unmixer")
    k, c = mixed_probs.shape[:2]

    def run(patches: dict[str, torch.Tensor]) -> torch.Tensor:
        b = patches["mixed"].shape[0]
        spatial = patches["mixed"].shape[2:]
        lam = lambdas.to(patches["mixed"].device).repeat(b)
        out = unmixer(patches["mixed"].reshape(b * k, c, *spatial), patches["reference"].reshape(b * k, c, *spatial), lam)
        return out.reshape(b, k * c, *spatial)

    volumes = {"mixed": mixed_probs.reshape(k * c, *mixed_probs.shape[2:]),
               "reference": reference_one_hot.reshape(k * c, *reference_one_hot.shape[2:])}
    out = sliding_window(run, volumes, patch_size, overlap, batch_size, device)
    return out.reshape(k, c, *out.shape[1:])
