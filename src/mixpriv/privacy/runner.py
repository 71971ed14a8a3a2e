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

import torch
from tqdm.auto import tqdm

from mixpriv.constants import AUDIT_PARTS, TEST, TRAIN, VAL
from mixpriv.data.datamodule import bank_from_cases
from mixpriv.data.folder import DatasetFolder
from mixpriv.data.sources import resolve_data_dir
from mixpriv.evaluation.compared import check_spacing
from mixpriv.lightning.baseline import BaselineSegmenter
from mixpriv.lightning.mixup import MixupPrivacyModule
from mixpriv.mixing.bank import ReferenceBank
from mixpriv.mixing.settings import MixingSettings
from mixpriv.privacy.attackers import (
    AttackerAudit,
    AttackerOptions,
    audit_attackers,
)
from mixpriv.privacy.attackers.compared import (
    ComparedSystem,
    audit_compared,
    compared_attackers,
)
from mixpriv.privacy.attackers.report import attackers_section, compared_section
from mixpriv.privacy.audit import (
    SweepAudit,
    SweepRow,
    audit_test_retest,
    private_dice,
)
from mixpriv.privacy.bss import (
    SeparationOptions,
    attack_requests,
    attack_setting,
    audit_separation,
    train_score_prior,
)
from mixpriv.privacy.report import (
    reliability_section,
    separation_section,
    sweep_section,
    write_report,
)
from mixpriv.privacy.scans import load_scans
from mixpriv.training import load_model
from mixpriv.validation import InputError

log = logging.getLogger(__name__)

#: The sweep's default settings: the target's weight range, one or three references per mixture.
DEFAULT_SWEEP_SETTINGS = (MixingSettings((0.65, 0.95)), MixingSettings((0.5, 0.8)), MixingSettings((0.35, 0.65)),
                          MixingSettings((0.2, 0.5)), MixingSettings((0.5, 0.8), 3))


