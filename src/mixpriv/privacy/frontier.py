"""The privacy-utility frontier joined from recorded measurements: audit reports and Dice evaluations.

The ``sweep`` part of ``mixpriv audit`` measures a setting's privacy and the Dice of a model trained
for it in one run. On a CPU each piece takes from minutes to hours, so the frontier is often measured
piecewise: the attacker suite for some settings (``mixpriv audit --parts reid``, model-free), a
model per setting trained and evaluated on its own (``mixpriv evaluate``). :func:`frontier_from_records`
joins those records into one :class:`~mixpriv.privacy.audit.SweepAudit`, checking that each Dice was
measured with the mixing of the setting it is paired with, and :func:`write_frontier` writes it the
way the sweep part does (Markdown table, JSON, the privacy-utility figure, the recommended setting).
:func:`privacy_card_entry` turns one setting's records into a model card's audited ``privacy`` entry.

Example:
    >>> from mixpriv.mixing.settings import MixingSettings
    >>> point = RecordedPoint(MixingSettings((0.2, 0.5)), ("audit/report.json",), "eval/summary.json")
    >>> frontier = frontier_from_records([point], baseline_summary="eval/summary.json")  # doctest: +SKIP
    >>> write_frontier(frontier, "frontier")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mixpriv.evaluation.report import MEAN_KEY, DiceTable
from mixpriv.files import write_text_atomically
from mixpriv.mixing.settings import MixingSettings
from mixpriv.privacy.audit import SweepAudit, SweepRow
from mixpriv.validation import InputError

#: The Dice that goes with each request design: K mixtures per scan are averaged (Learned+TTA) unless the
#: client sends one mixture per scan (``single``: Learned, no TTA).
DICE_METHOD = {"request": "Learned+TTA", "shuffled": "Learned+TTA", "single": "Learned"}


@dataclass(frozen=True)
class RecordedPoint:
    """One mixing setting of the frontier, as recorded on disk.

    Attributes:
        setting: the mixing setting (its :attr:`~mixpriv.mixing.settings.MixingSettings.name` is how the
            audit reports name it).
        reports: audit ``report.json`` files with re-identification rows of this setting (under one or
            more request designs; a design found in two reports is an error).
        dice: an evaluation ``summary.json`` (``mixpriv evaluate``) of a model trained for this setting,
            measured with this mixing; ``None`` when no model was measured.
        model: that model's name, for the table.
    """

    setting: MixingSettings
    reports: tuple[str | os.PathLike, ...]
    dice: str | os.PathLike | None = None
    model: str | None = None


def _read_json(path: str | os.PathLike) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except json.JSONDecodeError as error:
        raise InputError(f"{path} is not JSON: {error}") from None


def _dice_table(path: str | os.PathLike) -> DiceTable:
    """A ``mixpriv evaluate`` summary, read the way the evaluation reads its own."""
    try:
        return DiceTable.from_summary(path)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except json.JSONDecodeError as error:
        raise InputError(f"{path} is not JSON: {error}") from None


def _mean_dice(aggregate: dict, method: str, path: str | os.PathLike) -> float:
    if method not in aggregate:
        raise InputError(f"{path} holds no {method} Dice (is it a `mixpriv evaluate` summary.json?)")
    return float(aggregate[method][MEAN_KEY]["mean"])


def _check_dice_mixing(metadata: dict, setting: MixingSettings, path: str | os.PathLike) -> None:
    """The evaluation must have mixed the way ``setting`` says (λ range, R, α, warp)."""
    if "lambda_range" not in metadata:
        raise InputError(f"{path} records no λ range: is it the evaluation of a Mixup-Privacy model?")
    measured = MixingSettings.of_model(metadata, reference_warp=float(metadata.get("reference_warp", 0.0)))
    if measured != setting:
        raise InputError(f"{path} was measured with {measured.name}, not with {setting.name}: pair each setting "
                         f"with a Dice of its own mixing")


def recorded_rows(point: RecordedPoint) -> list[SweepRow]:
    """The point's rows, one per request design its reports hold, each with the Dice that design gets.

    Raises:
        InputError: a report or summary is missing or malformed, no report holds the setting, a design
            is recorded twice, or the Dice was measured with another mixing.
    """
    return _rows(point, _dice_table(point.dice) if point.dice is not None else None)


def _rows(point: RecordedPoint, table: DiceTable | None) -> list[SweepRow]:
    """:func:`recorded_rows` with the point's Dice summary already read (``None``: no Dice)."""
    aggregate = None
    if table is not None:
        _check_dice_mixing(table.metadata, point.setting, point.dice)
        aggregate = table.aggregate()
    rows: dict[str, SweepRow] = {}
    for report in point.reports:
        recorded = _read_json(report).get("reidentification", {}).get("settings")
        if recorded is None:
            raise InputError(f"{report} holds no re-identification part (run `mixpriv audit --parts reid`)")
        for entry in recorded:
            design = entry.get("design", "request")
            if entry.get("setting") != SweepRow(point.setting, 0.0, "", design=design).name:
                continue
            if design in rows:
                raise InputError(f"{point.setting.name} · {design} is recorded twice (again in {report})")
            dice = _mean_dice(aggregate, DICE_METHOD[design], point.dice) if aggregate is not None else None
            rows[design] = SweepRow(point.setting, float(entry["worst_case_map"]), entry["worst_case_attacker"],
                                    design=design, dice=dice, model=point.model if aggregate is not None else None)
    if not rows:
        raise InputError(f"none of {', '.join(map(str, point.reports))} holds the setting {point.setting.name}")
    return [rows[design] for design in DICE_METHOD if design in rows]


