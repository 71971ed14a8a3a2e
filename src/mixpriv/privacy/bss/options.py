"""The sizes of the BSS attack: patches, initialisations, noise levels, λ grid and score network."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mixpriv.privacy.score_network import build_score_network, geometric_sigmas
from mixpriv.privacy.separation import check_stability
from mixpriv.validation import InputError


def _default_candidates() -> tuple[float, ...]:
    return tuple(round(0.55 + 0.05 * k, 2) for k in range(9))


@dataclass
class SeparationOptions:
    """Sizes of the BSS attack (defaults: the audit's; BASIS's own defaults for the Langevin part).

    Attributes:
        patch_size: side of the cubic patches attacked and trained on.
        num_patches: patches attacked (one random test scan and reference each).
        inits: random initialisations of BASIS per patch.
        sweep_inits: random initialisations per patch of the privacy-utility sweep's attack, one
            per mixing setting (:func:`~mixpriv.privacy.bss.audit.attack_setting`); 1 scores the attack as run once.
        score_steps: optimisation steps of each score network.
        batch_size: patches per score-matching batch.
        num_levels, sigma_max, sigma_min: the geometric noise levels (training and Langevin).
        steps_per_level: Langevin steps per noise level (T).
        delta: Langevin step size at the last level (needs ``delta / sigma_min² · (λ² + (1 − λ)²) < 2``).
        lambda_candidates: λ grid of the "λ estimated" attack. It lies on one side of 0.5 because
            the same prior for both sources cannot tell λ from 1 − λ (swapping the sources).
        lambda_steps_per_level: Langevin steps per level of each short separation of the λ search.
        control: also run the positive control (brain + grating, needs a second prior).
        control_lambda: weight of the brain patch in the control's mixtures (0.5: equal weights);
            ``None`` uses the attacked mixtures' λ.
        network: score network spec (``None``: :class:`~mixpriv.privacy.score_network.ScoreNetSpec` defaults).
        min_mean: smallest mean intensity of a patch counted as brain-containing.

    Raises:
        InputError: for a non-positive size, bad noise levels, an unstable ``delta`` or λ grid.

    Example:
        >>> SeparationOptions().lambda_candidates[:3]
        (0.55, 0.6, 0.65)
        >>> SeparationOptions(inits=0)
        Traceback (most recent call last):
        ...
        mixpriv.validation.InputError: inits must be a positive integer, got 0
    """

    patch_size: int = 32
    num_patches: int = 8
    inits: int = 3
    sweep_inits: int = 1
    score_steps: int = 2000
    batch_size: int = 8
    num_levels: int = 10
    sigma_max: float = 1.0
    sigma_min: float = 0.01
    steps_per_level: int = 100
    delta: float = 3e-5
    lambda_candidates: tuple[float, ...] = field(default_factory=_default_candidates)
    lambda_steps_per_level: int = 20
    control: bool = True
    control_lambda: float | None = 0.5
    network: dict | None = None
    min_mean: float = 0.05

    def __post_init__(self) -> None:
        for name in ("num_patches", "inits", "sweep_inits", "score_steps", "batch_size", "steps_per_level",
                     "lambda_steps_per_level"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.patch_size, bool) or not isinstance(self.patch_size, int) or self.patch_size < 3:
            raise InputError(f"patch_size must be an integer of at least 3 (MS-SSIM's window), got {self.patch_size!r}")
        self.sigmas()  # validates num_levels and the sigma range
        if self.num_levels < 2:
            raise InputError(f"num_levels must be at least 2, got {self.num_levels}")
        candidates = tuple(float(c) for c in self.lambda_candidates)
        if not candidates or not all(0 < c <= 1 for c in candidates):
            raise InputError(f"lambda_candidates must be a non-empty list of values in (0, 1], got {candidates}")
        if min(candidates) < 0.5 < max(candidates):
            raise InputError(f"lambda_candidates must lie on one side of 0.5 (the shared prior cannot tell λ from "
                             f"1 − λ), got {candidates}")
        self.lambda_candidates = candidates
        check_stability(self.delta, self.sigma_min, torch.tensor(candidates))
        if self.control_lambda is not None:
            if isinstance(self.control_lambda, bool) or not 0 < self.control_lambda < 1:
                raise InputError(f"control_lambda must lie in (0, 1) or be None, got {self.control_lambda!r}")
            self.control_lambda = float(self.control_lambda)
            check_stability(self.delta, self.sigma_min, torch.tensor([self.control_lambda]))
        depth = len(build_score_network(self.network).spec.channels)  # validates the spec
        if self.patch_size < 2 ** (depth - 1):
            raise InputError(f"patch_size {self.patch_size} is too small for a score network of {depth} levels "
                             f"(it halves the patch {depth - 1} times): take at least {2 ** (depth - 1)}")
        if self.min_mean < 0:
            raise InputError(f"min_mean must be non-negative, got {self.min_mean}")

    def sigmas(self) -> torch.Tensor:
        """The noise levels ``sigma_1 > ... > sigma_L``."""
        return geometric_sigmas(self.sigma_max, self.sigma_min, self.num_levels)
