"""The tumour task end to end: a folder in the BraTS challenge layout trains and evaluates from the command line."""

from __future__ import annotations

import json

import pytest
from test_cli import MIXPRIV_OVERRIDES, TINY_OVERRIDES

from mixpriv.cli import main
from mixpriv.data.tumour import build_tumour_cohort
from mixpriv.recipe import load_recipe

#: The tissue recipe whose networks and mixing each tumour recipe shares (the 2 mm private one: the published
#: tissue model's coarse-context unmixer, trained end to end).
TISSUE_TWIN = {"tumour-baseline": "tissue-baseline", "tumour-mixpriv": "tissue-mixpriv-context",
               "tumour-baseline-1mm-paper": "tissue-baseline-1mm-paper",
               "tumour-mixpriv-1mm-paper": "tissue-mixpriv-1mm-paper"}


@pytest.mark.parametrize("name", sorted(TISSUE_TWIN))
def test_tumour_recipes_default_to_the_embedded_tumour_cohort_with_larger_patches(name):
    recipe = load_recipe(name)
    tissue = load_recipe(TISSUE_TWIN[name])
    assert recipe["data"]["data_dir"] == "embedded:tumour"
    assert recipe["data"]["patch_size"] > tissue["data"]["patch_size"]
    assert recipe["model"] == tissue["model"]  # same networks and mixing as a tissue recipe


@pytest.mark.slow
def test_a_brats_folder_trains_and_evaluates_from_the_cli(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXPRIV_HOME", str(tmp_path / "home"))
    brats = build_tumour_cohort(tmp_path / "BraTS2021_Training_Data", n_patients=5, spacing=4.0, workers=1)  # 3 train patients: references of other patients
    data = [f"data.data_dir={brats}", "data.embedded_spacing=4.0"]
    assert main(["train", "--recipe", "tumour-mixpriv", "--out", str(tmp_path / "mp"), *data, *MIXPRIV_OVERRIDES,
                 "logger.kind=csv"]) == 0
    assert main(["train", "--recipe", "tumour-baseline", "--out", str(tmp_path / "bl"), *data, *TINY_OVERRIDES,
                 "logger.kind=csv"]) == 0
    evaluation = tmp_path / "eval"
    assert main(["evaluate", "--mixpriv", str(tmp_path / "mp/checkpoints/last.ckpt"),
                 "--baseline", str(tmp_path / "bl/checkpoints/last.ckpt"), "--data", str(brats),
                 "--k", "2", "--out", str(evaluation)]) == 0
    summary = json.loads((evaluation / "summary.json").read_text())
    assert set(summary["aggregate"]) == {"Baseline", "Naive", "Naive+TTA", "Learned", "Learned+TTA"}
    assert set(summary["labels"]) == {"background", "NCR", "ED", "ET"}
    regions = json.loads((evaluation / "regions.json").read_text())
    for metric in ("dice", "hd95_mm"):
        assert set(regions[metric]["aggregate"]) == set(summary["aggregate"])
        assert set(regions[metric]["aggregate"]["Baseline"]) == {"WT", "TC", "ET", "mean"}
    assert "HD95 (mm)" in (evaluation / "regions.md").read_text()
    assert not [path for path in brats.rglob("*") if "nnunet" in path.name.lower() or path.suffix == ".json"
                and path.name != "cohort.json"]  # the conversion went to the cache, not next to the input
