"""Client-side mixing of a whole volume with K references of the secret bank (paper Eq. 5).

    m_k = lam_k * x + (1 - lam_k) * r_k        k = 1..K

With K-way mixing (``references_per_mix`` R > 1) each ``r_k`` is a composite of R distinct
references, ``r_k = sum_j beta_kj r_kj`` with ``beta_k ~ Dirichlet(alpha)``, and its label the
same weighted sum of their one-hot labels (:mod:`mixpriv.mixing.composite`). The references'
labels stay integer (uint8) maps; their one-hot mixture is made per patch, where it is used.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mixpriv.constants import DEFAULT_LAMBDA_RANGE
from mixpriv.mixing.bank import ReferenceBank
from mixpriv.mixing.composite import (
    check_composite,
    draw_reference_weights,
    label_mixture,
)
from mixpriv.mixing.functional import fit_to_shape
from mixpriv.mixing.settings import DEFAULT_MIXING, MixingSettings
from mixpriv.mixing.warps import warp_references
from mixpriv.validation import (
    InputError,
    check_finite,
    check_lambda,
    check_lambda_range,
)

log = logging.getLogger(__name__)


def client_generator(seed: int | None = None) -> torch.Generator:
    """The source of a client's draws (references, λ, composite weights).

    Without a seed it starts from fresh operating-system entropy, so no two runs, sessions or
    notebooks share draws, whatever ``torch.manual_seed`` was set to. A fixed seed is for
    reproducing a run only, and is warned about: two scans mixed with the same draws let the
    server cancel the key, ``m_A − m_B = λ·(x_A − x_B)``, and see the patients' difference in the
    clear. One generator serves one run: its draws differ from scan to scan and request to request.

    Example:
        >>> a, b = client_generator(), client_generator()
        >>> bool(torch.rand(3, generator=a).ne(torch.rand(3, generator=b)).all())
        True
        >>> torch.rand(2, generator=client_generator(0)).tolist() == torch.rand(2, generator=client_generator(0)).tolist()
        True
    """
    if seed is None:
        return torch.Generator().manual_seed(secrets.randbits(63))
    log.warning("mixing with the fixed seed %d: every run with this seed draws the same references and weights, and "
                "two scans mixed with equal draws let the server cancel the key (m_A - m_B = λ·(x_A - x_B)); "
                "use a seed only to reproduce a run", seed)
    return torch.Generator().manual_seed(seed)


@dataclass
class Mixtures:
    """What the client keeps (weights, references) and what it sends (mixtures).

    Mixture k is ``lambdas[k] * x + (1 - lambdas[k]) * sum_j reference_weights[k, j] * r_j`` over
    the R references ``j`` in ``reference_indices[k]`` (R = 1: ``lambdas[k] * x + (1 - lambdas[k]) * r``).

    Attributes:
        mixtures: (K, 1, D, H, W), the only thing sent to the server.
        reference_labels: (K, R, D, H, W) uint8, secret: the label maps of each mixture's R
            references, on the scan's array (warped with them when ``reference_warp`` is set).
        lambdas: (K,), secret: the target's weight in each mixture.
        reference_indices: secret: for each mixture, the tuple of its R bank indices (a
            one-tuple ``(i,)`` for R = 1).
        reference_weights: (K, R), secret: the references' weights within each composite
            (all ones for R = 1).
        num_classes: C, the number of label channels.
        references: (K, 1, D, H, W), secret: each mixture's composite reference image as it was
            mixed (after the fresh warps of ``reference_warp``); ``None`` when not kept.
    """

    mixtures: torch.Tensor
    reference_labels: torch.Tensor
    lambdas: torch.Tensor
    reference_indices: list[tuple[int, ...]]
    reference_weights: torch.Tensor
    num_classes: int
    references: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.mixtures.shape[0]

    def reference_probabilities(self, k: int | None = None) -> torch.Tensor:
        """The composite references' labels as class distributions: (C, D, H, W) for mixture ``k``, else (K, C, ...).

        One-hot for R = 1, the weighted mixture of the R one-hot labels otherwise.
        """
        if k is not None:
            return label_mixture(self.reference_labels[k:k + 1], self.reference_weights[k:k + 1], self.num_classes)[0]
        return label_mixture(self.reference_labels, self.reference_weights, self.num_classes)


def draw_lambdas(k: int, lambda_range: Sequence[float] = DEFAULT_LAMBDA_RANGE,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw K mixing weights uniformly in ``lambda_range``.

    Example:
        >>> lambdas = draw_lambdas(3, (0.6, 0.8), torch.Generator().manual_seed(0))
        >>> bool(((lambdas >= 0.6) & (lambdas <= 0.8)).all())
        True
    """
    low, high = check_lambda_range(lambda_range)
    return low + (high - low) * torch.rand(k, generator=generator)


