"""Attackers that estimate the patient's scan from what the server receives, then retrieve by MS-SSIM.

The server receives a *request*: the K mixtures ``m_k = λ_k·x + (1 − λ_k)·r_k`` of one scan ``x``
(K = 1 without test-time augmentation), where ``r_k`` are secret references (composites of R
references for K-way mixing). Each attacker here turns a request into one volume, its estimate of
the patient; the suite (:mod:`mixpriv.privacy.attackers.suite`) ranks the estimates of all scans by
3D MS-SSIM and scores patient retrieval.

What each attacker knows (never the key, never λ_k):

* ``paper``: one mixture of the request, as it is (the Mixup-Privacy paper's Table 2 attacker);
* ``request-mean``: the mean of the request's K mixtures; the references differ, the target does
  not, so the references average away;
* ``population``: one mixture minus the expected reference, ``(m − (1 − λ̂)·μ) / λ̂``, with μ the
  mean of public scans of the same kind (:class:`Population`) and λ̂ the middle of the model's
  published λ range;
* ``request-population``: the same on the request mean;
* ``request-rank1``: the least-squares rank-1 fit of the K mixtures about the population mean,
  ``m_k − μ ≈ a_k·v`` (:func:`rank_one`): ``v`` is the component all K share, each mixture
  weighted by how much of it it carries (a larger λ_k counts more), unlike the plain mean.

Example:
    >>> import torch
    >>> x, references = torch.rand(6, 6, 6), torch.rand(4, 6, 6, 6)
    >>> lam = torch.tensor([0.3, 0.35, 0.4, 0.45]).reshape(-1, 1, 1, 1)
    >>> request = lam * x + (1 - lam) * references
    >>> population = Population(references.mean(0), lambda_guess=0.375)
    >>> estimates = {name: attack(request, population) for name, attack in VOLUME_ATTACKERS.items()}
    >>> sorted(estimates)
    ['paper', 'population', 'request-mean', 'request-population', 'request-rank1']
    >>> [tuple(v.shape) for v in estimates.values()][0]
    (6, 6, 6)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from mixpriv.validation import InputError, check_lambda_range

__all__ = ["VOLUME_ATTACKERS", "Population", "VolumeAttacker"]


@dataclass(frozen=True)
class Population:
    """What the population attacker knows: the mean public scan and a guess of the target's weight.

    Attributes:
        mean: the voxel-wise mean (D, H, W) of public scans of the same kind, on the key's grid.
        lambda_guess: λ̂, the attacker's guess of the target's weight (the middle of the published range).
    """

    mean: torch.Tensor
    lambda_guess: float

    @classmethod
    def of_scans(cls, images: Sequence[torch.Tensor], lambda_range: tuple[float, float]) -> Population:
        """The population of the attacker's own scans (1, D, H, W), for a model trained with ``lambda_range``.

        Example:
            >>> population = Population.of_scans([torch.zeros(1, 2, 2, 2), torch.ones(1, 2, 2, 2)], (0.2, 0.5))
            >>> float(population.mean.mean()), population.lambda_guess
            (0.5, 0.35)
        """
        if len(images) == 0:
            raise InputError("the population attacker needs at least one public scan")
        low, high = check_lambda_range(lambda_range)
        mean = torch.stack([image.reshape(image.shape[-3:]).float() for image in images]).mean(0)
        return cls(mean, (low + high) / 2)

    def remove_from(self, mixture: torch.Tensor) -> torch.Tensor:
        """``(mixture − (1 − λ̂)·μ) / λ̂``: a mixture (…, D, H, W) without its expected reference."""
        return (mixture - (1 - self.lambda_guess) * self.mean) / self.lambda_guess


#: ``(request (K, D, H, W), population) -> estimate (D, H, W)``.
VolumeAttacker = Callable[[torch.Tensor, Population], torch.Tensor]


def _first(request: torch.Tensor, population: Population) -> torch.Tensor:
    return request[0]


def _mean(request: torch.Tensor, population: Population) -> torch.Tensor:
    return request.mean(0)


def _population(request: torch.Tensor, population: Population) -> torch.Tensor:
    return population.remove_from(request[0])


def _request_population(request: torch.Tensor, population: Population) -> torch.Tensor:
    return population.remove_from(request.mean(0))


def rank_one(request: torch.Tensor, population: Population) -> torch.Tensor:
    """The patient from the least-squares rank-1 fit ``m_k − μ ≈ a_k·v`` of a request's K mixtures.

    ``m_k − μ = λ_k·(x − μ) + (1 − λ_k)·(r_k − μ)``: the first term is shared by all K mixtures
    (one direction, each with its own weight), the references' deviations from the population
    mean are not. ``v`` is the leading right singular vector of the K centred rows (computed from
    their K × K Gram matrix), and the estimate ``μ + v·mean(a_k)/λ̂`` puts it back on the scan's
    scale. Unlike the plain mean, a mixture counts as much as it carries the shared component.

    Example:
        >>> x, mean = torch.rand(4, 4, 4), torch.rand(4, 4, 4)
        >>> lam = torch.tensor([0.3, 0.5]).reshape(-1, 1, 1, 1)
        >>> request = lam * x + (1 - lam) * mean  # references at the population mean
        >>> torch.allclose(rank_one(request, Population(mean, lambda_guess=0.4)), x, atol=1e-5)
        True
    """
    rows = (request - population.mean).reshape(request.shape[0], -1).double()
    eigenvalues, eigenvectors = torch.linalg.eigh(rows @ rows.T)
    coefficients = eigenvectors[:, -1] * eigenvalues[-1].clamp_min(1e-24).sqrt()  # a_k·|v|
    if coefficients.sum() < 0:
        coefficients = -coefficients
    direction = coefficients @ rows / coefficients.square().sum()  # least-squares v for these a_k
    shared = direction * float(coefficients.mean()) / population.lambda_guess
    return population.mean + shared.reshape(request.shape[1:]).float()


#: The volume attackers of the suite, by name.
VOLUME_ATTACKERS: dict[str, VolumeAttacker] = {
    "paper": _first,
    "request-mean": _mean,
    "population": _population,
    "request-population": _request_population,
    "request-rank1": rank_one,
}
