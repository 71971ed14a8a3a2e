"""The BSS attack's results: one attack's scores (:class:`AttackResult`) and the whole audit (:class:`SeparationAudit`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mixpriv.privacy.bss.options import SeparationOptions
from mixpriv.privacy.similarity import MSSSIMSettings

LAMBDA_KNOWN = "λ known"
#: The λ-known attack on a whole request (the K mixtures of one scan separated jointly), run in the sweep.
REQUEST_KNOWN = "λ known, whole request"
LAMBDA_ESTIMATED = "λ estimated"
CONTROL = "control: brain + grating"
ATTACKS = (LAMBDA_KNOWN, LAMBDA_ESTIMATED, CONTROL)


@dataclass
class AttackResult:
    """One attack on ``P`` patches with ``I`` random initialisations each.

    Attributes:
        name: the attack (:data:`ATTACKS`).
        scores: (P, I) MS-SSIM of the recovered target against the true target.
        trivial: (P,) MS-SSIM of the mixture against the target (the no-attack baseline).
        lam: (P,) the true λ (weight of the target).
        lam_used: (P,) the λ given to BASIS (the true one, or the estimate).
        target, reference, mixture: (P, 1, D, H, W) patches (for the control, ``reference`` is the grating).
        recovered: (P, I, 1, D, H, W) the recovered target per init.
        reference_scores: (P, I) MS-SSIM of the recovered second source (the secret reference, or
            the grating) against the true one: the separation works only if both sources come out.
        reference_trivial: (P,) MS-SSIM of the mixture against the second source.
        estimated: whether ``lam_used`` was estimated.
    """

    name: str
    scores: torch.Tensor
    trivial: torch.Tensor
    lam: torch.Tensor
    lam_used: torch.Tensor
    target: torch.Tensor
    reference: torch.Tensor
    mixture: torch.Tensor
    recovered: torch.Tensor
    reference_scores: torch.Tensor
    reference_trivial: torch.Tensor
    estimated: bool = False

    @property
    def mean(self) -> float:
        """Mean MS-SSIM over all patches and inits (the attack as run once)."""
        return float(self.scores.mean())

    @property
    def std(self) -> float:
        """Standard deviation of the MS-SSIM over all patches and inits."""
        return float(self.scores.std(unbiased=False))

    @property
    def best_init_mean(self) -> float:
        """Mean over patches of the best init's MS-SSIM: an oracle that picks the init using the truth."""
        return float(self.scores.max(dim=1).values.mean())

    @property
    def trivial_mean(self) -> float:
        """Mean MS-SSIM(mixture, target)."""
        return float(self.trivial.mean())

    @property
    def trivial_std(self) -> float:
        """Standard deviation of MS-SSIM(mixture, target)."""
        return float(self.trivial.std(unbiased=False))

    @property
    def reference_mean(self) -> float:
        """Mean MS-SSIM of the recovered second source over all patches and inits."""
        return float(self.reference_scores.mean())

    @property
    def reference_trivial_mean(self) -> float:
        """Mean MS-SSIM(mixture, second source)."""
        return float(self.reference_trivial.mean())

    @property
    def lambda_error(self) -> float | None:
        """Mean |λ̂ − λ| (``None`` when λ was known)."""
        return float((self.lam_used - self.lam).abs().mean()) if self.estimated else None

    @property
    def lambda_error_folded(self) -> float | None:
        """Mean |λ̂ − max(λ, 1 − λ)|: the error up to the λ ↔ 1 − λ swap a shared prior cannot see."""
        if not self.estimated:
            return None
        return float((self.lam_used - torch.maximum(self.lam, 1 - self.lam)).abs().mean())

    def figure_patch(self) -> int:
        """The patch shown in the figure: the one whose mean score over inits is the median (a typical one)."""
        means = self.scores.mean(dim=1)
        return int(means.argsort()[(len(means) - 1) // 2])


@dataclass
class SeparationAudit:
    """The BSS attack's results (paper Fig. 4) with the settings needed to read them.

    Attributes:
        attacks: per attack name (:data:`ATTACKS`, the control only if run), its result.
        msssim: the MS-SSIM setting of every score.
        options: the attack's sizes.
        lambda_range: the client's λ range the mixtures were drawn from.
        training_seconds: per prior (``"brain"``, ``"control"``), its training time (0 when reused).
        denoising: per prior, its one-step denoising check on held-out volumes (:func:`~mixpriv.privacy.bss.prior.denoising_check`).
        references_per_mix: references per attacked mixture (K-way mixing).
    """

    attacks: dict[str, AttackResult]
    msssim: MSSSIMSettings
    options: SeparationOptions
    lambda_range: tuple[float, float]
    training_seconds: dict[str, float] = field(default_factory=dict)
    denoising: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    references_per_mix: int = 1
