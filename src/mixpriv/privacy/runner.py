"""``mixpriv audit``: run the privacy audit's parts on a dataset folder and write the report.

Example:
    >>> from mixpriv.privacy.runner import AuditOptions, run_audit
    >>> paths = run_audit("tissue-mixpriv-2mm", None, "audit", AuditOptions(parts=("reid",)))  # doctest: +SKIP
    >>> paths["markdown"]  # doctest: +SKIP
    PosixPath('audit/report.md')
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mixpriv.constants import AUDIT_PARTS, DEFAULT_LAMBDA_RANGE, TEST
from mixpriv.data.datamodule import bank_from_cases, resolve_data_dir
from mixpriv.data.folder import DatasetFolder
from mixpriv.lightning.mixup import MixupPrivacyModule
from mixpriv.mixing.bank import ReferenceBank
from mixpriv.privacy.audit import MixingSetting, audit_reidentification, audit_test_retest
from mixpriv.privacy.report import reidentification_section, test_retest_section, write_report
from mixpriv.privacy.scans import load_scans
from mixpriv.validation import InputError

log = logging.getLogger(__name__)

@dataclass
class AuditOptions:
    """What the audit runs and how big it is (the defaults are the embedded cohort's full audit).

    Attributes:
        parts: any of ``reid`` (re-identification), ``icc`` (test-retest), ``bss`` (blind source
            separation with its positive control), ``sweep`` (privacy-utility sweep).
        split: the split whose scans are attacked.
        max_cases: at most this many scans (``None``: all).
        seed: seed of every random draw (references, λ, attack initialisations).
        extra_settings: mixing settings re-identified besides the model's own.
    """

    parts: Sequence[str] = AUDIT_PARTS
    split: str = TEST
    max_cases: int | None = None
    seed: int = 0
    extra_settings: Sequence[MixingSetting] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.parts) - set(AUDIT_PARTS))
        if unknown:
            raise InputError(f"unknown audit part(s) {unknown}; choose from {list(AUDIT_PARTS)}")


def model_setting(model: MixupPrivacyModule) -> MixingSetting:
    """The mixing setting a model was trained for (and is used with)."""
    low, high = model.hparams.get("lambda_range", DEFAULT_LAMBDA_RANGE)
    return MixingSetting((float(low), float(high)), int(model.hparams.get("references_per_mix", 1)))


def run_audit(
    model: str | Path | MixupPrivacyModule,
    data_dir: str | Path | None,
    out_dir: str | Path,
    options: AuditOptions | None = None,
    bank: ReferenceBank | None = None,
    progress: bool = True,
) -> dict[str, Path]:
    """Run the chosen parts of the audit and write ``report.md``, ``report.json`` and the figures.

    Args:
        model: a Mixup-Privacy model (name, folder or URL for :func:`mixpriv.from_pretrained`, or loaded).
        data_dir: an nnU-Net v2 folder; ``None`` for the embedded cohort.
        out_dir: where the report goes.
        options: parts and sizes (default: everything).
        bank: the references the client encodes with (default: the folder's training split).
        progress: show progress bars.
    """
    from mixpriv.hub import from_pretrained

    options = options or AuditOptions()
    if not isinstance(model, MixupPrivacyModule):
        model = from_pretrained(model)
    if not isinstance(model, MixupPrivacyModule):
        raise InputError("the audit needs a Mixup-Privacy model (segmenter + unmixer), not a baseline")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    folder = DatasetFolder(resolve_data_dir(data_dir))
    spacing = model.hparams.input_spacing
    bank = bank if bank is not None else bank_from_cases(folder, "train", spacing, progress=progress)
    scans = load_scans(folder, spacing, options.split, options.max_cases, progress=progress)
    setting = model_setting(model)
    sections = {}
    if "reid" in options.parts:
        reid = audit_reidentification(scans, bank, [setting, *options.extra_settings], options.seed, progress)
        sections["reidentification"] = reidentification_section(reid, out_dir)
    if "icc" in options.parts:
        retest = audit_test_retest(model, scans, bank, setting.lambda_range, options.seed, progress)
        sections["test_retest"] = test_retest_section(retest, out_dir)
    metadata = {"model": getattr(model, "model_card", {}).get("name", str(model.__class__.__name__)),
                "data": str(folder.root), "split": options.split, "scans": len(scans),
                "patients": len(set(scans.patient_ids)), "references in the key": len(bank),
                "model's mixing": setting.name, "seed": options.seed, "parts": ", ".join(sections),
                "options": {k: v for k, v in asdict(options).items() if k != "extra_settings"}}
    return write_report(sections, metadata, out_dir)
