"""Input checks: each bad input raises InputError with a message naming the problem."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import AFFINE, LABELS, SHAPE, phantom

from mixpriv.data.datamodule import MixprivDataModule
from mixpriv.data.folder import DatasetFolder, validate_case
from mixpriv.validation import (
    InputError,
    check_finite,
    check_lambda,
    check_lambda_range,
    check_label_values,
    check_same_affine,
    check_same_shape,
    check_spatial_dims,
)

BAD_RANGES = [(0.0, 0.5), (0.5, 1.2), (0.9, 0.6), (-0.1, 0.5), (0.5,), (0.2, 0.5, 0.8)]


def test_input_error_is_a_value_error():
    assert issubclass(InputError, ValueError)


@pytest.mark.parametrize("array", [np.zeros((4, 4)), torch.zeros(4, 4, 4), np.zeros((1, 1, 4, 4, 4))])
def test_wrong_number_of_dimensions(array):
    with pytest.raises(InputError, match=r"image must have 4 dimensions \(C, D, H, W\), got \d"):
        check_spatial_dims(array, "image")


def test_spatial_dims_accepts_volumes():
    check_spatial_dims(np.zeros((1, 4, 4, 4)), "image")
    check_spatial_dims(torch.zeros(4, 4, 4), "image", channels_first=False)
    with pytest.raises(InputError, match=r"label must have 3 dimensions \(D, H, W\)"):
        check_spatial_dims(np.zeros((1, 4, 4, 4)), "label", channels_first=False)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_non_finite_voxels(bad, kind):
    array = np.zeros((1, 4, 4, 4), np.float32)
    array[0, 1, 2, 3] = bad
    array[0, 0, 0, 0] = bad
    if kind == "torch":
        array = torch.from_numpy(array)
    with pytest.raises(InputError, match=r"scan contains 2 NaN or infinite voxel\(s\)"):
        check_finite(array, "scan")
    check_finite(np.zeros((1, 2, 2, 2)), "scan")


def test_shape_mismatch():
    with pytest.raises(InputError, match=r"image shape \(4, 4, 4\) does not match label shape \(4, 4, 5\)"):
        check_same_shape(np.zeros((1, 4, 4, 4)), np.zeros((4, 4, 5)), "image", "label")
    check_same_shape(np.zeros((1, 4, 4, 4)), np.zeros((4, 4, 4)), "image", "label")
    with pytest.raises(InputError, match="does not match"):
        check_same_shape(np.zeros((1, 4, 4, 4)), np.zeros((2, 4, 4, 4)), "a", "b", spatial_only=False)


def test_affine_mismatch():
    other = AFFINE.copy()
    other[0, 3] += 1.0  # 1 mm shift
    with pytest.raises(InputError, match="label affine differs from image affine"):
        check_same_affine(other, AFFINE, "label", "image")
    flipped = AFFINE.copy()
    flipped[0, 0] *= -1
    with pytest.raises(InputError, match="affine differs"):
        check_same_affine(flipped, AFFINE, "label", "image")
    nearly = AFFINE.copy()
    nearly[1, 3] += 1e-5  # float noise from a header round trip is tolerated
    check_same_affine(nearly, AFFINE, "label", "image")


@pytest.mark.parametrize("bad", BAD_RANGES)
def test_lambda_range_outside_unit_interval(bad):
    with pytest.raises(InputError, match="lambda range"):
        check_lambda_range(bad)


def test_lambda_range_accepts_valid():
    assert check_lambda_range((0.65, 0.95)) == (0.65, 0.95)
    assert check_lambda_range([0.5, 1]) == (0.5, 1.0)
    assert check_lambda_range((0.7, 0.7)) == (0.7, 0.7)


def test_lambda_values():
    check_lambda(0.5)
    check_lambda(torch.tensor([0.1, 1.0]))
    for bad in (0.0, 1.01, -0.5, float("nan"), torch.tensor([0.5, 0.0])):
        with pytest.raises(InputError, match=r"lambda must lie in \(0, 1\]"):
            check_lambda(bad)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_label_values_not_in_label_set(kind):
    label = np.zeros((4, 4, 4), np.int64)
    label[0, 0, 0] = 5
    label[1, 1, 1] = 9
    if kind == "torch":
        label = torch.from_numpy(label)
    with pytest.raises(InputError, match=r"label has values \[5, 9\] that are not in the label set \[0, 1, 2, 3\]"):
        check_label_values(label, LABELS.values(), "label")


def test_label_values_non_integer_and_valid():
    with pytest.raises(InputError, match="non-integer"):
        check_label_values(np.full((2, 2, 2), 1.5), LABELS.values(), "label")
    check_label_values(np.array([[[0, 1], [2, 3]]], np.uint8), LABELS.values(), "label")
    check_label_values(np.zeros((2, 2, 2), np.float32), LABELS.values(), "label")  # float-stored integers are fine


# ----------------------------------------------------------------------------- real entry points


def _write(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> None:
    nib.save(nib.Nifti1Image(data, affine), str(path))


@pytest.fixture()
def folder_case(tiny_folder):
    folder = DatasetFolder(tiny_folder)
    case = folder.case("case000")
    validate_case(case, folder.labels.values())  # the untouched case is valid
    return folder, case


def test_validate_case_label_with_unknown_value(folder_case):
    folder, case = folder_case
    _, label = phantom(0)
    label[3, 3, 3] = 6
    _write(case.label_path, label)
    with pytest.raises(InputError, match=r"label case000.nii.gz has values \[6\] that are not in the label set"):
        validate_case(case, folder.labels.values())


def test_validate_case_label_with_wrong_shape(folder_case):
    folder, case = folder_case
    _, label = phantom(0, (24, 24, 20))
    _write(case.label_path, label)
    with pytest.raises(InputError, match=r"label case000.nii.gz shape \(24, 24, 20\) does not match image"):
        validate_case(case, folder.labels.values())


def test_validate_case_label_with_wrong_affine(folder_case):
    folder, case = folder_case
    _, label = phantom(0)
    shifted = AFFINE.copy()
    shifted[:3, 3] += [4.0, 0.0, 0.0]
    _write(case.label_path, label, shifted)
    with pytest.raises(InputError, match="label case000.nii.gz affine differs from image of case case000"):
        validate_case(case, folder.labels.values())


def test_validate_case_image_with_nan(folder_case):
    folder, case = folder_case
    image, _ = phantom(0)
    image[5, 5, 5] = np.nan
    _write(case.image_paths[0], image)
    with pytest.raises(InputError, match=r"image case000_0000.nii.gz contains 1 NaN or infinite voxel"):
        validate_case(case, folder.labels.values())


def test_validate_case_image_with_wrong_dimensions(folder_case):
    folder, case = folder_case
    _write(case.image_paths[0], np.zeros((24, 24), np.float32))
    with pytest.raises(InputError, match="must have 3 dimensions"):
        validate_case(case, folder.labels.values())


def test_validate_case_second_channel_mismatch(tiny_folder):
    import json

    meta = json.loads((tiny_folder / "dataset.json").read_text())
    meta["channel_names"] = {"0": "T1", "1": "T2"}
    (tiny_folder / "dataset.json").write_text(json.dumps(meta))
    for kind in ("Tr", "Ts"):
        for path in (tiny_folder / f"images{kind}").glob("*_0000.nii.gz"):
            image = nib.load(str(path))
            _write(path.with_name(path.name.replace("_0000", "_0001")), np.asanyarray(image.dataobj), image.affine)
    folder = DatasetFolder(tiny_folder)
    case = folder.case("case001")
    assert len(case.image_paths) == 2
    validate_case(case, folder.labels.values())
    _write(case.image_paths[1], np.zeros((24, 24, 23), np.float32))
    with pytest.raises(InputError, match=r"image case001_0001.nii.gz shape .* does not match first channel"):
        validate_case(case, folder.labels.values())


def test_datamodule_setup_validates_files(tiny_folder):
    _, label = phantom(1)
    label[0, 0, 0] = 9
    _write(tiny_folder / "labelsTr" / "case001.nii.gz", label)
    datamodule = MixprivDataModule(data_dir=str(tiny_folder), patch_size=16, batch_size=2)
    with pytest.raises(InputError, match=r"case001.nii.gz has values \[9\]"):
        datamodule.setup("fit")


@pytest.mark.parametrize("bad", [(0, 1), (0.0, 0.5), (0.5, 1.2), (0.9, 0.6)])
def test_datamodule_rejects_lambda_range(tiny_folder, bad):
    with pytest.raises(InputError, match="lambda range"):
        MixprivDataModule(data_dir=str(tiny_folder), mixing=True, lambda_range=bad)


def test_fixture_shape_is_what_the_tests_assume():
    image, label = phantom(0)
    assert image.shape == label.shape == SHAPE
    assert set(np.unique(label)) <= set(LABELS.values())