@dataclass
class AuditOptions:
    """What the audit runs and how big it is (the defaults are the embedded cohort's full audit).

    Attributes:
        parts: any of ``reid`` (re-identification by the attacker suite, worst case first), ``icc``
            (test-retest), ``bss`` (blind source separation with its positive control), ``sweep``
            (privacy-utility sweep: worst-case re-identification, separation attack and Dice per
            mixing setting).
        split: the split whose scans are attacked.
        attacker_split: the split of the attacker's own public scans (never the key's, never the
            attacked ones): the population attacker's mean and the learned attacker's training data.
        attacker_data: or another nnU-Net folder of the attacker's scans (its ``attacker_split``).
        attackers: which attackers and how big (K mixtures per request, the learned attacker).
        max_cases: at most this many scans (``None``: all).
        seed: seed of every random draw (references, λ, attack initialisations).
        reid_settings: the mixing settings the reid part attacks (``None``: the model's own).
        sweep_settings: the sweep's settings (besides those of ``sweep_models``).
        sweep_models: models trained for other settings (name, folder, URL or loaded), whose
            Learned+TTA Dice enters the sweep; the audited model is always the first.
        baseline: the non-private model the sweep's Dice are compared with.
        k: TTA references for the sweep's Dice.
        dice_cases: at most this many test scans for the sweep's Dice (``None``: all).
        sweep_separation: run the separation attacks of every sweep setting (on single mixtures and on
            whole requests; the costliest part of the sweep).
        separation: sizes of the blind source separation attack (patches, initialisations,
            score-network training steps, Langevin levels and steps).
        compared: Privacy-Net and Deformation-Proxy models (name, folder, checkpoint, URL or loaded): their
            servers' views are attacked too (:mod:`~mixpriv.privacy.attackers.compared`), next to no proxy
            and, with ``reid``, Mixup-Privacy (whatever ``parts`` says).
        compared_views: views the learned attacker draws of each of its scans through a system whose views
            are random (Deformation-Proxy's keys).
    """

    parts: Sequence[str] = AUDIT_PARTS
    split: str = TEST
    attacker_split: str = VAL
    attacker_data: str | Path | None = None
    attackers: AttackerOptions = field(default_factory=AttackerOptions)
    max_cases: int | None = None
    seed: int = 0
    reid_settings: Sequence[MixingSettings] | None = None
    sweep_settings: Sequence[MixingSettings] = DEFAULT_SWEEP_SETTINGS
    sweep_models: Sequence = field(default_factory=tuple)
    baseline: str | Path | BaselineSegmenter | None = "tissue-baseline-2mm"
    k: int = 8
    dice_cases: int | None = 8
    sweep_separation: bool = True
    separation: SeparationOptions = field(default_factory=SeparationOptions)
    compared: Sequence = field(default_factory=tuple)
    compared_views: int = 4

    def __post_init__(self) -> None:
        unknown = sorted(set(self.parts) - set(AUDIT_PARTS))
        if unknown:
            raise InputError(f"unknown audit part(s) {unknown}; choose from {list(AUDIT_PARTS)}")
        if self.compared:
            compared_attackers(self.attackers)


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

    Returns:
        The written files: ``{"markdown": out_dir/report.md, "json": out_dir/report.json}``
        (the figures and the attacker's priors lie next to them).

    Raises:
        InputError: bad options or data (unknown part, too few scans or labels, a model that is not
            a Mixup-Privacy model, a compared model that is not Privacy-Net or Deformation-Proxy, ...).
    """
    options = options or AuditOptions()
    model = _load(model, MixupPrivacyModule)
    systems = [_compared_system(source, model.hparams.input_spacing) for source in options.compared]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    folder = DatasetFolder(resolve_data_dir(data_dir))
    spacing = model.hparams.input_spacing
    key_is_train = bank is None
    bank = bank if bank is not None else bank_from_cases(folder, TRAIN, spacing, progress=progress)
    scans = load_scans(folder, spacing, options.split, options.max_cases, progress=progress, space=bank.space)
    setting = MixingSettings.of_model(model.hparams)
    sweep_models = [model, *(_load(source, MixupPrivacyModule) for source in options.sweep_models)]
    sweep_settings = _unique([MixingSettings.of_model(m.hparams) for m in sweep_models] + list(options.sweep_settings))
    sections = {}
    reid = None
    if "reid" in options.parts or "sweep" in options.parts or systems:
        attacker_folder = DatasetFolder(resolve_data_dir(options.attacker_data)) if options.attacker_data else folder
        attacker_scans = load_scans(attacker_folder, spacing, options.attacker_split, progress=progress,
                                    space=bank.space)
    if "reid" in options.parts or "sweep" in options.parts:
        reid_settings = _unique([*(options.reid_settings or [setting]),
                                 *(sweep_settings if "sweep" in options.parts else [])])
        reid = audit_attackers(scans, bank, reid_settings, attacker_scans, options.attackers, options.seed, progress)
        if "reid" in options.parts:
            sections["reidentification"] = attackers_section(reid, out_dir)
    if systems:
        compared = audit_compared(scans, systems, attacker_scans, options.attackers, options.seed,
                                  options.compared_views, progress, reid.no_proxy_similarity if reid else None)
        mixup = [row for row in reid.settings if row.setting == setting] if reid else []
        sections["compared"] = compared_section(compared, out_dir, mixup, _name(model))
    if "icc" in options.parts:
        retest = audit_test_retest(model, scans, bank, setting, options.seed, progress)
        sections["test_retest"] = reliability_section(retest, out_dir)
    separates = "bss" in options.parts or ("sweep" in options.parts and options.sweep_separation)
    if separates:
        attacker_images = load_scans(folder, spacing, TRAIN, progress=progress).images
    if "bss" in options.parts:
        separation = audit_separation(scans.images, list(bank.images), attacker_images, setting.lambda_range,
                                      options.separation, out_dir / "bss", options.seed, progress,
                                      setting.references_per_mix)
        sections["separation"] = separation_section(separation, out_dir)
    if "sweep" in options.parts:
        sweep = _sweep(sweep_models, sweep_settings, reid, options, folder, bank, out_dir, progress)
        if options.sweep_separation:
            _separate_sweep(sweep, scans.images, bank, attacker_images, options, out_dir, progress)
        sections["sweep"] = sweep_section(sweep, out_dir)
    metadata = {"model": _name(model),
                "data": str(folder.root), "split": options.split, "scans": len(scans),
                "patients": len(set(scans.patient_ids)), "references in the key": len(bank),
                "model's mixing": setting.name, "seed": options.seed, "parts": ", ".join(sections),
                **({"compared systems": ", ".join(system.name for system in systems)} if systems else {}),
                **({"attacker's brain prior": _attacker_data(attacker_images, key_is_train)}
                   if separates else {}),
                "options": {k: v for k, v in asdict(options).items()
                            if k in ("parts", "split", "max_cases", "k", "dice_cases", "sweep_separation", "separation",
                                     "compared_views")}}
    return write_report(sections, metadata, out_dir)


def _sweep(models: Sequence[MixupPrivacyModule], settings: Sequence[MixingSettings], reid: AttackerAudit,
           options: AuditOptions, folder: DatasetFolder, bank: ReferenceBank, out_dir: Path,
           progress: bool) -> SweepAudit:
    """One sweep row per setting and request design: its worst-case re-identification and, where a model was
    trained for the setting, its Dice as that design allows (Learned+TTA; Learned for one mixture per scan)."""
    baseline = _load(options.baseline, BaselineSegmenter) if options.baseline is not None else None
    dice, baseline_dice = private_dice(models, baseline, folder, bank, out_dir / "sweep", options.k,
                                       options.dice_cases, options.seed, progress)
    measured: dict[MixingSettings, tuple[dict[str, float], str]] = {}
    for model, scores in zip(models, dice):
        measured.setdefault(MixingSettings.of_model(model.hparams), (scores, _name(model)))
    rows = []
    for setting in settings:
        scores, name = measured.get(setting, (None, None))
        for row in (row for row in reid.settings if row.setting == setting):
            value = scores["Learned" if row.design == "single" else "Learned+TTA"] if scores else None
            rows.append(SweepRow(setting, row.worst_case_map, row.worst_attacker, design=row.design, dice=value,
                                 model=name))
    labelled = sum(case.label_path is not None for case in folder.cases(TEST))
    return SweepAudit(rows, baseline_dice, min(options.dice_cases or labelled, labelled), options.k)


def _separate_sweep(sweep: SweepAudit, images: Sequence[torch.Tensor], bank: ReferenceBank,
                    attacker_images: Sequence[torch.Tensor], options: AuditOptions, out_dir: Path,
                    progress: bool) -> None:
    """Fill each sweep row's separation scores: the "λ known" attack on that setting's single mixtures
    and, for the ``request`` design with K > 1 mixtures per scan, on its whole requests."""
    prior = train_score_prior(attacker_images, out_dir / "bss" / "prior-brain", options.separation,
                              progress=progress, seed=options.seed)
    k = options.attackers.k
    settings = _unique([row.setting for row in sweep.rows])
    for setting in tqdm(settings, desc="sweep: separation per setting", disable=not progress):
        single = attack_setting(images, list(bank.images), prior, setting.lambda_range, setting.references_per_mix,
                                options.separation, options.seed, progress)
        rows = [row for row in sweep.rows if row.setting == setting]
        request = None
        if k > 1 and any(row.design == "request" for row in rows):  # the server holds each scan's K mixtures
            request = attack_requests(images, list(bank.images), prior, setting.lambda_range, k,
                                      setting.references_per_mix, options.separation, options.seed, progress)
        for row in rows:
            row.bss, row.bss_trivial = single.mean, single.trivial_mean
            if request is not None and row.design == "request":
                row.bss_request, row.bss_request_trivial = request.mean, request.trivial_mean


def _attacker_data(images: Sequence[torch.Tensor], key_is_train: bool) -> str:
    """Which volumes the attacker's prior learnt from, for the report."""
    text = f"trained on the {TRAIN} split ({len(images)} scans)"
    if key_is_train:
        text += ("; the key is the same scans, so the attacker has seen every secret reference, which "
                 "favours the attack (a conservative privacy measure)")
    return text


def _load(source: str | Path | torch.nn.Module, kind: type | None = None) -> torch.nn.Module:
    """A loaded model (of ``kind`` if given) from a name, folder, checkpoint or URL (or the model itself)."""
    model = source if isinstance(source, torch.nn.Module) else load_model(source)
    if kind is not None and not isinstance(model, kind):
        wanted = "a Mixup-Privacy model (segmenter + unmixer)" if kind is MixupPrivacyModule else "a baseline"
        raise InputError(f"{source} is a {type(model).__name__}; the audit needs {wanted} here")
    return model.eval()


def _compared_system(source: str | Path | torch.nn.Module, spacing) -> ComparedSystem:
    """The system of a ``compared`` model, refused unless Privacy-Net or Deformation-Proxy at the audit's voxel size."""
    loaded = _load(source)
    system = ComparedSystem.of_model(loaded, source if not isinstance(source, torch.nn.Module) else None)
    check_spacing(loaded, spacing, system.name)
    return system


def _name(model: torch.nn.Module) -> str:
    return getattr(model, "model_card", {}).get("name", type(model).__name__)


def _unique(settings: Sequence[MixingSettings]) -> list[MixingSettings]:
    return list(dict.fromkeys(settings))
