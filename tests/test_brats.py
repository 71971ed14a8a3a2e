"""BraTS 2021 folders: the challenge layout, label mapping, patients and splits by patient, nnU-Net v2 conversion."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mixpriv.cli.data import add_convert_brats
from mixpriv.constants import IMAGE, LABEL, SPLITS, TEST, TRAIN, VAL
from mixpriv.data.brats import (
    BRATS_LABELS,
    CLASS_LABELS,
    MODALITIES,
    BratsFolder,
    brats_to_classes,
    check_modalities,
    classes_to_brats,
    remap_labels,
    split_cases,
)
from mixpriv.data.brats_convert import brats_to_nnunet, nnunet_to_brats, recorded_label_mapping, recorded_modalities
from mixpriv.data.brats_patients import PATIENTS_FILE, read_patients
from mixpriv.data.folder import DatasetFolder
from mixpriv.files import OutputError
from mixpriv.validation import InputError

SHAPE = (8, 8, 8)


def _affine() -> np.ndarray:
    """An oblique affine with anisotropic voxels and an off-grid origin (kept exactly, or the tests fail)."""
    angle = np.deg2rad(10.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([1.0, 1.2, 0.9])
    affine[:3, 3] = [-3.217, 11.5, -7.03125]
    return affine


AFFINE = _affine()


def _save(array: np.ndarray, path: Path, affine: np.ndarray = AFFINE) -> None:
    image = nib.Nifti1Image(array, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, str(path))


def _seg(index: int) -> np.ndarray:
    """Oedema around an enhancing rim around a necrotic core; the last of every three cases has no ET."""
    seg = np.zeros(SHAPE, np.uint8)
    seg[1:7, 1:7, 1:7] = 2
    seg[2:6, 2:6, 2:6] = 4 if index % 3 != 2 else 1
    seg[3:5, 3:5, 3 + index % 2:5] = 1
    return seg


def _case_id(index: int) -> str:
    return f"BraTS2021_{index:05d}"


def write_brats(root: Path, n_cases: int = 3, modalities=MODALITIES, patients: dict[str, str] | None = None) -> Path:
    """A BraTS-layout folder: per case one file per modality (each its own values) and a seg file.

    ``patients`` (case id -> patient id) is written as the top-level ``patients.csv``.
    """
    for i in range(n_cases):
        case_id = _case_id(i)
        folder = root / case_id
        folder.mkdir(parents=True)
        rng = np.random.default_rng(i)
        for m, modality in enumerate(modalities):
            data = (rng.normal(100 * (m + 1), 10, SHAPE)).astype(np.int16 if modality == "t1" else np.float32)
            _save(data, folder / f"{case_id}_{modality}.nii.gz")
        _save(_seg(i), folder / f"{case_id}_seg.nii.gz")
    (root / "BraTS2021_name_mapping.csv").write_text("BraTS2021,BraTS2020\n")  # top-level files are ignored
    if patients is not None:
        lines = ["case_id,patient_id", *(f"{case},{patient}" for case, patient in patients.items())]
        (root / PATIENTS_FILE).write_text("\n".join(lines) + "\n")
    return root


def _pairs(n_cases: int) -> dict[str, str]:
    """Cases 2k and 2k + 1 are two scans of patient ``Pk``."""
    return {_case_id(i): f"P{i // 2}" for i in range(n_cases)}


def _data(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(str(path)).dataobj)


@pytest.fixture()
def brats_root(tmp_path: Path) -> Path:
    return write_brats(tmp_path / "BraTS2021_Training_Data")


# ----------------------------------------------------------------------------- labels


def test_label_mapping_both_ways():
    brats = np.array([[0, 1], [2, 4]], dtype=np.float64)
    classes = brats_to_classes(brats)
    assert classes.dtype == np.uint8
    np.testing.assert_array_equal(classes, [[0, 1], [2, 3]])
    np.testing.assert_array_equal(classes_to_brats(classes), [[0, 1], [2, 4]])
    assert {name: CLASS_LABELS[name] for name in BRATS_LABELS} == {"background": 0, "NCR": 1, "ED": 2, "ET": 3}
    with pytest.raises(InputError, match=r"x_seg.nii.gz has values \[3, 5\] .*\[0, 1, 2, 4\]"):
        brats_to_classes(np.array([0, 3, 5, 4]), "x_seg.nii.gz")
    with pytest.raises(InputError, match=r"has values \[4\]"):
        classes_to_brats(np.array([0, 4]))
    with pytest.raises(InputError, match="non-integer"):
        brats_to_classes(np.array([0.0, 1.5]))
    np.testing.assert_array_equal(remap_labels(np.array([2, 0]), {0: 5, 2: 7}), [7, 5])


def test_recorded_mapping_and_modalities():
    meta = {"labels": {"background": 0, "ET": 1}, "channel_names": {"0": "FLAIR", "1": "t1"},
            "mixpriv": {"brats_labels": {"background": 0, "ET": 4}}}
    assert recorded_label_mapping(meta) == {0: 0, 1: 4}
    assert recorded_modalities(meta) == ("flair", "t1")
    with pytest.raises(InputError, match="record no BraTS values"):
        recorded_label_mapping({"labels": {"background": 0, "CSF": 1}})
    with pytest.raises(InputError, match=r"values \[0, 3\] must be distinct values of \[0, 1, 2, 4\]"):
        recorded_label_mapping({"labels": {"background": 0, "ET": 1}, "mixpriv": {"brats_labels": {"background": 0,
                                                                                                   "ET": 3}}})
    with pytest.raises(InputError, match=r"channel names \['T1w'\] are not among \['T1', 'T1ce', 'T2', 'FLAIR'\]"):
        recorded_modalities({"channel_names": {"0": "T1w"}})
    with pytest.raises(InputError, match="records modalities"):
        recorded_modalities({"channel_names": {"0": "T1ce"}, "mixpriv": {"modalities": ["t1ce", "t2"]}})


# ----------------------------------------------------------------------------- the BraTS folder


def test_folder_reads_t1ce_by_default(brats_root):
    folder = BratsFolder(brats_root)
    assert folder.modalities == ("t1ce",)
    assert folder.case_ids == ["BraTS2021_00000", "BraTS2021_00001", "BraTS2021_00002"]
    image, label, affine = folder.load("BraTS2021_00001")
    case_dir = brats_root / "BraTS2021_00001"
    assert image.shape == (1, *SHAPE) and image.dtype == np.float32
    np.testing.assert_array_equal(image[0], _data(case_dir / "BraTS2021_00001_t1ce.nii.gz"))
    np.testing.assert_array_equal(label, brats_to_classes(_seg(1)))
    assert sorted(np.unique(label).tolist()) == [0, 1, 2, 3]
    np.testing.assert_array_equal(affine, nib.load(str(case_dir / "BraTS2021_00001_t1ce.nii.gz")).affine)
    np.testing.assert_allclose(affine, AFFINE, atol=1e-6)
    subject = folder.subject("BraTS2021_00002")
    assert subject["case_id"] == "BraTS2021_00002" and subject[IMAGE].shape == (1, *SHAPE)
    assert sorted(subject[LABEL].data.unique().tolist()) == [0, 1, 2]  # this case has no ET
    with pytest.raises(KeyError, match="BraTS2021_00009"):
        folder.case("BraTS2021_00009")


def test_multichannel_in_the_order_given(brats_root):
    folder = BratsFolder(brats_root, modalities=["t2", "t1", "flair"])
    image, _, _ = folder.load("BraTS2021_00000")
    case_dir = brats_root / "BraTS2021_00000"
    assert image.shape == (3, *SHAPE)
    for channel, modality in enumerate(["t2", "t1", "flair"]):
        np.testing.assert_array_equal(image[channel], _data(case_dir / f"BraTS2021_00000_{modality}.nii.gz"))
    assert 250 < image[0].mean() < 350 and 50 < image[1].mean() < 150  # t2 then t1, not the file order


def test_splits_by_case_are_deterministic(tmp_path):
    ids = [_case_id(i) for i in range(10)]
    splits = split_cases(ids, (0.6, 0.2, 0.2), seed=3)
    assert sorted(splits) == ids
    assert [list(splits.values()).count(name) for name in SPLITS] == [6, 2, 2]
    assert split_cases(list(reversed(ids)), (0.6, 0.2, 0.2), seed=3) == splits  # order of the ids does not matter
    assert split_cases(ids, (0.6, 0.2, 0.2), seed=4) != splits
    assert set(split_cases(ids, (1.0, 0.0, 0.0)).values()) == {TRAIN}
    with pytest.raises(InputError, match="summing to 1"):
        split_cases(ids, (0.5, 0.2, 0.2))
    with pytest.raises(InputError, match="leave no training case out of 2"):
        split_cases(ids[:2], (0.2, 0.4, 0.4))


# ----------------------------------------------------------------------------- conversion


def test_round_trip_brats_nnunet_brats(brats_root, tmp_path):
    dataset = brats_to_nnunet(brats_root, tmp_path / "nnUNet_raw", modalities=["t1ce", "flair"], dataset_id=7, seed=0)
    assert dataset == tmp_path / "nnUNet_raw" / "Dataset007_BraTS2021"
    meta = json.loads((dataset / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "T1ce", "1": "FLAIR"}
    assert meta["labels"] == {"background": 0, "NCR": 1, "ED": 2, "ET": 3}
    assert meta["mixpriv"]["brats_labels"] == {"background": 0, "NCR": 1, "ED": 2, "ET": 4}
    assert meta["mixpriv"]["modalities"] == ["t1ce", "flair"]

    folder = DatasetFolder(dataset)
    assert folder.labels == CLASS_LABELS and folder.n_channels == 2
    expected = split_cases([_case_id(i) for i in range(3)], seed=0)
    assert {c.case_id: c.split for split in SPLITS for c in folder.cases(split)} == expected
    assert meta["numTraining"] == 2
    for split in SPLITS:
        for case in folder.cases(split):
            source = brats_root / case.case_id
            assert case.image_paths[0].parent.name == ("imagesTs" if split == TEST else "imagesTr")
            for path, modality in zip(case.image_paths, ["t1ce", "flair"], strict=True):
                assert path.read_bytes() == (source / f"{case.case_id}_{modality}.nii.gz").read_bytes()
            i = int(case.case_id[-5:])
            np.testing.assert_array_equal(_data(case.label_path), brats_to_classes(_seg(i)))
            np.testing.assert_array_equal(nib.load(str(case.label_path)).affine,
                                          nib.load(str(source / f"{case.case_id}_seg.nii.gz")).affine)
    subject = folder.case(_case_id(0)).to_subject()
    assert subject[IMAGE].shape == (2, *SHAPE)

    back = nnunet_to_brats(dataset, tmp_path / "back")
    assert sorted(p.name for p in back.iterdir()) == [_case_id(i) for i in range(3)]
    for i in range(3):
        case_id = _case_id(i)
        assert sorted(p.name for p in (back / case_id).iterdir()) == sorted(
            f"{case_id}_{kind}.nii.gz" for kind in ("t1ce", "flair", "seg"))
        for kind in ("t1ce", "flair", "seg"):
            original, restored = (nib.load(str(root / case_id / f"{case_id}_{kind}.nii.gz"))
                                  for root in (brats_root, back))
            np.testing.assert_array_equal(np.asanyarray(restored.dataobj), np.asanyarray(original.dataobj))
            assert np.asanyarray(restored.dataobj).dtype == np.asanyarray(original.dataobj).dtype
            np.testing.assert_array_equal(restored.affine, original.affine)
            np.testing.assert_array_equal(restored.get_qform(), original.get_qform())
            assert restored.header["sform_code"] == original.header["sform_code"] == 1
        assert sorted(np.unique(_data(back / case_id / f"{case_id}_seg.nii.gz")).tolist()) == sorted(
            np.unique(_seg(i)).tolist())
    assert BratsFolder(back, ["flair", "t1ce"]).case_ids == [_case_id(i) for i in range(3)]


def test_splits_of_a_converted_folder(tmp_path):
    root = write_brats(tmp_path / "brats", n_cases=10, modalities=("t1ce",))
    dataset = brats_to_nnunet(root, tmp_path / "out", fractions=(0.6, 0.2, 0.2), seed=5)
    folder = DatasetFolder(dataset)
    found = {split: sorted(c.case_id for c in folder.cases(split)) for split in SPLITS}
    expected = split_cases([_case_id(i) for i in range(10)], (0.6, 0.2, 0.2), seed=5)
    assert found == {split: sorted(c for c, s in expected.items() if s == split) for split in SPLITS}
    assert [len(found[split]) for split in SPLITS] == [6, 2, 2]
    assert sorted(p.name for p in (dataset / "imagesTs").iterdir()) == [f"{c}_0000.nii.gz" for c in found[TEST]]
    assert sorted(p.name for p in (dataset / "labelsTs").iterdir()) == [f"{c}.nii.gz" for c in found[TEST]]
    assert json.loads((dataset / "splits_final.json").read_text()) == [{"train": found[TRAIN], "val": found[VAL]}]
    again = brats_to_nnunet(root, tmp_path / "again", fractions=(0.6, 0.2, 0.2), seed=5)
    assert (again / "dataset.json").read_text() == (dataset / "dataset.json").read_text()
    assert not any(p.name.startswith(".tmp-") for p in dataset.rglob("*"))


def test_conversion_never_overwrites(brats_root, tmp_path):
    dataset = brats_to_nnunet(brats_root, tmp_path / "raw")
    before = (dataset / "dataset.json").read_text()
    with pytest.raises(OutputError, match="not an empty folder"):
        brats_to_nnunet(brats_root, tmp_path / "raw", seed=1)
    assert (dataset / "dataset.json").read_text() == before
    with pytest.raises(OutputError, match="lies inside the input"):
        brats_to_nnunet(brats_root, brats_root)
    with pytest.raises(OutputError, match="not an empty folder"):
        nnunet_to_brats(dataset, brats_root)
    with pytest.raises(OutputError, match="lies inside the input"):
        nnunet_to_brats(dataset, dataset / "brats")
    (tmp_path / "empty").mkdir()
    assert nnunet_to_brats(dataset, tmp_path / "empty") == tmp_path / "empty"


# ----------------------------------------------------------------------------- patients


def _straddling(splits: dict[str, str], patients: dict[str, str]) -> dict[str, set[str]]:
    """Patients whose cases fall into more than one split."""
    seen: dict[str, set[str]] = {}
    for case, split in splits.items():
        seen.setdefault(patients[case], set()).add(split)
    return {patient: found for patient, found in seen.items() if len(found) > 1}


def test_patients_csv_gives_each_case_its_patient(tmp_path):
    patients = {_case_id(0): "P0", _case_id(1): "P0", _case_id(3): "P1"}  # cases 2 and 4 are not listed
    root = write_brats(tmp_path / "brats", n_cases=5, modalities=("t1ce",), patients=patients)
    folder = BratsFolder(root)
    assert folder.patients == {**patients, _case_id(2): _case_id(2), _case_id(4): _case_id(4)}
    assert folder.patient_id(_case_id(1)) == "P0" and folder.patient_id(_case_id(2)) == _case_id(2)
    assert folder.subject(_case_id(1))["patient_id"] == "P0"
    with pytest.raises(KeyError, match="BraTS2021_00009"):
        folder.patient_id(_case_id(9))
    plain = BratsFolder(write_brats(tmp_path / "plain", n_cases=2, modalities=("t1ce",)))
    assert plain.patients == {_case_id(0): _case_id(0), _case_id(1): _case_id(1)}  # the challenge's folders
    assert plain.subject(_case_id(1))["patient_id"] == _case_id(1)
    (root / PATIENTS_FILE).write_text("\ufeffcase_id , patient_id\n\n BraTS2021_00004 ,P9\n")  # BOM, spaces, blanks
    assert BratsFolder(root).patients[_case_id(4)] == "P9"


def test_splits_are_by_patient(tmp_path):
    n_cases = 20
    patients = _pairs(n_cases)
    patients[_case_id(19)] = "P3"  # a patient with three scans; P9 keeps one
    root = write_brats(tmp_path / "brats", n_cases=n_cases, modalities=("t1ce",), patients=patients)
    folder = BratsFolder(root)
    for seed in range(8):
        splits = folder.splits((0.6, 0.2, 0.2), seed)
        assert sorted(splits) == [_case_id(i) for i in range(n_cases)]
        assert not _straddling(splits, patients), f"seed {seed}: a patient straddles splits"
        by_patient = {patients[case]: split for case, split in splits.items()}
        assert [list(by_patient.values()).count(name) for name in SPLITS] == [6, 2, 2]  # fractions of patients
        assert split_cases(list(patients), (0.6, 0.2, 0.2), seed, patients=patients) == splits
    by_case = split_cases(list(patients), (0.6, 0.2, 0.2), 0)  # the same cases without patients: by case
    assert [list(by_case.values()).count(name) for name in SPLITS] == [12, 4, 4]
    with pytest.raises(InputError, match="leave no training patient out of 1"):
        split_cases([_case_id(0), _case_id(1)], (0.0, 1.0, 0.0), patients={_case_id(0): "P", _case_id(1): "P"})
    with pytest.raises(InputError, match=r"no patient given for case\(s\) \['BraTS2021_00001'\]"):
        split_cases([_case_id(0), _case_id(1)], patients={_case_id(0): "P"})


def test_conversion_keeps_patients_together_and_records_them(tmp_path):
    n_cases = 12
    patients = _pairs(n_cases)
    root = write_brats(tmp_path / "brats", n_cases=n_cases, modalities=("t1ce",), patients=patients)
    for seed in range(4):
        dataset = brats_to_nnunet(root, tmp_path / f"out{seed}", seed=seed)
        meta = json.loads((dataset / "dataset.json").read_text())
        recorded = meta["mixpriv"]["cases"]
        assert {case: info["patient"] for case, info in recorded.items()} == patients
        assert meta["mixpriv"]["n_patients"] == n_cases // 2
        folder = DatasetFolder(dataset)
        cases = [case for split in SPLITS for case in folder.cases(split)]
        assert {case.case_id: case.patient_id for case in cases} == patients  # DatasetFolder sees the patients
        assert {case.case_id: case.to_subject()["patient_id"] for case in cases} == patients
        found = {case.case_id: case.split for case in cases}
        assert found == BratsFolder(root).splits(seed=seed)
        assert not _straddling(found, patients)
        fold = json.loads((dataset / "splits_final.json").read_text())[0]
        assert not {patients[c] for c in fold["train"]} & {patients[c] for c in fold["val"]}
        test_ids = {p.name[: -len("_0000.nii.gz")] for p in (dataset / "imagesTs").iterdir()}
        assert test_ids == {c for c, s in found.items() if s == TEST}
        assert not {patients[c] for c in test_ids} & {patients[c] for c in fold["train"] + fold["val"]}


def test_round_trip_keeps_patients(tmp_path):
    patients = {**_pairs(6), _case_id(5): _case_id(5)}  # case 5 is its own patient, listed as such
    root = write_brats(tmp_path / "brats", n_cases=6, modalities=("t1ce", "flair"), patients=patients)
    dataset = brats_to_nnunet(root, tmp_path / "raw", modalities=["t1ce", "flair"], seed=2)
    back = nnunet_to_brats(dataset, tmp_path / "back")
    assert (back / PATIENTS_FILE).read_text().splitlines() == [
        "case_id,patient_id", *(f"{case},{patients[case]}" for case in sorted(patients))]
    again = BratsFolder(back, ["t1ce", "flair"])
    assert again.patients == patients
    assert again.splits(seed=2) == BratsFolder(root).splits(seed=2)
    twice = brats_to_nnunet(back, tmp_path / "raw2", modalities=["t1ce", "flair"], seed=2)
    assert (twice / "dataset.json").read_text() == (dataset / "dataset.json").read_text()
    # a folder whose cases are their own patients converts back without patients.csv, as the challenge ships it
    plain = brats_to_nnunet(write_brats(tmp_path / "plain", n_cases=3, modalities=("t1ce",)), tmp_path / "raw3")
    assert not (nnunet_to_brats(plain, tmp_path / "back3") / PATIENTS_FILE).exists()


@pytest.mark.parametrize(("text", "message"), [
    ("case,patient\nBraTS2021_00000,P0\n", r"must start with the header case_id,patient_id, got 'case,patient'"),
    ("", "must start with the header case_id,patient_id, got 'an empty file'"),
    ("case_id,patient_id\nBraTS2021_00007,P0\n", r"line 2: case BraTS2021_00007 is not a case folder of"),
    ("case_id,patient_id\nBraTS2021_00000,P0\nBraTS2021_00001,P0\nBraTS2021_00000,P1\n",
     r"line 4: case BraTS2021_00000 is listed twice \(first on line 2\)"),
    ("case_id,patient_id\nBraTS2021_00000,\n", "line 2: expected two non-empty fields case_id,patient_id"),
    ("case_id,patient_id\nBraTS2021_00000,P0,extra\n", "line 2: expected two non-empty fields"),
    ("case_id,patient_id\nBraTS2021_00000\n", "line 2: expected two non-empty fields"),
])
def test_malformed_patients_csv(tmp_path, text, message):
    root = write_brats(tmp_path / "brats", n_cases=2, modalities=("t1ce",))
    (root / PATIENTS_FILE).write_text(text)
    with pytest.raises(InputError, match=message):
        BratsFolder(root)
    with pytest.raises(InputError, match=message):
        brats_to_nnunet(root, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # checked before anything is written


def test_patients_csv_that_is_no_file(tmp_path):
    root = write_brats(tmp_path / "brats", n_cases=1, modalities=("t1ce",))
    (root / PATIENTS_FILE).write_bytes(b"case_id,patient_id\n\xff\xfe,P0\n")
    with pytest.raises(InputError, match="cannot be read as UTF-8"):
        read_patients(root, [_case_id(0)])
    (root / PATIENTS_FILE).unlink()
    (root / PATIENTS_FILE).mkdir()
    with pytest.raises(InputError, match="is not a file"):
        read_patients(root, [_case_id(0)])


# ----------------------------------------------------------------------------- errors


def _case_file(root: Path, index: int, kind: str) -> Path:
    return root / _case_id(index) / f"{_case_id(index)}_{kind}.nii.gz"


def test_missing_modality_names_case_and_file(brats_root, tmp_path):
    _case_file(brats_root, 1, "t1ce").unlink()
    with pytest.raises(InputError, match=r"case BraTS2021_00001: modality file BraTS2021_00001_t1ce.nii.gz \(t1ce\) "
                                         "is missing"):
        BratsFolder(brats_root)
    with pytest.raises(InputError, match="BraTS2021_00001_t1ce.nii.gz"):
        brats_to_nnunet(brats_root, tmp_path / "out", modalities=["t2", "t1ce"])
    assert not (tmp_path / "out").exists()
    assert BratsFolder(brats_root, ["t2"]).case_ids[1] == "BraTS2021_00001"  # only the chosen ones are needed
    _case_file(brats_root, 2, "seg").unlink()
    with pytest.raises(InputError, match=r"case BraTS2021_00002: label file BraTS2021_00002_seg.nii.gz"):
        BratsFolder(brats_root, ["t2"])


def test_label_outside_brats_values(brats_root, tmp_path):
    seg = _seg(2)
    seg[0, 0, :2] = [3, 7]
    _save(seg, _case_file(brats_root, 2, "seg"))
    with pytest.raises(InputError, match=r"case BraTS2021_00002: label BraTS2021_00002_seg.nii.gz has values \[3, 7\] "
                                         r"that are not in the label set \[0, 1, 2, 4\]"):
        brats_to_nnunet(brats_root, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # checked before anything is written
    with pytest.raises(InputError, match=r"values \[3, 7\]"):
        BratsFolder(brats_root).load("BraTS2021_00002")


def test_shape_mismatch_between_modalities(brats_root, tmp_path):
    _save(np.zeros((8, 8, 9), np.float32), _case_file(brats_root, 0, "flair"))
    with pytest.raises(InputError, match=r"case BraTS2021_00000: image BraTS2021_00000_flair.nii.gz shape \(8, 8, 9\) "
                                         r"does not match first channel shape \(8, 8, 8\)"):
        brats_to_nnunet(brats_root, tmp_path / "out", modalities=["t1ce", "flair"])
    brats_to_nnunet(brats_root, tmp_path / "out", modalities=["t1ce"])  # flair not chosen: fine
    _save(np.zeros((8, 9, 8), np.uint8), _case_file(brats_root, 1, "seg"))
    with pytest.raises(InputError, match=r"label BraTS2021_00001_seg.nii.gz shape \(8, 9, 8\) does not match"):
        BratsFolder(brats_root).validate()


def test_affine_mismatch_between_modalities(brats_root):
    shifted = AFFINE.copy()
    shifted[0, 3] += 0.5
    _save(_data(_case_file(brats_root, 2, "t2")), _case_file(brats_root, 2, "t2"), shifted)
    with pytest.raises(InputError, match="case BraTS2021_00002: image BraTS2021_00002_t2.nii.gz affine differs"):
        BratsFolder(brats_root, ["t1ce", "t2"]).validate()
    _save(_seg(1), _case_file(brats_root, 1, "seg"), shifted)
    with pytest.raises(InputError, match="label BraTS2021_00001_seg.nii.gz affine differs"):
        BratsFolder(brats_root).load("BraTS2021_00001")


def test_empty_or_missing_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no cases")
    with pytest.raises(InputError, match="holds no case folder: expected .*BraTS2021_XXXXX/BraTS2021_XXXXX_"):
        BratsFolder(tmp_path / "empty")
    with pytest.raises(InputError, match="does not exist"):
        BratsFolder(tmp_path / "nowhere")
    root = write_brats(tmp_path / "brats", n_cases=1)
    with pytest.raises(InputError, match="looks like one case folder"):
        BratsFolder(root / "BraTS2021_00000")


def test_names_that_do_not_follow_the_layout(brats_root):
    wrong = _case_file(brats_root, 1, "t1ce")
    wrong.rename(wrong.with_name("BraTS2021_00001_T1CE.nii.gz"))
    with pytest.raises(InputError, match=r"case BraTS2021_00001: file\(s\) \['BraTS2021_00001_T1CE.nii.gz'\] .*"
                                         "do not follow the BraTS 2021 naming"):
        BratsFolder(brats_root)
    (brats_root / "BraTS2021_00001" / "BraTS2021_00001_T1CE.nii.gz").rename(wrong)
    _case_file(brats_root, 0, "t2").rename(brats_root / "BraTS2021_00000" / "BraTS2021_00001_t2.nii.gz")
    with pytest.raises(InputError, match=r"\['BraTS2021_00001_t2.nii.gz'\]"):
        BratsFolder(brats_root)
    (brats_root / "BraTS2021_00000" / "BraTS2021_00001_t2.nii.gz").unlink()
    (brats_root / "BraTS2021_00000" / ".DS_Store").write_text("")  # hidden files are ignored
    assert len(BratsFolder(brats_root).cases) == 3
    (brats_root / "case3").mkdir()
    with pytest.raises(InputError, match="case folder .*case3 does not follow the BraTS 2021 naming"):
        BratsFolder(brats_root)


def test_bad_arguments(brats_root, tmp_path, tiny_folder):
    assert check_modalities(["flair", "t1"]) == ("flair", "t1")
    with pytest.raises(InputError, match="unknown BraTS modality 't1c'"):
        BratsFolder(brats_root, ["t1c"])
    with pytest.raises(InputError, match="name a modality twice"):
        BratsFolder(brats_root, ["t1ce", "t1ce"])
    with pytest.raises(InputError, match="non-empty list"):
        BratsFolder(brats_root, "t1ce")
    for dataset_id in (0, 1000, True):
        with pytest.raises(InputError, match="dataset id must be an integer from 1 to 999"):
            brats_to_nnunet(brats_root, tmp_path / "out", dataset_id=dataset_id)
    with pytest.raises(InputError, match="record no BraTS values"):  # the tissue folder: CSF/GM/WM
        nnunet_to_brats(tiny_folder, tmp_path / "back")
    assert not (tmp_path / "out").exists() and not (tmp_path / "back").exists()


# ----------------------------------------------------------------------------- CLI


def _cli(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="mixpriv")
    add_convert_brats(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.func(args)


def test_cli_convert_brats_both_ways(brats_root, tmp_path, capsys):
    _cli(["convert-brats", str(brats_root), str(tmp_path / "raw"), "--modalities", "t1ce", "t2",
          "--dataset-id", "12", "--seed", "1", "--split-fractions", "0.34", "0.33", "0.33"])
    dataset = tmp_path / "raw" / "Dataset012_BraTS2021"
    assert capsys.readouterr().out.strip() == str(dataset)
    folder = DatasetFolder(dataset)
    assert folder.n_channels == 2 and folder.labels == CLASS_LABELS
    expected = split_cases([_case_id(i) for i in range(3)], (0.34, 0.33, 0.33), seed=1)
    assert {c.case_id: c.split for split in SPLITS for c in folder.cases(split)} == expected

    _cli(["convert-brats", str(dataset), str(tmp_path / "back"), "--to", "brats"])
    assert capsys.readouterr().out.strip() == str(tmp_path / "back")
    back = BratsFolder(tmp_path / "back", ["t1ce", "t2"])
    for case_id in back.case_ids:
        for kind in ("t1ce", "t2", "seg"):
            name = f"{case_id}_{kind}.nii.gz"
            np.testing.assert_array_equal(_data(tmp_path / "back" / case_id / name), _data(brats_root / case_id / name))

    with pytest.raises(InputError, match="--seed, --split-fractions only apply to --to nnunet"):
        _cli(["convert-brats", str(dataset), str(tmp_path / "b2"), "--to", "brats", "--seed", "2",
              "--split-fractions", "1", "0", "0"])
    with pytest.raises(InputError, match="unknown BraTS modality 'T1ce'"):
        _cli(["convert-brats", str(brats_root), str(tmp_path / "raw2"), "--modalities", "T1ce"])
    _cli(["convert-brats", str(brats_root), str(tmp_path / "raw3")])  # defaults: t1ce, Dataset001, seed 0
    assert json.loads((tmp_path / "raw3" / "Dataset001_BraTS2021" / "dataset.json").read_text())["channel_names"] == {
        "0": "T1ce"}
