"""Issue 13's privacy-utility frontier from the measurements committed under checkpoints/evaluation/privacy.

Each setting pairs the attacker-suite audits that measured its worst-case re-identification mAP
(model-free: they attack the mixtures) with the Dice evaluation of a model trained for it
(`mixpriv evaluate`, 24 test scans, K = 8), and the non-private baseline's Dice on the same scans.
A setting whose model was not evaluated gets no Dice (a dotted line on the figure). Writes
frontier.md, frontier.json and privacy_utility.png.

With ``--annotate FOLDER ...``, each published Mixup-Privacy model also gets its setting's audited
worst case written into its card (``privacy``; README re-rendered, weights untouched) and its registry
entry updated.

Usage:
    .venv/bin/python scripts/privacy_frontier.py [--out checkpoints/evaluation/privacy/frontier]
    .venv/bin/python scripts/privacy_frontier.py --annotate checkpoints/tissue-mixpriv-2mm
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mixpriv.hub import update_registry
from mixpriv.hub.cards import annotate_card, read_card
from mixpriv.mixing.settings import MixingSettings
from mixpriv.privacy.frontier import RecordedPoint, frontier_from_records, privacy_card_entry, write_frontier

ROOT = Path(__file__).resolve().parents[1]
PRIVACY = ROOT / "checkpoints" / "evaluation" / "privacy"
SUITE = PRIVACY / "report.json"  # the attacker suite, 2026-12-02: four settings x three designs
SUITE_MEASURED = "2026-12-02"
WARPS = PRIVACY / "warps"
DICE = PRIVACY / "frontier-dice"

POINTS = [
    RecordedPoint(MixingSettings((0.65, 0.95)), (SUITE,), DICE / "0-tissue-mixpriv-2mm" / "summary.json",
                  "tissue-mixpriv-2mm"),
    RecordedPoint(MixingSettings((0.2, 0.5)), (SUITE,), DICE / "1-frontier-l20-50" / "summary.json",
                  "frontier-l20-50"),
    # The best model built for the setting: its segmenter with a wider unmixer (0.869; the end-to-end model's own
    # unmixer 0.850, DICE / "2-frontier-l20-50-r3"): the server's view, so the audit, is the same for both.
    RecordedPoint(MixingSettings((0.2, 0.5), references_per_mix=3), (SUITE,),
                  PRIVACY / "frontier-unmixers" / "l20-50-r3-wide" / "summary.json", "tissue-mixpriv-2mm-l20-50-r3-wide"),
    RecordedPoint(MixingSettings((0.1, 0.3)), (SUITE,)),
    RecordedPoint(MixingSettings((0.1, 0.3), reference_warp=4), (WARPS / "warp4" / "report.json",
                                                                 WARPS / "warp4-request" / "report.json")),
    RecordedPoint(MixingSettings((0.1, 0.3), reference_warp=8), (WARPS / "warp8" / "report.json",
                                                                 WARPS / "warp8-request" / "report.json"),
                  WARPS / "dice-l10-30" / "summary.json", "tissue-mixpriv-2mm-l10-30"),
]


def annotate(folder: Path) -> None:
    """Write the audited worst case of the model's own mixing (unwarped references) into its card."""
    setting = MixingSettings.of_model(read_card(folder)["hparams"])
    matches = [point for point in POINTS if point.setting == setting]
    if not matches:
        raise SystemExit(f"{folder}: no audit of its mixing {setting.name} is listed in POINTS")
    entry = privacy_card_entry(matches[0], SUITE_MEASURED)
    entry["audits"] = [str(Path(path).relative_to(ROOT)) for path in matches[0].reports]
    annotate_card(folder, {"privacy": entry})
    update_registry(folder, ROOT / "checkpoints" / "registry.json")
    print(f"{folder}: " + ", ".join(f"{design} {row['worst_case_map']:.3f} ({row['worst_case_attacker']})"
                                    for design, row in entry["designs"].items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=PRIVACY / "frontier")
    parser.add_argument("--annotate", type=Path, nargs="+", default=[], metavar="FOLDER",
                        help="published Mixup-Privacy models whose cards get their setting's audited worst case")
    args = parser.parse_args()
    for folder in args.annotate:
        annotate(folder)
    points = []
    for point in POINTS:
        if point.dice is not None and not Path(point.dice).exists():
            print(f"no Dice yet for {point.setting.name}: {Path(point.dice).relative_to(ROOT)} is missing")
            point = RecordedPoint(point.setting, point.reports)
        points.append(point)
    frontier = frontier_from_records(points, DICE / "0-tissue-mixpriv-2mm" / "summary.json")
    sources = sorted({str(Path(path).relative_to(ROOT)) for point in points
                      for path in (*point.reports, *([point.dice] if point.dice else []))})
    print(write_frontier(frontier, args.out, sources).read_text())


if __name__ == "__main__":
    main()
