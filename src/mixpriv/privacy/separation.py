"""Blind source separation of a mixture ``m = lam * x1 + (1 - lam) * x2`` by BASIS.

BASIS (Jayaram & Thickstun 2020) samples both sources from their posterior given the
mixture with annealed Langevin dynamics. Each source has its own prior, given by a
noise-conditional score function ``score(x, sigma)``; the mixture enters through the
Gaussian likelihood ``N(m; a x1 + b x2, sigma_i^2 I)`` whose width shrinks with the noise
level (``a = lam``, ``b = 1 - lam``)::

    x1, x2 ~ U[clamp] (U[0, 1] without clamp)
    for sigma_i in sigma_1 > ... > sigma_L:
        eta = delta * (sigma_i / sigma_L)^2
        repeat steps_per_level times:
            x1 += eta * (score_1(x1, sigma_i) - a * r / sigma_i^2) + sqrt(2 eta) * noise   (r = a x1 + b x2 - m)
            x2 += eta * (score_2(x2, sigma_i) - b * r / sigma_i^2) + sqrt(2 eta) * noise   (r recomputed)
    clamp both to the data range

In the mixpriv attack both scores are the same brain-MRI network: source 1 is the patient
(weight ``lam``), source 2 the secret reference. Nothing tells the attacker which output
is which: :func:`match_sources` lets an evaluator, who knows the truth, pair them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from mixpriv.privacy.score_network import ScoreFn
from mixpriv.validation import InputError, check_finite, check_lambda

SimilarityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

class Separation(NamedTuple):
    """The two recovered sources, each (N, C, D, H, W): ``source_1`` has weight lam."""

    source_1: torch.Tensor
    source_2: torch.Tensor


def check_mixture(mixture: torch.Tensor) -> None:
    if mixture.ndim != 5:
        raise InputError(f"mixture must be a batch (N, C, D, H, W), got shape {tuple(mixture.shape)}")
    check_finite(mixture, "mixture")


def check_sigmas(sigmas: Sequence[float] | torch.Tensor) -> torch.Tensor:
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1)
    if sigmas.numel() == 0 or not bool((sigmas > 0).all()) or not bool(torch.isfinite(sigmas).all()):
        raise InputError(f"sigmas must be a non-empty list of positive finite levels, got {sigmas.tolist()}")
    if not bool((sigmas[1:] < sigmas[:-1]).all()):
        raise InputError(f"sigmas must decrease strictly (sigma_1 > ... > sigma_L), got {sigmas.tolist()}")
    return sigmas


def mixing_weights(lam: float | torch.Tensor, mixture: torch.Tensor) -> torch.Tensor:
    """The weight ``a = lam`` of source 1 per mixture, shaped (N, 1, 1, 1, 1) to broadcast.

    Example:
        >>> mixing_weights(0.7, torch.zeros(2, 1, 4, 4, 4)).flatten()
        tensor([0.7000, 0.7000])
    """
    check_lambda(lam, "lam")
    lam = torch.as_tensor(lam, dtype=mixture.dtype, device=mixture.device).reshape(-1)
    if lam.numel() not in (1, mixture.shape[0]):
        raise InputError(f"lam must be a scalar or hold one value per mixture ({mixture.shape[0]}), got {lam.numel()}")
    return lam.expand(mixture.shape[0]).reshape((-1,) + (1,) * (mixture.ndim - 1))


def check_stability(delta: float, sigma_min: float, a: torch.Tensor) -> None:
    """Refuse a step size for which the step on the mixture residual diverges.

    With ``eta_i = delta (sigma_i / sigma_L)^2`` the residual term moves the pair by
    ``delta / sigma_L^2 * (a^2 + b^2)`` times the residual at every level; it must stay below 2.

    Example:
        >>> check_stability(3e-5, 0.01, torch.tensor([0.7]))
        >>> check_stability(4e-4, 0.01, torch.tensor([0.7]))
        Traceback (most recent call last):
        ...
        mixpriv.validation.InputError: unstable BASIS step: delta / sigma_L^2 * (a^2 + b^2) = 4 * 0.58 = 2.32 >= 2 (the mixture residual diverges); take delta < 0.000345
    """
    if delta <= 0:
        raise InputError(f"delta must be positive, got {delta}")
    gain = float((a**2 + (1 - a) ** 2).max())
    factor = delta / sigma_min**2
    if factor * gain >= 2:
        raise InputError(f"unstable BASIS step: delta / sigma_L^2 * (a^2 + b^2) = {factor:.3g} * {gain:.3g} = "
                         f"{gain * factor:.3g} >= 2 (the mixture residual diverges); take delta < "
                         f"{2 * sigma_min**2 / gain:.3g}")


def _uniform_init(
    mixture: torch.Tensor, clamp: tuple[float, float] | None, generator: torch.Generator | None
) -> torch.Tensor:
    low, high = clamp if clamp is not None else (0.0, 1.0)
    draw = torch.rand(mixture.shape, generator=generator, device=mixture.device, dtype=mixture.dtype)
    return low + (high - low) * draw


def _langevin_step(x: torch.Tensor, drift: torch.Tensor, eta: float | torch.Tensor,
                   generator: torch.Generator | None) -> torch.Tensor:
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x + eta * drift + (2 * eta) ** 0.5 * noise


def _check_clamp(clamp: tuple[float, float] | None) -> None:
    if clamp is not None and not (len(clamp) == 2 and clamp[0] < clamp[1]):
        raise InputError(f"clamp must be None or (low, high) with low < high, got {clamp}")


def basis_separate(
    mixture: torch.Tensor,
    score_1: ScoreFn,
    score_2: ScoreFn,
    lam: float | torch.Tensor,
    sigmas: Sequence[float] | torch.Tensor,
    steps_per_level: int = 100,
    delta: float = 3e-5,
    generator: torch.Generator | None = None,
    clamp: tuple[float, float] | None = (0.0, 1.0),
    progress: bool = True,
) -> Separation:
    """Separate mixtures ``m = lam * x1 + (1 - lam) * x2`` by annealed Langevin dynamics (BASIS).

    Batched over the N mixtures; for several random starts of one mixture, pass it repeated.

    Args:
        mixture: mixtures (N, C, D, H, W).
        score_1, score_2: prior scores ``(x, sigma) -> grad log p_sigma(x)`` of each source.
        lam: weight of source 1, a scalar or one per mixture, in (0, 1].
        sigmas: noise levels, strictly decreasing (e.g. :func:`geometric_sigmas`).
        steps_per_level: Langevin steps per level (T).
        delta: step size at the last level; needs ``delta / sigma_L^2 * (a^2 + b^2) < 2``.
        generator: random generator (on the mixture's device) for the start and the noise.
        clamp: data range the outputs are clamped to (and the start drawn from); ``None``: no clamp.
        progress: show a tqdm bar over the L * T steps.

    Raises:
        InputError: a malformed mixture, lam, sigmas or clamp, or an unstable ``delta``.

    Example:
        >>> gaussian = lambda x, sigma: -(x - 0.5) / (0.1 ** 2 + sigma ** 2)
        >>> m = torch.full((1, 1, 2, 2, 2), 0.5)
        >>> out = basis_separate(m, gaussian, gaussian, 0.7, [1.0, 0.1, 0.01], steps_per_level=50, progress=False,
        ...                      generator=torch.Generator().manual_seed(0))
        >>> out.source_1.shape, float((0.7 * out.source_1 + 0.3 * out.source_2 - m).abs().max()) < 0.05
        (torch.Size([1, 1, 2, 2, 2]), True)
    """
    check_mixture(mixture)
    _check_clamp(clamp)
    levels = check_sigmas(sigmas).tolist()
    if steps_per_level < 1:
        raise InputError(f"steps_per_level must be positive, got {steps_per_level}")
    a = mixing_weights(lam, mixture)
    b = 1 - a
    check_stability(delta, levels[-1], a)
    x1, x2 = _uniform_init(mixture, clamp, generator), _uniform_init(mixture, clamp, generator)
    with torch.no_grad(), tqdm(total=len(levels) * steps_per_level, desc="BASIS", disable=not progress) as bar:
        for sigma in levels:
            eta, weight = delta * (sigma / levels[-1]) ** 2, 1.0 / sigma**2
            for _ in range(steps_per_level):
                x1 = _langevin_step(x1, score_1(x1, sigma) - weight * a * (a * x1 + b * x2 - mixture), eta, generator)
                x2 = _langevin_step(x2, score_2(x2, sigma) - weight * b * (a * x1 + b * x2 - mixture), eta, generator)
                bar.update()
    if clamp is not None:
        x1, x2 = x1.clamp(*clamp), x2.clamp(*clamp)
    return Separation(x1, x2)


def basis_separate_request(
    mixtures: torch.Tensor,
    score: ScoreFn,
    lam: torch.Tensor,
    sigmas: Sequence[float] | torch.Tensor,
    steps_per_level: int = 100,
    delta: float = 3e-5,
    generator: torch.Generator | None = None,
    clamp: tuple[float, float] | None = (0.0, 1.0),
    progress: bool = True,
) -> Separation:
    """BASIS on a whole request: K mixtures ``m_k = lam_k * x + (1 - lam_k) * r_k`` that share one target.

    The attacker who holds a request separates its K mixtures jointly: one target ``x`` and K
    references ``r_k``, all with the brain prior ``score``, each mixture a Gaussian likelihood
    as in :func:`basis_separate`. The target's likelihood is K times as sharp, so its Langevin
    step is divided by ``sum_k lam_k^2`` (a constant preconditioner: the same posterior, and a
    step as stable as the single-mixture one).

    Args:
        mixtures: N requests of K mixtures, (N, K, C, D, H, W).
        score: the prior score ``(x, sigma) -> grad log p_sigma(x)`` of target and references.
        lam: the target's weight in each mixture, (N, K), in (0, 1].
        sigmas, steps_per_level, delta, generator, clamp, progress: as for :func:`basis_separate`.

    Returns:
        ``source_1``: the targets (N, C, D, H, W); ``source_2``: the references (N, K, C, D, H, W).

    Example:
        >>> gaussian = lambda x, sigma: -(x - 0.5) / (0.1 ** 2 + sigma ** 2)
        >>> m = torch.full((1, 3, 1, 2, 2, 2), 0.5)
        >>> out = basis_separate_request(m, gaussian, torch.tensor([[0.3, 0.4, 0.5]]), [1.0, 0.1, 0.01],
        ...                              steps_per_level=50, generator=torch.Generator().manual_seed(0), progress=False)
        >>> out.source_1.shape, out.source_2.shape
        (torch.Size([1, 1, 2, 2, 2]), torch.Size([1, 3, 1, 2, 2, 2]))
    """
    if mixtures.ndim != 6:
        raise InputError(f"requests must have shape (N, K, C, D, H, W), got {tuple(mixtures.shape)}")
    n, k = mixtures.shape[:2]
    check_finite(mixtures, "requests")
    _check_clamp(clamp)
    levels = check_sigmas(sigmas).tolist()
    lam = torch.as_tensor(lam, dtype=mixtures.dtype, device=mixtures.device)
    if lam.shape != (n, k):
        raise InputError(f"lam must hold one weight per mixture, shape {(n, k)}, got {tuple(lam.shape)}")
    check_lambda(lam, "lam")
    check_stability(delta, levels[-1], lam.flatten())
    a = lam.reshape(n, k, 1, 1, 1, 1)
    b = 1 - a
    precondition = 1 / a.square().sum(1).clamp_min(1.0)  # (N, 1, 1, 1, 1)
    x = _uniform_init(mixtures[:, 0], clamp, generator)
    references = _uniform_init(mixtures, clamp, generator)
    with torch.no_grad(), tqdm(total=len(levels) * steps_per_level, desc="BASIS (request)", disable=not progress) as bar:
        for sigma in levels:
            eta, weight = delta * (sigma / levels[-1]) ** 2, 1.0 / sigma**2
            for _ in range(steps_per_level):
                residual = a * x[:, None] + b * references - mixtures
                x = _langevin_step(x, score(x, sigma) - weight * (a * residual).sum(1), eta * precondition, generator)
                residual = a * x[:, None] + b * references - mixtures
                prior = score(references.flatten(0, 1), sigma).reshape(references.shape)
                references = _langevin_step(references, prior - weight * b * residual, eta, generator)
                bar.update()
    if clamp is not None:
        x, references = x.clamp(*clamp), references.clamp(*clamp)
    return Separation(x, references)


def match_sources(
    recovered_1: torch.Tensor,
    recovered_2: torch.Tensor,
    true_1: torch.Tensor,
    true_2: torch.Tensor,
    score_fn: SimilarityFn,
) -> Separation:
    """Pair the recovered sources with the true ones, per mixture, by the better permutation.

    Args:
        recovered_1, recovered_2: the separation's outputs (N, C, D, H, W).
        true_1, true_2: the true sources, same shape.
        score_fn: similarity ``(a, b) -> (N,)``, higher is better (e.g. 3D MS-SSIM per sample).

    Returns:
        The recovered pair ordered so that ``source_1`` goes with ``true_1``.

    Example:
        >>> t1, t2 = torch.zeros(2, 1, 2, 2, 2), torch.ones(2, 1, 2, 2, 2)
        >>> similarity = lambda a, b: -(a - b).abs().flatten(1).mean(1)
        >>> matched = match_sources(t2 + 0.1, t1 + 0.1, t1, t2, similarity)
        >>> torch.allclose(matched.source_1, t1 + 0.1)
        True
    """
    shape = recovered_1.shape
    if any(t.shape != shape for t in (recovered_2, true_1, true_2)):
        raise InputError(f"recovered and true sources must share one shape, got {tuple(shape)}, "
                         f"{tuple(recovered_2.shape)}, {tuple(true_1.shape)}, {tuple(true_2.shape)}")
    kept = score_fn(recovered_1, true_1) + score_fn(recovered_2, true_2)
    swapped = score_fn(recovered_2, true_1) + score_fn(recovered_1, true_2)
    swap = (swapped > kept).reshape((-1,) + (1,) * (recovered_1.ndim - 1))
    return Separation(torch.where(swap, recovered_2, recovered_1), torch.where(swap, recovered_1, recovered_2))
