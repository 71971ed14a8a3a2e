"""The privacy-utility frontier joined from recorded audit reports and Dice evaluations."""

from __future__ import annotations

import json

import pytest

from mixpriv.evaluation.report import DiceTable
from mixpriv.mixing.settings import MixingSettings
from mixpriv.privacy.frontier import (
    RecordedPoint,
    frontier_from_records,
    privacy_card_entry,
    recorded_rows,
    write_frontier,
)
from mixpriv.validation import InputError


def _report(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    settings = [{"setting": name, "design": design, "worst_case_map": value, "worst_case_attacker": attacker}
                for name, design, value, attacker in rows]
    path.write_text(json.dumps({"reidentification": {"settings": settings}}))
    return path


def _summary(folder, lambda_range, learned_tta, learned, baseline=None, **mixing):
    """A `mixpriv evaluate` summary of one case whose mean foreground Dice per method is as given."""
    table = DiceTable({"background": 0, "fg": 1}, metadata={"lambda_range": lambda_range, "n_cases": 24, **mixing})
    for method, value in (("Baseline", baseline), ("Learned", learned), ("Learned+TTA", learned_tta)):
        if value is not None:
            table.add(method, "case", {"fg": value})
    return table.save(folder)["summary"]


@pytest.fixture
def records(tmp_path):
    suite = _report(tmp_path / "suite" / "report.json", [
        ("λ∈[0.65, 0.95]", "request", 1.0, "paper"),
        ("λ∈[0.2, 0.5]", "request", 1.0, "request-mean"),
        ("λ∈[0.2, 0.5] · shuffled", "shuffled", 0.9, "key-recovery"),
        ("λ∈[0.2, 0.5] · single", "single", 0.55, "paper"),
    ])
    warped = _report(tmp_path / "warp" / "report.json",
                     [("λ∈[0.1, 0.3], refs warped 8 vox · single", "single", 0.32, "key-recovery")])
    published = _summary(tmp_path / "dice" / "published", [0.65, 0.95], 0.909, 0.900, baseline=0.905)
    low = _summary(tmp_path / "dice" / "low", [0.2, 0.5], 0.837, 0.810)
    return suite, warped, published, low


def test_rows_take_the_dice_each_design_gets(records):
    suite, _, _, low = records
    rows = recorded_rows(RecordedPoint(MixingSettings((0.2, 0.5)), (suite,), low, "l20-50"))
    assert [(row.design, row.reid_map, row.dice) for row in rows] == [
        ("request", 1.0, 0.837), ("shuffled", 0.9, 0.837), ("single", 0.55, 0.810)]
    assert rows[1].name == "λ∈[0.2, 0.5] · shuffled" and rows[1].reid_attacker == "key-recovery"


def test_frontier_recommends_within_the_rule_and_writes_its_files(records, tmp_path):
    suite, warped, published, low = records
    points = [RecordedPoint(MixingSettings((0.65, 0.95)), (suite,), published, "published"),
              RecordedPoint(MixingSettings((0.2, 0.5)), (suite,), low, "l20-50"),
              RecordedPoint(MixingSettings((0.1, 0.3), reference_warp=8), (warped,))]
    frontier = frontier_from_records(points, published)
    assert frontier.baseline_dice == 0.905 and frontier.dice_cases == 24
    assert frontier.recommended().name == "λ∈[0.65, 0.95]"  # the only Dice within 0.01 of the baseline
    markdown = write_frontier(frontier, tmp_path / "out", ["suite/report.json"]).read_text()
    assert "| λ∈[0.1, 0.3], refs warped 8 vox · single | 0.320 | key-recovery | — | — |" in markdown
    assert "BSS" not in markdown  # no separation attack was recorded: no empty columns
    data = json.loads((tmp_path / "out" / "frontier.json").read_text())
    assert [row["dice"] for row in data["rows"]] == [0.909, 0.837, 0.837, 0.810, None]
    assert data["sources"] == ["suite/report.json"]
    assert (tmp_path / "out" / "privacy_utility.png").stat().st_size > 5_000


def test_a_dice_of_another_mixing_is_refused(records):
    suite, _, published, _ = records
    with pytest.raises(InputError, match="measured with λ∈\\[0.65, 0.95\\], not with λ∈\\[0.2, 0.5\\]"):
        recorded_rows(RecordedPoint(MixingSettings((0.2, 0.5)), (suite,), published))


def test_a_warp_must_match_too(records, tmp_path):
    _, warped, _, _ = records
    unwarped = _summary(tmp_path / "dice" / "unwarped", [0.1, 0.3], 0.75, 0.68)
    with pytest.raises(InputError, match="not with λ∈\\[0.1, 0.3\\], refs warped 8 vox"):
        recorded_rows(RecordedPoint(MixingSettings((0.1, 0.3), reference_warp=8), (warped,), unwarped))
    matching = _summary(tmp_path / "dice" / "warped", [0.1, 0.3], 0.75, 0.68, reference_warp=8.0)
    [row] = recorded_rows(RecordedPoint(MixingSettings((0.1, 0.3), reference_warp=8), (warped,), matching))
    assert row.dice == 0.68


def test_missing_settings_duplicates_and_files_are_named(records, tmp_path):
    suite, _, _, _ = records
    with pytest.raises(InputError, match="holds the setting λ∈\\[0.3, 0.6\\]"):
        recorded_rows(RecordedPoint(MixingSettings((0.3, 0.6)), (suite,)))
    with pytest.raises(InputError, match="recorded twice"):
        recorded_rows(RecordedPoint(MixingSettings((0.2, 0.5)), (suite, suite)))
    with pytest.raises(InputError, match="no such file"):
        recorded_rows(RecordedPoint(MixingSettings((0.2, 0.5)), (tmp_path / "nowhere.json",)))
    baseline_only = DiceTable({"background": 0, "fg": 1}, metadata={"n_cases": 24})
    baseline_only.add("Baseline", "case", {"fg": 0.9})
    with pytest.raises(InputError, match="records no λ range"):
        recorded_rows(RecordedPoint(MixingSettings((0.2, 0.5)), (suite,),
                                    baseline_only.save(tmp_path / "baseline-only")["summary"]))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(InputError, match="is not JSON"):
        recorded_rows(RecordedPoint(MixingSettings((0.2, 0.5)), (tmp_path / "bad.json",)))


def test_the_card_entry_holds_each_designs_worst_case(records):
    suite, _, _, _ = records
    entry = privacy_card_entry(RecordedPoint(MixingSettings((0.2, 0.5)), (suite,)), "2026-12-02")
    assert entry["designs"] == {"request": {"worst_case_map": 1.0, "worst_case_attacker": "request-mean"},
                                "shuffled": {"worst_case_map": 0.9, "worst_case_attacker": "key-recovery"},
                                "single": {"worst_case_map": 0.55, "worst_case_attacker": "paper"}}
    assert entry["setting"] == "λ∈[0.2, 0.5]" and "measured 2026-12-02" in entry["summary"]
