"""Data sources: nnU-Net folders pass through, BraTS folders and the embedded tumour cohort are converted into the cache."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from test_brats import write_brats

import mixpriv.data.tumour as tumour_module
from mixpriv.data.folder import DatasetFolder
from mixpriv.data.sources import EMBEDDED_TUMOUR, is_brats_folder, resolve_data_dir


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MIXPRIV_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_an_nnunet_folder_passes_through(tmp_path, home):
    folder = tmp_path / "Dataset007_X"
    folder.mkdir()
    (folder / "dataset.json").write_text("{}")
    assert resolve_data_dir(folder) == folder
    assert not is_brats_folder(folder) and not home.exists()


def test_a_brats_folder_is_converted_once_into_the_cache_and_again_when_it_changes(tmp_path, home):
    src = write_brats(tmp_path / "BraTS2021_Training_Data", n_cases=5)
    assert is_brats_folder(src)
    dataset = resolve_data_dir(src)
    assert home in dataset.parents and src not in dataset.parents  # never next to the input
    folder = DatasetFolder(dataset)
    assert folder.labels == {"background": 0, "NCR": 1, "ED": 2, "ET": 3}
    assert sum(len(folder.cases(split)) for split in ("train", "val", "test")) == 5
    marker = dataset / "dataset.json"
    first = marker.stat().st_mtime_ns
    assert resolve_data_dir(src) == dataset and marker.stat().st_mtime_ns == first  # reused
    seg = src / "BraTS2021_00000" / "BraTS2021_00000_seg.nii.gz"
    later = marker.stat().st_mtime + 10
    os.utime(seg, (later, later))
    assert resolve_data_dir(src) == dataset and marker.stat().st_mtime_ns != first  # converted again
    assert not [p for p in dataset.parent.parent.iterdir() if p.name.startswith(".")]  # no staging left


def test_the_embedded_tumour_cohort_is_built_and_converted(tmp_path, home, monkeypatch):
    built, build = [], tumour_module.build_tumour_cohort

    def tiny_cohort(out_dir=None, **kwargs):
        built.append(kwargs["spacing"])
        return build(tmp_path / "tumour", n_patients=3, spacing=6.0, workers=1)

    monkeypatch.setattr(tumour_module, "build_tumour_cohort", tiny_cohort)
    folder = DatasetFolder(resolve_data_dir(EMBEDDED_TUMOUR, embedded_spacing=6.0))
    assert built == [6.0]
    cases = folder.cases("train") + folder.cases("val") + folder.cases("test")
    assert len(cases) == 6 and len({c.patient_id for c in cases}) == 3  # two scans per patient
    for patient in {c.patient_id for c in cases}:
        assert len({c.split for c in cases if c.patient_id == patient}) == 1  # a patient's scans in one split
    case = cases[0]
    assert case.case_id.startswith("BraTS2021_") and len(case.image_paths) == 1  # T1ce
    values = set(np.unique(np.asanyarray(nib.load(str(case.label_path)).dataobj)).tolist())
    assert {0, 2, 3} <= values <= {0, 1, 2, 3}  # consecutive classes; oedema and enhancing tumour in every case
