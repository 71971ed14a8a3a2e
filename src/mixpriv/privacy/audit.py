"""The privacy audit's parts: test-retest reliability and the privacy-utility sweep.

Re-identification is the attacker suite's (:mod:`mixpriv.privacy.attackers`).

Each part runs alone on :class:`~mixpriv.privacy.scans.AuditScans` and returns a small result object
that :mod:`mixpriv.privacy.report` writes out; :func:`mixpriv.privacy.runner.run_audit` chains them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mixpriv.data.folder import DatasetFolder
from mixpriv.evaluation.dice import dice_per_class, foreground_labels
from mixpriv.evaluation.runner import evaluate_models
from mixpriv.inference.pipeline import PrivatePipeline
from mixpriv.lightning.baseline import BaselineSegmenter
from mixpriv.lightning.mixup import MixupPrivacyModule
from mixpriv.mixing.bank import ReferenceBank
from mixpriv.mixing.settings import MixingSettings
from mixpriv.privacy.reidentification import (
    draw_other_references,
)
from mixpriv.privacy.reliability import ICCResult, test_retest
from mixpriv.privacy.scans import AuditScans
from mixpriv.validation import InputError

NO_PROXY = "No proxy"


@dataclass
class TestRetestAudit:
    """Test-retest reliability of the private prediction (Learned, one reference) across two references.

    Attributes:
        icc: per foreground class, ICC(A,1) of the per-case Dice with its 95% interval.
        first, second: per class, the per-case Dice of the first and the second prediction.
        case_ids: the cases, in the order of the Dice lists.
    """

    __test__ = False  # not a pytest class

    icc: dict[str, ICCResult]
    first: dict[str, list[float]] = field(default_factory=dict)
    second: dict[str, list[float]] = field(default_factory=dict)
    case_ids: list[str] = field(default_factory=list)


@torch.no_grad()
def audit_test_retest(
    model: MixupPrivacyModule,
    scans: AuditScans,
    bank: ReferenceBank,
    mixing: MixingSettings | None = None,
    seed: int = 0,
    progress: bool = True,
) -> TestRetestAudit:
    """Segment every labelled scan twice, each time with another reference, and measure agreement.

    Each prediction mixes as ``mixing`` says (default: as the model was trained: its λ range,
    references per mixture and Dirichlet weights), never with a scan of the same patient.

    Example:
        >>> audit = audit_test_retest(model, scans, bank)  # doctest: +SKIP
        >>> audit.icc["GM"].icc  # doctest: +SKIP
        0.9
    """
    if len(bank) < 2:
        raise InputError("test-retest needs a bank with at least two references")
    pipeline = PrivatePipeline.of_model(model, mixing=mixing)
    r = pipeline.mixing.check_bank(len(bank)).references_per_mix
    labels = foreground_labels(model.label_names)
    generator = torch.Generator().manual_seed(seed)
    audit = TestRetestAudit({}, {name: [] for name in labels}, {name: [] for name in labels})
    labelled = [i for i, label in enumerate(scans.labels) if label is not None]
    if len(labelled) < 3:
        raise InputError(f"test-retest needs at least 3 labelled scans, got {len(labelled)}")
    for i in tqdm(labelled, desc="test-retest (two references per scan)", disable=not progress):
        drawn = draw_other_references(bank, scans.case_ids[i], 2 * r, generator, scans.patient_ids[i])
        mixtures = pipeline.mix(scans.images[i], bank, 2, generator, reference_indices=[drawn[:r], drawn[r:]])
        predictions = pipeline.run(mixtures)["learned"].per_reference.argmax(1).cpu()  # one label map per reference
        for dice_lists, prediction in zip((audit.first, audit.second), predictions):
            dice = dice_per_class(prediction, scans.labels[i], model.label_names)
            for name in labels:
                dice_lists[name].append(dice[name])
        audit.case_ids.append(scans.case_ids[i])
    audit.icc = test_retest(audit.first, audit.second)
    return audit


@dataclass
class SweepRow:
    """Privacy and utility of one mixing setting under one request design.

    Attributes:
        setting: the mixing setting.
        reid_map: worst-case re-identification mAP of scans encoded this way, the highest of the
            attacker suite's (lower = more private).
        reid_attacker: the attacker that reached it.
        design: how the client sends the mixtures (:data:`~mixpriv.privacy.attackers.REQUEST_DESIGNS`).
        dice: mean foreground Dice of a model trained for this setting, if one was given: Learned+TTA
            (K mixtures per scan), or Learned under the ``single`` design (one mixture, no TTA).
        model: that model's name.
        bss: mean MS-SSIM of the target recovered by the "λ known" separation attack, if run.
        bss_trivial: mean MS-SSIM of the mixture itself against the target on the same patches.
        bss_request: mean MS-SSIM of the target recovered by separating each target's K mixtures
            jointly (the whole request), if run.
        bss_request_trivial: mean MS-SSIM of the request's mean against the target.
    """

    setting: MixingSettings
    reid_map: float
    reid_attacker: str
    design: str = "request"
    dice: float | None = None
    model: str | None = None
    bss: float | None = None
    bss_trivial: float | None = None
    bss_request: float | None = None
    bss_request_trivial: float | None = None

    @property
    def name(self) -> str:
        """The setting's name, with the design unless it is the plain request."""
        return self.setting.name if self.design == "request" else f"{self.setting.name} · {self.design}"


