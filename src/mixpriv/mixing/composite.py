"""K-way mixing: a composite reference built from R references of the bank.

The target keeps its weight lambda and the remaining ``1 - lambda`` is split over R distinct
references with weights ``beta ~ Dirichlet(alpha, ..., alpha)``::

    m     = lam * x + (1 - lam) * r_bar      r_bar = sum_j beta_j * r_j
    y_bar = sum_j beta_j * onehot(y_j)       (the composite reference's label)

The mixing algebra (:func:`~mixpriv.mixing.mix`, :func:`~mixpriv.mixing.naive_unmix`) and the
learned unmixer then work unchanged on ``(r_bar, y_bar)``. With R = 1, ``beta = (1,)``: nothing
is drawn and the composite is the reference itself (the paper's scheme).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from mixpriv.constants import DEFAULT_DIRICHLET_ALPHA
from mixpriv.mixing.bank import ReferenceBank
from mixpriv.validation import InputError, check_references_per_mix

_WEIGHT_SUM_TOLERANCE = 1e-5


def draw_reference_weights(
    references_per_mix: int,
    dirichlet_alpha: float = DEFAULT_DIRICHLET_ALPHA,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw the weights ``beta`` (R,) of R references from a symmetric Dirichlet(alpha).

    With one reference the weight is 1 and nothing is drawn, so the random stream of the
    single-reference scheme is unchanged. Otherwise one integer is drawn from ``generator``
    (torch's global generator when ``None``) to seed the Dirichlet draw: torch's own Dirichlet
    sampler takes no generator.

    Example:
        >>> draw_reference_weights(1)
        tensor([1.])
        >>> beta = draw_reference_weights(3, 1.0, torch.Generator().manual_seed(0))
        >>> beta.shape, bool((beta >= 0).all()), round(float(beta.sum()), 5)
        (torch.Size([3]), True, 1.0)
    """
    references_per_mix, dirichlet_alpha = check_references_per_mix(references_per_mix, dirichlet_alpha)
    if references_per_mix == 1:
        return torch.ones(1)
    seed = int(torch.randint(2**63 - 1, (1,), generator=generator))
    weights = np.random.default_rng(seed).dirichlet(np.full(references_per_mix, dirichlet_alpha))
    return torch.from_numpy(weights).float()


def check_composite(
    indices: Sequence[int], weights: Sequence[float] | torch.Tensor, bank_size: int | None = None
) -> tuple[list[int], torch.Tensor]:
    """Check R reference indices and their weights; return them as a list and a float32 tensor (R,).

    The indices must be distinct (and inside a bank of ``bank_size`` when given); the weights
    non-negative, one per index, and summing to 1.

    Example:
        >>> check_composite([4, 1], [0.25, 0.75])
        ([4, 1], tensor([0.2500, 0.7500]))
        >>> check_composite([4, 4], [0.5, 0.5])
        Traceback (most recent call last):
        ...
        mixpriv.validation.InputError: the references of a mix must be distinct, got indices [4, 4]
    """
    indices = [int(i) for i in indices]
    weights = torch.as_tensor(weights, dtype=torch.float32)
    if not indices:
        raise InputError("a mix needs at least one reference")
    if len(set(indices)) != len(indices):
        raise InputError(f"the references of a mix must be distinct, got indices {indices}")
    outside = [i for i in indices if bank_size is not None and not 0 <= i < bank_size]
    if outside:
        raise InputError(f"reference index {outside[0]} outside a bank of {bank_size} references")
    if weights.shape != (len(indices),):
        raise InputError(f"{len(indices)} references need {len(indices)} weights, got shape {tuple(weights.shape)}")
    if not bool(torch.isfinite(weights).all() & (weights >= 0).all()):
        raise InputError("reference weights must be finite and non-negative")
    if abs(float(weights.sum()) - 1) > _WEIGHT_SUM_TOLERANCE:
        raise InputError(f"reference weights must sum to 1, got a sum of {float(weights.sum()):.6f}")
    return indices, weights


def weighted_sum(volumes: Sequence[torch.Tensor], weights: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """``sum_j weights[j] * volumes[j]``: the composite of R volumes of one shape.

    Example:
        >>> weighted_sum([torch.zeros(2), torch.ones(2)], [0.25, 0.75]).tolist()
        [0.75, 0.75]
    """
    stacked = torch.stack(list(volumes))
    weights = torch.as_tensor(weights, dtype=stacked.dtype, device=stacked.device)
    return (weights.reshape(-1, *([1] * (stacked.ndim - 1))) * stacked).sum(0)


def composite_reference(
    bank: ReferenceBank, indices: Sequence[int], weights: Sequence[float] | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The weighted sum of R references of ``bank``: (image (1, D, H, W), label mixture (C, D, H, W)).

    The label is ``sum_j weights[j] * onehot(y_j)``: a per-voxel distribution, one-hot for a
    single reference (which is returned exactly as :meth:`ReferenceBank.get` gives it).

    Example:
        >>> bank = ReferenceBank(torch.stack([torch.zeros(1, 2, 2, 2), torch.ones(1, 2, 2, 2)]),
        ...                      torch.stack([torch.zeros(2, 2, 2), torch.ones(2, 2, 2)]).long(),
        ...                      {"background": 0, "fg": 1})
        >>> image, label = composite_reference(bank, [0, 1], [0.25, 0.75])
        >>> float(image[0, 0, 0, 0]), label[:, 0, 0, 0].tolist()
        (0.75, [0.25, 0.75])
    """
    indices, weights = check_composite(indices, weights, len(bank))
    images, labels = zip(*(bank.get(i) for i in indices))
    return weighted_sum(images, weights), weighted_sum(labels, weights)


def label_mixture(labels: torch.Tensor, weights: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class distributions of composite references: ``sum_j weights[:, j] * onehot(labels[:, j])``.

    Args:
        labels: (N, R, ...) integer label maps of the R references of each of N composites.
        weights: (N, R) weights of the references (each row sums to 1).
        num_classes: C.

    Returns:
        (N, C, ...) float32: one-hot where R = 1.

    Example:
        >>> labels = torch.tensor([[[0, 1]], [[1, 1]]], dtype=torch.uint8).reshape(1, 2, 2)
        >>> label_mixture(labels, torch.tensor([[0.25, 0.75]]), 2)[0].tolist()
        [[0.25, 0.0], [0.75, 1.0]]
    """
    one_hot = torch.nn.functional.one_hot(labels.long(), num_classes).movedim(-1, 2).float()  # (N, R, C, ...)
    if labels.shape[1] == 1:
        return one_hot[:, 0]
    weights = weights.to(one_hot.device, torch.float32).reshape(*weights.shape, *([1] * (one_hot.ndim - 2)))
    return (weights * one_hot).sum(1)
