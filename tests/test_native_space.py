"""Native-space input with the published models (``benchmarks/native_space.py``): cohort scans moved into
"scanner space" (15 degrees, 28 mm, LPI, another field of view) are registered, segmented and brought
back onto their own grid within 0.01 Dice of the same scans segmented where they lie."""

from __future__ import annotations

import importlib.util
import statistics
from pathlib import Path

import pytest

from mixpriv.hub import from_pretrained

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "native_space.py"


def _benchmark():
    spec = importlib.util.spec_from_file_location("native_space", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason=(
    "issue 12, not met by the published models: scanner space -0.023 Dice for Baseline and Learned (0.906 -> 0.882, "
    "0.900 -> 0.876). The registration is consistent to 0.2-0.4 mm; the loss is the models' sensitivity to "
    "resampling (a scan placed 1 mm off the grid, no registration, loses 0.06), which domain-randomised training "
    "is meant to remove. Strict: the test reports when a published model passes."))
def test_a_scan_in_scanner_space_is_segmented_on_its_own_grid_as_well_as_in_place(tmp_path):
    benchmark = _benchmark()
    baseline, private = from_pretrained("tissue-baseline-2mm").eval(), from_pretrained("tissue-mixpriv-2mm").eval()
    scores = benchmark.native_space_dice(baseline, private, benchmark.small_cohort(tmp_path / "cohort"), k=2)
    for row, ways in scores.items():
        here, there = (statistics.fmean(ways[way]) for way in ("in place", "scanner space"))
        assert here > 0.85, f"{row} in place: {here:.4f}"
        assert there > here - 0.01, f"{row}: scanner space {there:.4f} against in place {here:.4f}"
