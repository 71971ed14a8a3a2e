"""The private pipeline on whole volumes: mix (client), segment (server), unmix + TTA (client).

    m_k  = lam_k * x + (1 - lam_k) * r_k                 k = 1..K    (Eq. 5)
    p_mk = S(m_k)                                        server, all K in one batched pass
    p_k  = U(p_mk, y_rk, lam_k)  or naive Eq. 4           client
    p    = mean_k p_k,  variance = var_k p_k             (Eq. 6, uncertainty)

With K-way mixing (``references_per_mix`` R > 1) each ``r_k`` is a composite of R distinct
references, ``r_k = sum_j beta_kj r_kj`` with ``beta_k ~ Dirichlet(alpha)``, and ``y_rk`` the
same weighted sum of their one-hot labels (:mod:`mixpriv.mixing.composite`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from mixpriv.constants import (
    DEFAULT_DIRICHLET_ALPHA,
    DEFAULT_LAMBDA_RANGE,
    DEFAULT_REFERENCES_PER_MIX,
)
from mixpriv.inference.grid import sliding_window
from mixpriv.mixing.bank import ReferenceBank
from mixpriv.mixing.composite import composite_reference, draw_reference_weights
from mixpriv.mixing.functional import (fit_one_hot_to_shape, fit_to_shape, mix, naive_unmix,
                                       probabilities_from_unmixed)
from mixpriv.validation import (
    InputError,
    check_finite,
    check_lambda_range,
    check_references_per_mix,
)

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
    """What the client keeps (weights, references) and what it sends (mixtures).

    Mixture k is ``lambdas[k] * x + (1 - lambdas[k]) * sum_j reference_weights[k, j] * r_j`` over
    the R references ``j`` in ``reference_indices[k]`` (R = 1: ``lambdas[k] * x + (1 - lambdas[k]) * r``).

    Attributes:
        mixtures: (K, 1, D, H, W), the only thing sent to the server.
        reference_one_hot: (K, C, D, H, W), secret: each mixture's reference label, one-hot for
            R = 1 and the weighted mixture of the R one-hot labels otherwise.
        lambdas: (K,), secret: the target's weight in each mixture.
        reference_indices: secret: for each mixture, the tuple of its R bank indices (a
            one-tuple ``(i,)`` for R = 1).
        reference_weights: (K, R), secret: the references' weights within each composite
            (all ones for R = 1).
    """

    mixtures: torch.Tensor
    reference_one_hot: torch.Tensor
    lambdas: torch.Tensor
    reference_indices: list[tuple[int, ...]]
    reference_weights: torch.Tensor


def draw_lambdas(k: int, lambda_range: Sequence[float] = DEFAULT_LAMBDA_RANGE,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw K mixing weights uniformly in ``lambda_range``."""
    low, high = check_lambda_range(lambda_range)
    return low + (high - low) * torch.rand(k, generator=generator)


def mixing_settings(
    hparams: Mapping,
    references_per_mix: int | None = None,
    dirichlet_alpha: float | None = None,
    bank_size: int | None = None,
) -> tuple[int, float]:
    """The K-way mixing settings (R, alpha) to use with a model: the given ones, else the model's.

    Models trained before K-way mixing have neither in their ``hparams``: they get (1, 1.0),
    the single-reference scheme they were trained with.

    Example:
        >>> mixing_settings({"lambda_range": [0.65, 0.95]})
        (1, 1.0)
        >>> mixing_settings({"references_per_mix": 3, "dirichlet_alpha": 2.0}, dirichlet_alpha=0.5)
        (3, 0.5)
    """
    return check_references_per_mix(
        hparams.get("references_per_mix", DEFAULT_REFERENCES_PER_MIX) if references_per_mix is None
        else references_per_mix,
        hparams.get("dirichlet_alpha", DEFAULT_DIRICHLET_ALPHA) if dirichlet_alpha is None else dirichlet_alpha,
        bank_size)


