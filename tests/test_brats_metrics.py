"""BraTS regions: Dice and HD95 against hand-computed and brute-force values, with the empty-region conventions."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from mixpriv.evaluation.regions import (
    BRATS_REGIONS,
    RegionTable,
    hausdorff95,
    region_dice,
    region_hd95,
)
from mixpriv.validation import InputError


def brute_force_hd95(a: np.ndarray, b: np.ndarray, spacing: tuple[float, ...]) -> float:
    """HD95 from all pairwise distances between the two surfaces (the definition, slowly)."""
    def surface_points(mask):
        return np.argwhere(mask & ~ndimage.binary_erosion(mask, border_value=0)) * np.asarray(spacing)
    pa, pb = surface_points(a), surface_points(b)
    distances = np.linalg.norm(pa[:, None] - pb[None], axis=-1)
    return max(np.percentile(distances.min(1), 95), np.percentile(distances.min(0), 95))


def tumour(shape=(12, 12, 12), core=True) -> np.ndarray:
    label = np.zeros(shape, dtype=np.uint8)
    label[2:10, 2:10, 2:10] = 2  # oedema
    label[4:8, 4:8, 4:8] = 3  # enhancing
    if core:
        label[5:7, 5:7, 5:7] = 1  # necrosis
    return label


def test_regions_unite_the_classes_as_brats_defines_them():
    target = tumour()
    prediction = target.copy()
    prediction[prediction == 2] = 0  # the oedema missed: WT loses, TC and ET do not
    dice = region_dice(prediction, target)
    assert dice["TC"] == dice["ET"] == 1.0
    assert dice["WT"] == pytest.approx(2 * 64 / (64 + 512))
    prediction = target.copy()
    prediction[prediction == 1] = 3  # necrosis called enhancing: TC and WT unchanged, ET over-segmented
    dice = region_dice(prediction, target)
    assert dice["WT"] == dice["TC"] == 1.0
    assert dice["ET"] == pytest.approx(2 * 56 / (64 + 56))
    assert BRATS_REGIONS == {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}


def test_empty_regions_follow_the_brats_conventions():
    target = tumour()
    target[target == 3] = 2  # no enhancing tumour
    target[target == 1] = 2
    dice, hd = region_dice(target, target), region_hd95(target, target, (1.0, 1.0, 1.0))
    assert dice["ET"] == 1.0 and hd["ET"] == 0.0  # absent, correctly predicted absent
    prediction = target.copy()
    prediction[5, 5, 5] = 3  # one false enhancing voxel
    assert region_dice(prediction, target)["ET"] == 0.0
    assert region_hd95(prediction, target, (2.0, 1.0, 1.0))["ET"] == pytest.approx(np.sqrt(24**2 + 12**2 + 12**2))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hd95_equals_its_definition_on_random_shapes(seed):
    rng = np.random.default_rng(seed)
    spacing = (1.0, 1.5, 2.0)
    a = ndimage.gaussian_filter(rng.random((14, 12, 10)), 2) > 0.5
    b = ndimage.gaussian_filter(rng.random((14, 12, 10)), 2) > 0.5
    assert a.any() and b.any() and not np.array_equal(a, b)
    assert hausdorff95(a, b, spacing) == pytest.approx(brute_force_hd95(a, b, spacing))
    assert hausdorff95(a, b, spacing) == pytest.approx(hausdorff95(b, a, spacing))  # symmetric
    assert hausdorff95(a, a, spacing) == 0.0


def test_a_shifted_tumour_is_as_far_as_its_shift():
    target = tumour()
    shifted = np.roll(target, 2, axis=0)
    hd = region_hd95(shifted, target, (1.5, 1.0, 1.0))
    assert hd["ET"] == pytest.approx(3.0)  # 2 voxels of 1.5 mm: the far faces are 3 mm apart
    assert 0 < region_dice(shifted, target)["ET"] < 1


def test_bad_inputs_are_refused():
    with pytest.raises(InputError, match="shape"):
        region_dice(np.zeros((2, 2, 2), int), np.zeros((2, 2, 3), int))
    with pytest.raises(InputError, match="integer label map"):
        region_dice(np.full((2, 2, 2), 0.5), np.zeros((2, 2, 2), int))
    with pytest.raises(InputError, match="spacing"):
        hausdorff95(np.ones((2, 2, 2), bool), np.ones((2, 2, 2), bool), (1.0, 0.0, 1.0))
    with pytest.raises(InputError, match="a spacing per axis"):
        hausdorff95(np.ones((2, 2, 2), bool), np.ones((2, 2, 2), bool), (1.0, 1.0))


def test_the_region_table_aggregates_and_writes_both_metrics(tmp_path):
    target = tumour()
    table = RegionTable(spacing=(2.0, 2.0, 2.0))
    table.add_prediction("Baseline", "c0", target, target)
    table.add_prediction("Baseline", "c1", np.roll(target, 1, axis=0), target)
    aggregate = table.dice.aggregate()["Baseline"]
    assert aggregate["ET"]["n"] == 2 and aggregate["ET"]["mean"] < 1.0
    assert table.hd95.aggregate()["Baseline"]["WT"]["mean"] == pytest.approx(1.0)  # 0 and 2 mm
    paths = table.save(tmp_path)
    text = paths["regions_table"].read_text()
    assert "BraTS regions: Dice" in text and "HD95 (mm)" in text and "empty in both maps" in text
    assert '"spacing_mm"' in paths["regions_json"].read_text()