@dataclass
class SweepAudit:
    """The privacy-utility sweep and the setting it recommends.

    Attributes:
        rows: one per setting.
        baseline_dice: the non-private baseline's mean foreground Dice on the same scans, if measured.
        dice_cases: number of scans the Dice were measured on.
        k: TTA references used for the Dice (except under the ``single`` design).
    """

    rows: list[SweepRow]
    baseline_dice: float | None = None
    dice_cases: int = 0
    k: int = 8

    def recommended(self, tolerance: float = 0.01) -> SweepRow | None:
        """The most private row (lowest worst-case re-identification mAP) whose Dice is within ``tolerance`` of
        the baseline; ``None`` when no row with a measured Dice qualifies.

        Example:
            >>> rows = [SweepRow(MixingSettings((0.65, 0.95)), 0.9, "paper", dice=0.90),
            ...         SweepRow(MixingSettings((0.5, 0.8)), 0.4, "learned", dice=0.895),
            ...         SweepRow(MixingSettings((0.35, 0.65)), 0.2, "learned", dice=0.85)]
            >>> SweepAudit(rows, baseline_dice=0.903).recommended().setting.name
            'λ∈[0.5, 0.8]'
        """
        if self.baseline_dice is None:
            return None
        eligible = [row for row in self.rows if row.dice is not None and row.dice >= self.baseline_dice - tolerance]
        return min(eligible, key=lambda row: row.reid_map, default=None)


def private_dice(
    models: Sequence[MixupPrivacyModule],
    baseline: BaselineSegmenter | None,
    folder: DatasetFolder,
    bank: ReferenceBank,
    out_dir: Path,
    k: int = 8,
    max_cases: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> tuple[list[dict[str, float]], float | None]:
    """Learned and Learned+TTA mean foreground Dice of each model on the test split, and the baseline's.

    Each model is evaluated with its own mixing setting (read from its hparams) on the same scans;
    the full evaluation of each (table, figures) is written under ``out_dir/<index>-<model name>``.

    Example:
        >>> dice, baseline_dice = private_dice([model], baseline, folder, bank, Path("out"))  # doctest: +SKIP
        >>> sorted(dice[0])  # doctest: +SKIP
        ['Learned', 'Learned+TTA']
    """
    dice = []
    baseline_dice = None
    for index, model in enumerate(models):
        name = getattr(model, "model_card", {}).get("name", "model")
        result = evaluate_models(baseline if index == 0 else None, model, folder, bank, out_dir / f"{index}-{name}",
                                 k=k, seed=seed, max_cases=max_cases, progress=progress)
        aggregate = result.table.aggregate()
        dice.append({row: aggregate[row]["mean"]["mean"] for row in ("Learned", "Learned+TTA")})
        if "Baseline" in aggregate:
            baseline_dice = aggregate["Baseline"]["mean"]["mean"]
    return dice, baseline_dice
