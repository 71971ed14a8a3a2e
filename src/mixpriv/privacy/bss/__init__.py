"""The blind-source-separation (BSS) attack on encoded scans, with its positive control (paper Fig. 4).

The client sends ``m = λ·x + (1 − λ)·r``: its scan ``x`` mixed with a secret reference ``r``. The
attacker trains a 3D score network on brain patches (:func:`train_score_prior`) and separates
patches of ``m`` with BASIS (:func:`~mixpriv.privacy.separation.basis_separate`), the same prior for
both sources, either knowing λ ("λ known", the strongest attacker) or estimating it by a grid
search (``"λ estimated"``, :func:`~mixpriv.privacy.lambda_search.estimate_lambda`). An evaluator who
knows the truth pairs the outputs with the sources (:func:`~mixpriv.privacy.separation.match_sources`)
and scores the recovered target by 3D MS-SSIM against the true one.

Reading rule: the attack *recovers* the target only where its MS-SSIM clearly exceeds the trivial
baseline MS-SSIM(mixture, target): the mixture itself already resembles the target (λ ≥ 0.5).

Positive control ("control: brain + grating"): a brain patch mixed with a grating volume
(:mod:`mixpriv.privacy.control`), by default with equal weights (``control_lambda = 0.5``, both
sources clearly present), separated with the brain prior for source 1 and a grating prior for
source 2. A working attack must recover both sources there; if it does not, a low score on
brain + brain mixtures says nothing about privacy. (``control_lambda=None`` mixes with the
client's λ draws instead: there the grating has weight 1 − λ ≤ 0.35 and annealed Langevin
dynamics settle on a wrong grating early, at noise levels that hide it, which the brain source
then absorbs; the brain, the large-weight source, is still recovered.)

The privacy-utility sweep scores each mixing setting (λ range, number of references) with the
λ-known attack on the same target patches (:func:`attack_setting`).

A shared prior cannot tell λ from 1 − λ (swap the two sources), so the λ grid of
:class:`SeparationOptions` lies on one side of 0.5; the λ error is reported both as |λ̂ − λ| and
"folded" as |λ̂ − max(λ, 1 − λ)|, which is what a symmetric attack can at best achieve.

Example:
    >>> audit = audit_separation(test_images, bank_images, train_images, (0.65, 0.95),
    ...                          SeparationOptions(), out_dir="audit/bss")  # doctest: +SKIP
    >>> from mixpriv.privacy.report import separation_section
    >>> data, lines = separation_section(audit, Path("audit"))  # doctest: +SKIP
"""

from mixpriv.privacy.bss.audit import attack_requests, attack_setting, audit_separation
from mixpriv.privacy.bss.options import SeparationOptions
from mixpriv.privacy.bss.patches import (
    draw_mixtures,
    draw_patches,
    draw_request_mixtures,
)
from mixpriv.privacy.bss.prior import TRAINING_FILE, denoising_check, train_score_prior
from mixpriv.privacy.bss.results import (
    ATTACKS,
    CONTROL,
    LAMBDA_ESTIMATED,
    LAMBDA_KNOWN,
    REQUEST_KNOWN,
    AttackResult,
    SeparationAudit,
)

__all__ = ["ATTACKS", "CONTROL", "LAMBDA_ESTIMATED", "LAMBDA_KNOWN", "REQUEST_KNOWN", "TRAINING_FILE", "AttackResult",
           "SeparationAudit", "SeparationOptions", "attack_requests", "attack_setting", "audit_separation",
           "denoising_check", "draw_mixtures", "draw_patches", "draw_request_mixtures", "train_score_prior"]