def _reference_sets(bank: ReferenceBank, k: int, references_per_mix: int,
                    generator: torch.Generator | None) -> list[tuple[int, ...]]:
    """K tuples of R distinct references; with R = 1, the K references differ while K <= bank size."""
    if references_per_mix == 1:
        return [(index,) for index in bank.sample_indices(k, generator)]
    return [tuple(torch.randperm(len(bank), generator=generator)[:references_per_mix].tolist()) for _ in range(k)]


def mix_with_references(
    image: torch.Tensor,
    bank: ReferenceBank,
    k: int,
    lambda_range: Sequence[float] = DEFAULT_LAMBDA_RANGE,
    generator: torch.Generator | None = None,
    reference_indices: Sequence[int | Sequence[int]] | None = None,
    lambdas: torch.Tensor | None = None,
    references_per_mix: int = DEFAULT_REFERENCES_PER_MIX,
    dirichlet_alpha: float = DEFAULT_DIRICHLET_ALPHA,
    reference_weights: torch.Tensor | None = None,
) -> Mixtures:
    """Mix a preprocessed image (1, D, H, W) with K references of the bank (client side).

    Args:
        image: the preprocessed target (1, D, H, W).
        bank: the client's reference bank.
        k: number of mixtures K.
        lambda_range: range of the target's weights, drawn uniformly.
        generator: source of every draw (references, lambdas, Dirichlet weights); ``None``
            uses torch's global generator.
        reference_indices: use these references instead of drawing them, one entry per
            mixture: an index, or a sequence of R indices (K is then its length).
        lambdas: use these target weights (K,) instead of drawing them.
        references_per_mix: R, references in each mixture's composite (K-way mixing); 1 is the
            paper's scheme, with the same draws as before K-way mixing.
        dirichlet_alpha: concentration of the Dirichlet weights of the R references.
        reference_weights: use these weights (K, R) of the references instead of drawing them.

    Example:
        >>> bank = ReferenceBank(torch.rand(4, 1, 6, 6, 6), torch.zeros(4, 6, 6, 6, dtype=torch.long),
        ...                      {"background": 0, "fg": 1})
        >>> mixed = mix_with_references(torch.rand(1, 6, 6, 6), bank, 2, references_per_mix=3,
        ...                             generator=torch.Generator().manual_seed(0))
        >>> mixed.mixtures.shape, [len(set(refs)) for refs in mixed.reference_indices]
        (torch.Size([2, 1, 6, 6, 6]), [3, 3])
        >>> torch.allclose(mixed.reference_weights.sum(1), torch.ones(2))
        True
    """
    if image.ndim != 4 or image.shape[0] != 1:
        raise InputError(f"image must have shape (1, D, H, W), got {tuple(image.shape)}")
    check_finite(image, "image")
    if k < 1:
        raise InputError(f"the number of references K must be at least 1, got {k}")
    r, alpha = check_references_per_mix(references_per_mix, dirichlet_alpha, len(bank))
    if reference_indices is None:
        indices = _reference_sets(bank, k, r, generator)
    else:
        indices = [tuple(int(i) for i in entry) if isinstance(entry, Sequence) else (int(entry),)
                   for entry in reference_indices]
        if any(len(entry) != r for entry in indices):
            raise InputError(f"each mixture needs references_per_mix = {r} reference indices")
    lambdas = draw_lambdas(len(indices), lambda_range, generator) if lambdas is None else lambdas
    if reference_weights is None:
        reference_weights = torch.stack([draw_reference_weights(r, alpha, generator) for _ in indices])
    reference_weights = torch.as_tensor(reference_weights, dtype=torch.float32)
    if reference_weights.shape != (len(indices), r):
        raise InputError(f"reference weights must have shape {(len(indices), r)}, got {tuple(reference_weights.shape)}")
    mixtures, references = [], []
    for entry, weights, lam in zip(indices, reference_weights, lambdas):
        reference_image, reference_label = composite_reference(bank, entry, weights)
        reference_image = fit_to_shape(reference_image, image.shape[1:])
        references.append(fit_one_hot_to_shape(reference_label, image.shape[1:]))
        mixtures.append(mix(image.float(), reference_image, float(lam)))
    return Mixtures(torch.stack(mixtures), torch.stack(references), torch.as_tensor(lambdas).float(), indices,
                    reference_weights)


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