def _draw_reference_sets(bank: ReferenceBank, k: int, references_per_mix: int,
                         generator: torch.Generator | None) -> list[tuple[int, ...]]:
    """K tuples of R distinct references; with R = 1, the K references differ while K <= bank size."""
    if references_per_mix == 1:
        return [(index,) for index in bank.sample_indices(k, generator)]
    return [tuple(torch.randperm(len(bank), generator=generator)[:references_per_mix].tolist()) for _ in range(k)]


def mix_with_references(
    image: torch.Tensor,
    bank: ReferenceBank,
    k: int,
    mixing: MixingSettings = DEFAULT_MIXING,
    generator: torch.Generator | None = None,
    *,
    reference_indices: Sequence[int | Sequence[int]] | None = None,
    lambdas: torch.Tensor | None = None,
    reference_weights: torch.Tensor | None = None,
) -> Mixtures:
    """Mix a preprocessed image (1, D, H, W) with K references of the bank (client side).

    The image must lie on the bank's grid (:attr:`ReferenceBank.space`: resample a scan into it
    by its affine first, see :func:`mixpriv.inference.volume.load_scan`); only a bank that
    records no space is centre-cropped or padded to the image by array index.

    Every draw (references, then lambdas, then Dirichlet weights, then the references' warps
    when ``mixing.reference_warp`` is set) comes from ``generator`` (``None``: torch's global
    generator), in the order mixpriv has always drawn them, so a seed gives the same mixtures as
    before. The mixtures are computed in one vectorised pass.

    Args:
        image: the preprocessed target (1, D, H, W).
        bank: the client's reference bank.
        k: number of mixtures K.
        mixing: λ range, references per mixture R, Dirichlet α and the references' fresh warps.
        generator: source of every draw.
        reference_indices: use these references instead of drawing them, one entry per
            mixture: an index, or a sequence of R indices (K is then its length).
        lambdas: use these target weights (K,) instead of drawing them.
        reference_weights: use these weights (K, R) of the references instead of drawing them.

    Example:
        >>> bank = ReferenceBank(torch.rand(4, 1, 6, 6, 6), torch.zeros(4, 6, 6, 6, dtype=torch.long),
        ...                      {"background": 0, "fg": 1})
        >>> mixed = mix_with_references(torch.rand(1, 6, 6, 6), bank, 2, MixingSettings(references_per_mix=3),
        ...                             torch.Generator().manual_seed(0))
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
    r = mixing.check_bank(len(bank)).references_per_mix
    if reference_indices is None:
        indices = _draw_reference_sets(bank, k, r, generator)
    else:
        indices = [tuple(int(i) for i in entry) if isinstance(entry, Sequence) else (int(entry),)
                   for entry in reference_indices]
        if any(len(entry) != r for entry in indices):
            raise InputError(f"each mixture needs references_per_mix = {r} reference indices")
    lambdas = draw_lambdas(len(indices), mixing.lambda_range, generator) if lambdas is None else lambdas
    lambdas = torch.as_tensor(lambdas, dtype=torch.float32).reshape(-1)
    if lambdas.shape != (len(indices),):
        raise InputError(f"{len(indices)} mixtures need {len(indices)} lambdas, got shape {tuple(lambdas.shape)}")
    check_lambda(lambdas)
    if reference_weights is None:
        reference_weights = torch.stack([draw_reference_weights(r, mixing.dirichlet_alpha, generator)
                                         for _ in indices])
    reference_weights = torch.as_tensor(reference_weights, dtype=torch.float32)
    if reference_weights.shape != (len(indices), r):
        raise InputError(f"reference weights must have shape {(len(indices), r)}, got {tuple(reference_weights.shape)}")
    for entry, weights in zip(indices, reference_weights):
        check_composite(entry, weights, len(bank))
    shape = image.shape[1:]
    if bank.space is not None and tuple(shape) != bank.spatial_shape:
        raise InputError(f"the image is {tuple(shape)} voxels but the key's references lie on {bank.space}: resample "
                         f"the scan into the key's space first (mixpriv.inference.volume.load_scan(path, "
                         f"space=key.space), or mixpriv.inference.scans.prepare_scan)")
    flat = torch.tensor([i for entry in indices for i in entry])
    references, labels = warp_references(_fitted(bank.images, flat, shape), _fitted(bank.labels[:, None], flat, shape),
                                         mixing.reference_warp, generator)
    references, labels = references.reshape(len(indices), r, *shape), labels.reshape(len(indices), r, *shape)
    composite = references[:, 0] if r == 1 else torch.einsum("kr,kr...->k...", reference_weights, references)
    lam = lambdas.reshape(-1, 1, 1, 1)
    mixtures = lam * image.float() + (1 - lam) * composite
    return Mixtures(mixtures[:, None], labels, lambdas, indices, reference_weights, bank.num_classes,
                    composite[:, None])


def _fitted(volumes: torch.Tensor, indices: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """``volumes[indices]`` (N, 1, ...) centre-cropped or zero-padded to the spatial ``shape``: (N, ...)."""
    if tuple(volumes.shape[2:]) == tuple(shape):
        return volumes[indices, 0]
    return torch.stack([fit_to_shape(volumes[i], shape)[0] for i in indices.tolist()])