def privacy_card_entry(point: RecordedPoint, measured: str) -> dict:
    """A model card's ``privacy`` entry for a model that mixes as ``point.setting``: per request design, the
    worst-case re-identification mAP and the attacker that set it, from ``point.reports`` (the Dice is not read).

    Example:
        >>> entry = privacy_card_entry(RecordedPoint(MixingSettings((0.65, 0.95)), ("report.json",)),
        ...                            "2026-12-02")  # doctest: +SKIP
        >>> entry["designs"]["single"]  # doctest: +SKIP
        {'worst_case_map': 1.0, 'worst_case_attacker': 'paper'}
    """
    rows = _rows(point, None)
    metadata = _read_json(point.reports[0]).get("metadata", {})
    scope = (f"{metadata.get('scans', '?')} test scans of {metadata.get('patients', '?')} patients of the embedded "
             f"cohort, a key of {metadata.get('references in the key', '?')} references")
    return {"setting": point.setting.name, "measured": measured, "audits": [str(path) for path in point.reports],
            "designs": {row.design: {"worst_case_map": row.reid_map, "worst_case_attacker": row.reid_attacker}
                        for row in rows},
            "summary": (f"Re-identification by mixpriv's attacker suite ({scope}; `mixpriv audit --parts reid`), "
                        f"measured {measured}: the highest mAP of any attacker, per way of sending the mixtures "
                        "(`request`: a scan's K mixtures in one request; `shuffled`: the mixtures of many scans "
                        "shuffled together; `single`: one mixture per scan, no TTA). 1.000 means every patient "
                        "is recognised; lower is more private (the paper's Table 2: 0.352).")}


def frontier_from_records(points: Sequence[RecordedPoint], baseline_summary: str | os.PathLike,
                          k: int = 8) -> SweepAudit:
    """Every point's rows, with the non-private baseline's mean Dice read from ``baseline_summary``
    (a ``mixpriv evaluate`` summary with a ``Baseline`` row, measured on the same scans)."""
    rows, cases = [], [0]
    for point in points:
        table = _dice_table(point.dice) if point.dice is not None else None
        rows += _rows(point, table)
        cases += [int(table.metadata.get("n_cases", 0))] if table is not None else []
    baseline = _mean_dice(_dice_table(baseline_summary).aggregate(), "Baseline", baseline_summary)
    return SweepAudit(rows, baseline_dice=baseline, dice_cases=max(cases), k=k)


def write_frontier(audit: SweepAudit, out_dir: str | os.PathLike, sources: Sequence[str] = ()) -> Path:
    """Write ``frontier.md``, ``frontier.json`` and ``privacy_utility.png`` into ``out_dir``; return the
    Markdown's path. ``sources``: lines saying where the records came from (listed under the table)."""
    from mixpriv.privacy.report import sweep_section

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data, lines = sweep_section(audit, out)
    data["sources"] = list(sources)
    lines = ["# Privacy-utility frontier", "", *lines]
    if sources:
        lines += ["Measured in:", "", *[f"- {source}" for source in sources], ""]
    write_text_atomically(out / "frontier.json", json.dumps(data, indent=2) + "\n")
    return write_text_atomically(out / "frontier.md", "\n".join(lines))
