"""The attacker's estimate of λ: separate at every candidate weight, keep the most plausible.

The energy of a candidate is how implausible its two recovered sources are under their priors
(:func:`prior_energy`, a score-matching surrogate of ``-log p``) plus how badly they explain the
mixture (:func:`separation_energy`); :func:`estimate_lambda` returns the candidate of least energy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from mixpriv.privacy.score_network import ScoreFn
from mixpriv.privacy.separation import Separation, basis_separate, check_mixture, check_sigmas, mixing_weights
from mixpriv.validation import InputError

DEFAULT_LAMBDA_CANDIDATES = tuple(round(0.05 * k, 2) for k in range(1, 20))


class LambdaEstimate(NamedTuple):
    """Result of :func:`estimate_lambda`: ``lam`` (N,), the ``candidates`` (K,), ``energy`` (N, K)."""

    lam: torch.Tensor
    candidates: torch.Tensor
    energy: torch.Tensor


def prior_energy(
    x: torch.Tensor,
    score: ScoreFn,
    sigmas: Sequence[float] | torch.Tensor,
    num_probes: int = 1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A score-matching surrogate of ``-log p(x)`` (up to a constant), per sample (N,).

    A score network has no density, but the denoising bound of score-based models
    (Song et al. 2021, VE SDE with geometric sigmas) gives one up to an x-free constant::

        E(x) = log(sigma_1 / sigma_L) * mean_i E_eps ||sigma_i * s(x + sigma_i eps, sigma_i) + eps||^2
               + ||x||^2 / (2 sigma_1^2)

    (the mean over the levels approximates the integral over log sigma; the last term is
    the N(0, sigma_1^2) prior at the largest level). ``num_probes`` noise draws per level;
    every sample gets the same draws (common random numbers), so energies of different
    candidates compare with less noise. Cost: ``L * num_probes`` score evaluations.

    Example:
        >>> gaussian = lambda x, sigma: -(x - 0.5) / (0.1 ** 2 + sigma ** 2)
        >>> x = torch.stack([torch.full((1, 2, 2, 2), 0.5), torch.full((1, 2, 2, 2), 0.9)])
        >>> energy = prior_energy(x, gaussian, [1.0, 0.1, 0.01], generator=torch.Generator().manual_seed(0))
        >>> bool(energy[0] < energy[1])
        True
    """
    levels = check_sigmas(sigmas).tolist()
    if num_probes < 1:
        raise InputError(f"num_probes must be positive, got {num_probes}")
    per_level = []
    with torch.no_grad():
        for sigma in levels:
            for _ in range(num_probes):
                noise = torch.randn((1, *x.shape[1:]), generator=generator, device=x.device, dtype=x.dtype)
                error = sigma * score(x + sigma * noise, sigma) + noise
                per_level.append(error.pow(2).flatten(1).sum(1))
    denoising = math.log(levels[0] / levels[-1]) * torch.stack(per_level).mean(0)
    return denoising + x.pow(2).flatten(1).sum(1) / (2 * levels[0] ** 2)


def separation_energy(
    mixture: torch.Tensor,
    separation: Separation,
    lam: float | torch.Tensor,
    score_1: ScoreFn,
    score_2: ScoreFn,
    sigmas: Sequence[float] | torch.Tensor,
    num_probes: int = 1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Residual energy ``||a x1 + b x2 - m||^2 / (2 sigma_L^2)`` plus both prior energies, per mixture (N,).

    A surrogate of ``-log p(x1, x2, m | lam)`` at the recovered pair (see :func:`prior_energy`).

    Example:
        >>> gaussian = lambda x, sigma: -(x - 0.5) / (0.1 ** 2 + sigma ** 2)
        >>> m = torch.full((1, 1, 2, 2, 2), 0.5)
        >>> good = Separation(m.clone(), m.clone())
        >>> bad = Separation(m + 0.2, m.clone())
        >>> energies = [separation_energy(m, s, 0.7, gaussian, gaussian, [1.0, 0.1, 0.01],
        ...                               generator=torch.Generator().manual_seed(0)) for s in (good, bad)]
        >>> bool(energies[0] < energies[1])
        True
    """
    levels = check_sigmas(sigmas)
    a = mixing_weights(lam, mixture)
    residual = a * separation.source_1 + (1 - a) * separation.source_2 - mixture
    likelihood = residual.pow(2).flatten(1).sum(1) / (2 * float(levels[-1]) ** 2)
    return (likelihood + prior_energy(separation.source_1, score_1, levels, num_probes, generator)
            + prior_energy(separation.source_2, score_2, levels, num_probes, generator))


def estimate_lambda(
    mixture: torch.Tensor,
    score_1: ScoreFn,
    score_2: ScoreFn,
    sigmas: Sequence[float] | torch.Tensor,
    candidates: Sequence[float] | torch.Tensor = DEFAULT_LAMBDA_CANDIDATES,
    steps_per_level: int = 20,
    delta: float = 3e-5,
    num_probes: int = 1,
    generator: torch.Generator | None = None,
    clamp: tuple[float, float] | None = (0.0, 1.0),
    progress: bool = False,
) -> LambdaEstimate:
    """Estimate an unknown mixing weight by a grid search over candidate values of lam.

    For every mixture and candidate, a short BASIS separation (``steps_per_level`` steps
    per level) is run and scored with :func:`separation_energy`; the candidate of lowest
    energy wins. This is a MAP-style choice at one posterior sample, not the marginal
    likelihood of lam. With the same prior for both sources (the mixpriv attack), lam and
    1 - lam are indistinguishable: give candidates on one side of 0.5.

    Cost: the N * K separations run as one batch, i.e. ``L * (2 * steps_per_level +
    2 * num_probes)`` score evaluations on a batch of N * K volumes (K candidates).

    Args:
        mixture: mixtures (N, C, D, H, W).
        score_1, score_2, sigmas, delta, generator, clamp, progress: as in :func:`basis_separate`.
        candidates: the grid of lam values, each in (0, 1].
        steps_per_level: Langevin steps per level of each short separation.
        num_probes: noise draws per level in :func:`prior_energy`.

    Example:
        >>> low = lambda x, sigma: -(x - 0.2) / (0.02 ** 2 + sigma ** 2)
        >>> high = lambda x, sigma: -(x - 0.8) / (0.02 ** 2 + sigma ** 2)
        >>> m = torch.full((1, 1, 2, 2, 2), 0.7 * 0.2 + 0.3 * 0.8)
        >>> estimate = estimate_lambda(m, low, high, [1.0, 0.1, 0.01], candidates=[0.3, 0.5, 0.7, 0.9],
        ...                            generator=torch.Generator().manual_seed(0))
        >>> estimate.lam, estimate.energy.shape
        (tensor([0.7000]), torch.Size([1, 4]))
    """
    check_mixture(mixture)
    grid = torch.as_tensor(candidates, dtype=mixture.dtype, device=mixture.device).reshape(-1)
    if grid.numel() == 0:
        raise InputError("candidates is empty")
    n, k = mixture.shape[0], grid.numel()
    mixtures = mixture.repeat_interleave(k, dim=0)
    lams = grid.repeat(n)
    separation = basis_separate(mixtures, score_1, score_2, lams, sigmas, steps_per_level, delta, generator, clamp,
                                progress)
    energy = separation_energy(mixtures, separation, lams, score_1, score_2, sigmas, num_probes, generator).reshape(n, k)
    return LambdaEstimate(grid[energy.argmin(dim=1)], grid, energy)
