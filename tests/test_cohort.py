"""The embedded synthetic brain cohort (tiny settings: 4 mm, a handful of patients)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mixpriv.constants import ENV_HOME
from mixpriv.data.cohort import LABELS, build_cohort, default_cohort_dir

SMALL = {"n_patients": 5, "scans_per_patient": 2, "spacing": 4.0, "seed": 0, "progress": False}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    return build_cohort(tmp_path_factory.mktemp("cohort") / "c", **SMALL)


def _cases(folder: Path) -> dict[str, dict]:
    return json.loads((folder / "dataset.json").read_text())["mixpriv"]["cases"]


def _paths(folder: Path, case: str) -> tuple[Path, Path]:
    suffix = "Ts" if _cases(folder)[case]["split"] == "test" else "Tr"
    return folder / f"images{suffix}" / f"{case}_0000.nii.gz", folder / f"labels{suffix}" / f"{case}.nii.gz"


def _arrays(folder: Path, case: str) -> tuple[np.ndarray, np.ndarray]:
    image, label = (np.asarray(nib.load(p).dataobj) for p in _paths(folder, case))
    return image, label


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([2 * np.sum((a == k) & (b == k)) / (np.sum(a == k) + np.sum(b == k)) for k in (1, 2, 3)]))


def test_same_seed_gives_identical_arrays_and_other_seed_differs(cohort, tmp_path):
    # The fixture builds with one process per core; rebuilding serially must give the same bytes.
    again = build_cohort(tmp_path / "again", **SMALL, workers=1)
    other = build_cohort(tmp_path / "other", **{**SMALL, "seed": 1})
    for case in _cases(cohort):
        image, label = _arrays(cohort, case)
        image2, label2 = _arrays(again, case)
        assert image.tobytes() == image2.tobytes() and label.tobytes() == label2.tobytes()
    image, label = _arrays(cohort, "P000_S0")
    image3, label3 = _arrays(other, "P000_S0")
    assert not np.array_equal(image, image3) and not np.array_equal(label, label3)


def test_a_case_does_not_depend_on_how_many_others_are_built(cohort, tmp_path):
    fewer = build_cohort(tmp_path / "fewer", **{**SMALL, "n_patients": 3, "scans_per_patient": 1})
    for case in ("P000_S0", "P002_S0"):
        assert all(np.array_equal(a, b) for a, b in zip(_arrays(cohort, case), _arrays(fewer, case)))


def test_splits_are_by_patient_and_every_case_is_listed(cohort):
    cases = _cases(cohort)
    assert sorted(cases) == [f"P{p:03d}_S{s}" for p in range(5) for s in range(2)]
    for case, info in cases.items():
        assert case == f"{info['patient']}_S{info['scan']}"
        assert info["split"] in ("train", "val", "test")
    split_of_patient: dict[str, set[str]] = {}
    for info in cases.values():
        split_of_patient.setdefault(info["patient"], set()).add(info["split"])
    assert all(len(splits) == 1 for splits in split_of_patient.values())
    assert sorted(s for (s,) in split_of_patient.values()) == ["test", "train", "train", "train", "val"]
    (fold,) = json.loads((cohort / "splits_final.json").read_text())
    assert fold["train"] == sorted(c for c, i in cases.items() if i["split"] == "train")
    assert fold["val"] == sorted(c for c, i in cases.items() if i["split"] == "val")


def test_nnunet_layout_and_file_naming(cohort):
    cases = _cases(cohort)
    tr = sorted(c for c, i in cases.items() if i["split"] != "test")
    ts = sorted(c for c, i in cases.items() if i["split"] == "test")
    assert sorted(p.name for p in (cohort / "imagesTr").iterdir()) == [f"{c}_0000.nii.gz" for c in tr]
    assert sorted(p.name for p in (cohort / "labelsTr").iterdir()) == [f"{c}.nii.gz" for c in tr]
    assert sorted(p.name for p in (cohort / "imagesTs").iterdir()) == [f"{c}_0000.nii.gz" for c in ts]
    assert sorted(p.name for p in (cohort / "labelsTs").iterdir()) == [f"{c}.nii.gz" for c in ts]
    assert (cohort / "preview.png").stat().st_size > 0
    assert not [p for p in cohort.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_dataset_json(cohort):
    ds = json.loads((cohort / "dataset.json").read_text())
    assert ds["name"] == "MixprivTissue4mm"
    assert ds["reference"] == "MNI ICBM152 2009a (nilearn)"
    assert ds["description"] and ds["licence"]
    assert ds["channel_names"] == {"0": "T1"}
    assert ds["labels"] == {"background": 0, "CSF": 1, "GM": 2, "WM": 3} == LABELS
    assert ds["numTraining"] == 8 and ds["file_ending"] == ".nii.gz"
    meta = ds["mixpriv"]
    assert meta["generator"] == "mixpriv.data.cohort" and meta["generator_version"] == 1
    assert (meta["seed"], meta["spacing_mm"], meta["n_patients"], meta["scans_per_patient"]) == (0, 4.0, 5, 2)
    assert meta["split_fractions"] == [0.6, 0.2, 0.2]


def test_labels_images_and_affines(cohort):
    for case in _cases(cohort):
        image_path, label_path = _paths(cohort, case)
        image_nii, label_nii = nib.load(image_path), nib.load(label_path)
        image, label = np.asarray(image_nii.dataobj), np.asarray(label_nii.dataobj)
        assert image.dtype == np.float32 and label.dtype == np.uint8
        assert image.shape == label.shape == (44, 52, 44)
        assert set(np.unique(label)) == {0, 1, 2, 3}
        assert np.isfinite(image).all() and image.min() >= 0 and image[label > 0].mean() > 0.3
        for axis in range(3):  # the brain is inside the field of view
            assert not np.take(label, [0, -1], axis=axis).any()
        for nii in (image_nii, label_nii):
            assert np.allclose(nii.affine[:3, :3], 4.0 * np.eye(3))  # RAS, 4 mm
            assert np.allclose(nii.affine, image_nii.affine)
            assert int(nii.header["sform_code"]) == int(nii.header["qform_code"]) == 4  # MNI
            origin_voxel = np.linalg.inv(nii.affine) @ [0, 0, 0, 1]  # MNI (0, 0, 0) on a voxel centre
            assert np.allclose(origin_voxel, np.round(origin_voxel))


def test_scans_of_one_patient_are_more_alike_than_other_patients(cohort):
    labels = {case: _arrays(cohort, case)[1] for case in _cases(cohort)}
    for p in range(5):
        within = _dice(labels[f"P{p:03d}_S0"], labels[f"P{p:03d}_S1"])
        between = [_dice(labels[f"P{p:03d}_S{s}"], labels[f"P{q:03d}_S{t}"])
                   for q in range(5) if q != p for s in range(2) for t in range(2)]
        assert within < 1.0 and within > max(between)
        assert not np.array_equal(_arrays(cohort, f"P{p:03d}_S0")[0], _arrays(cohort, f"P{p:03d}_S1")[0])


def test_second_call_reuses_the_folder(cohort):
    marker = cohort / "dataset.json"
    some_image = next((cohort / "imagesTr").iterdir())
    before = (marker.stat().st_mtime_ns, some_image.stat().st_mtime_ns)
    assert build_cohort(cohort, **SMALL) == cohort
    assert (marker.stat().st_mtime_ns, some_image.stat().st_mtime_ns) == before


def test_mismatching_parameters_raise_unless_overwrite(cohort, tmp_path):
    with pytest.raises(ValueError, match="overwrite"):
        build_cohort(cohort, **{**SMALL, "seed": 1})
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("not a cohort")
    small = {**SMALL, "n_patients": 3, "scans_per_patient": 1}
    with pytest.raises(ValueError, match="not a complete cohort"):
        build_cohort(stranger, **small)
    assert build_cohort(stranger, **small, overwrite=True) == stranger
    assert not (stranger / "notes.txt").exists() and (stranger / "dataset.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stranger"]


@pytest.mark.parametrize("bad", [{"spacing": 0.5}, {"split_fractions": (0.5, 0.2, 0.2)},
                                 {"n_patients": 2, "split_fractions": (0.2, 0.4, 0.4)}, {"seed": -1}])
def test_invalid_parameters(tmp_path, bad):
    with pytest.raises(ValueError):
        build_cohort(tmp_path / "c", **{**SMALL, **bad})
    assert not (tmp_path / "c").exists()


def test_default_cohort_dir_and_build_to_it(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_HOME, str(tmp_path))
    assert default_cohort_dir() == tmp_path / "cohorts" / "tissue-2mm-p60x2-seed0"
    assert default_cohort_dir(1.5, 3, 10, 1).name == "tissue-1p5mm-p10x1-seed3"
    small = {**SMALL, "n_patients": 3, "scans_per_patient": 1}
    assert build_cohort(None, **small) == default_cohort_dir(4.0, 0, 3, 1)
    monkeypatch.delenv(ENV_HOME)
    assert default_cohort_dir() == Path("~/.cache/mixpriv").expanduser() / "cohorts" / "tissue-2mm-p60x2-seed0"
