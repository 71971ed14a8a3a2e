"""The embedded synthetic tumour cohort (tiny settings: 4 mm, three patients scanned twice)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from mixpriv.constants import ENV_HOME, SPLITS
from mixpriv.data.brats import BratsFolder, classes_to_brats
from mixpriv.data.brats_convert import brats_to_nnunet
from mixpriv.data.brats_patients import PATIENTS_FILE
from mixpriv.data.cohort import load_template, output_grid
from mixpriv.data.folder import DatasetFolder
from mixpriv.data.tumour import (
    build_tumour_cohort,
    case_id,
    default_tumour_cohort_dir,
    make_case,
    patient_id,
)

SPACING, N_PATIENTS, SCANS = 4.0, 3, 2
N_CASES = N_PATIENTS * SCANS
RIM = ndimage.generate_binary_structure(3, 1)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    return build_tumour_cohort(tmp_path_factory.mktemp("tumour") / "c", n_patients=N_PATIENTS, spacing=SPACING,
                               workers=1)


def _arrays(folder: Path, name: str) -> dict[str, np.ndarray]:
    return {kind: np.asarray(nib.load(str(folder / name / f"{name}_{kind}.nii.gz")).dataobj)
            for kind in ("t1ce", "flair", "seg")}


def test_layout_and_parameters(cohort):
    assert sorted(p.name for p in cohort.iterdir()) == [*(case_id(i) for i in range(N_CASES)), "cohort.json",
                                                         "patients.csv", "preview.png"]
    stored = json.loads((cohort / "cohort.json").read_text())
    assert stored["n_patients"] == N_PATIENTS and stored["scans_per_patient"] == SCANS == 2
    assert stored["spacing_mm"] == SPACING and set(stored["cases"]) == {case_id(i) for i in range(N_CASES)}
    arrays = _arrays(cohort, case_id(0))
    assert arrays["seg"].dtype == np.uint8 and arrays["t1ce"].dtype == np.float32
    assert arrays["t1ce"].shape == arrays["seg"].shape == (44, 52, 44)
    assert set(np.unique(arrays["seg"])) <= {0, 1, 2, 4}


def test_preview_png_written(cohort):
    preview = cohort / "preview.png"
    assert preview.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and preview.stat().st_size > 10_000


def test_patients_recorded_in_patients_csv_and_cohort_json(cohort):
    expected = [f"{case_id(p * SCANS + s)},{patient_id(p)}" for p in range(N_PATIENTS) for s in range(SCANS)]
    assert (cohort / PATIENTS_FILE).read_text().splitlines() == ["case_id,patient_id", *expected]
    stored = json.loads((cohort / "cohort.json").read_text())["cases"]
    for p in range(N_PATIENTS):
        first, second = (stored[case_id(p * SCANS + s)] for s in range(SCANS))
        assert (first["patient"], first["scan"], second["patient"], second["scan"]) == (
            patient_id(p), 0, patient_id(p), 1)
        assert first["tumour"] == second["tumour"]  # one tumour per patient
        for label, volume in first["volume_ml"].items():  # the same volume up to resampling after the motion
            assert abs(second["volume_ml"][label] - volume) <= 0.15 * volume + 0.2, (p, label)
    assert len({json.dumps(stored[case_id(p * SCANS)]["tumour"]) for p in range(N_PATIENTS)}) == N_PATIENTS


def test_same_seed_same_arrays_other_seed_differs(cohort, tmp_path):
    # one scan per patient and 2 workers: scan 0 of each patient is the same as in the cohort (case 2p there)
    again = build_tumour_cohort(tmp_path / "again", n_patients=2, scans_per_patient=1, spacing=SPACING, workers=2)
    other = build_tumour_cohort(tmp_path / "other", n_patients=1, scans_per_patient=1, spacing=SPACING, seed=1,
                                workers=1)
    for p in range(2):
        first, second = _arrays(cohort, case_id(p * SCANS)), _arrays(again, case_id(p))
        for kind in first:
            assert first[kind].tobytes() == second[kind].tobytes()
    assert not np.array_equal(_arrays(cohort, case_id(0))["seg"], _arrays(other, case_id(0))["seg"])
    assert (again / PATIENTS_FILE).read_text().splitlines()[1:] == [f"{case_id(p)},{patient_id(p)}" for p in range(2)]


def test_cache_reused_and_foreign_folder_refused(cohort, tmp_path, monkeypatch):
    stamp = (cohort / "cohort.json").stat().st_mtime_ns
    assert build_tumour_cohort(cohort, n_patients=N_PATIENTS, spacing=SPACING) == cohort
    assert (cohort / "cohort.json").stat().st_mtime_ns == stamp
    for other in ({"n_patients": N_PATIENTS + 1}, {"n_patients": N_PATIENTS, "scans_per_patient": 1}):
        with pytest.raises(ValueError, match="already holds"):
            build_tumour_cohort(cohort, spacing=SPACING, **other)
    monkeypatch.setenv(ENV_HOME, str(tmp_path))
    assert default_tumour_cohort_dir(SPACING, 3, 5, 2) == tmp_path / "cohorts" / "tumour-4mm-p5x2-seed3"
    assert default_tumour_cohort_dir().name == "tumour-2mm-p24x2-seed0"
    for bad in ({"n_patients": 0}, {"scans_per_patient": 0}):
        with pytest.raises(ValueError, match="n_patients >= 1 and scans_per_patient >= 1"):
            build_tumour_cohort(tmp_path / "x", **bad)


def test_every_label_in_most_cases(cohort):
    present = np.array([[np.any(_arrays(cohort, case_id(i))["seg"] == v) for v in (1, 2, 4)] for i in range(N_CASES)])
    assert present[:, 1].all() and present[:, 2].all()  # oedema and enhancing tumour always
    assert present[:, 0].sum() >= N_CASES // 2  # a necrotic core in most patients (3 in 4 on average)
    assert (present[::SCANS] == present[1::SCANS]).all()  # the same tumour in both scans of a patient


def test_rim_surrounds_core_and_oedema_outside_it(cohort):
    for i in range(N_CASES):
        seg = _arrays(cohort, case_id(i))["seg"]
        core = seg == 1
        around = ndimage.binary_dilation(core, RIM) & ~core
        assert np.all(seg[around] == 4), f"case {i}: the necrotic core touches something else than ET"
        oedema_near_core = (seg == 2) & ndimage.binary_dilation(core, RIM, iterations=1)
        assert not oedema_near_core.any()
        solid = (seg == 1) | (seg == 4)
        assert ndimage.label(solid)[1] >= 1 and (seg == 2).sum() > 0


def test_tumour_inside_the_brain():
    for index in range(3):
        case = make_case(0, index, SPACING)
        assert case.classes.any()
        assert np.all(case.tissue[case.classes > 0] > 0), "tumour voxels outside the brain mask"
        ijk = np.argwhere(case.classes > 0)
        shape = np.array(case.classes.shape)
        assert ijk.min() > 1 and np.all(ijk.max(0) < shape - 2)


def test_t1ce_intensity_ordering(cohort):
    checked = 0
    for i in range(N_CASES):
        arrays = _arrays(cohort, case_id(i))
        seg, t1ce, flair = arrays["seg"], arrays["t1ce"], arrays["flair"]
        means = {v: float(t1ce[seg == v].mean()) for v in (1, 2, 4) if np.any(seg == v)}
        assert means[4] > means[2], f"case {i}: ET not brighter than ED in T1ce"
        if 1 in means:
            assert means[1] < min(means[2], means[4]), f"case {i}: NCR not the darkest part of the tumour"
            checked += 1
        healthy = t1ce[(seg == 0) & (t1ce > 0)]
        assert means[2] < np.percentile(healthy, 90)  # oedema mildly dark, not brighter than white matter
        assert float(flair[seg == 2].mean()) > np.percentile(flair[(seg == 0) & (flair > 0)], 90)  # bright oedema
    assert checked >= N_CASES // 2


def _best_scale(moved: np.ndarray, reference: np.ndarray, centre: np.ndarray, world: np.ndarray,
                affine: np.ndarray) -> tuple[float, float, float]:
    """Radial scale k at which ``reference`` at c + k (x - c) best matches ``moved`` at the points x (3, N).

    Returns k, the best correlation and the correlation at k = 1 (no shift).
    """
    to_voxel, scores, scales = np.linalg.inv(affine), [], np.linspace(0.6, 1.0, 41)
    voxels = to_voxel[:3, :3] @ world + to_voxel[:3, 3:]
    for k in scales:
        source = centre[:, None] + (world - centre[:, None]) * k
        values = ndimage.map_coordinates(reference, to_voxel[:3, :3] @ source + to_voxel[:3, 3:], order=1)
        scores.append(np.corrcoef(ndimage.map_coordinates(moved, voxels, order=0), values)[0, 1])
    return float(scales[int(np.argmax(scores))]), float(max(scores)), float(scores[-1])


def test_mass_effect_pushes_anatomy_outwards():
    shape, affine = output_grid(SPACING, load_template(SPACING).centre)
    world = (affine[:3, :3] @ np.indices(shape, np.float32).reshape(3, -1)) + affine[:3, 3:]
    for index in range(2):
        pushed, still = make_case(0, index, SPACING), make_case(0, index, SPACING, push=False)
        assert pushed.tumour.push_mm > 0 and still.tumour.push_mm == 0
        centre, radius = (pushed.to_scan @ [*pushed.tumour.centre, 1.0])[:3], pushed.tumour.radii.max()  # scan frame
        r = np.linalg.norm(world - centre[:, None], axis=0)
        shell = world[:, (r > radius) & (r < 1.6 * radius) & (pushed.tissue.ravel() > 0)]
        assert _best_scale(still.anatomy, still.anatomy, centre, shell, affine)[0] == 1.0  # no push, no shift
        k, best, unshifted = _best_scale(pushed.anatomy, still.anatomy, centre, shell, affine)
        assert k < 0.97 and best > unshifted + 0.005, f"case {index}: anatomy not pushed outwards ({k}, {best})"
        far = (r > 4 * radius + 20) & (pushed.tissue.ravel() > 0)
        assert np.abs(pushed.anatomy.ravel()[far] - still.anatomy.ravel()[far]).mean() < 0.01


def test_readable_by_brats_folder_and_convertible(cohort, tmp_path):
    for modalities in (("t1ce",), ("t1ce", "flair")):
        folder = BratsFolder(cohort, modalities=modalities)
        assert folder.case_ids == [case_id(i) for i in range(N_CASES)]
        folder.validate()
        image, label, _ = folder.load(case_id(0))
        assert image.shape[0] == len(modalities) and set(np.unique(label)) <= {0, 1, 2, 3} and label.max() == 3
    with pytest.raises(Exception, match="t2"):
        BratsFolder(cohort, modalities=("t2",))
    dataset = brats_to_nnunet(cohort, tmp_path / "nnUNet_raw", dataset_id=501)
    assert dataset.name == "Dataset501_BraTS2021"
    meta = json.loads((dataset / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "T1ce"} and len(meta["mixpriv"]["cases"]) == N_CASES
    assert len(list((dataset / "labelsTr").glob("*.nii.gz"))) + len(list((dataset / "labelsTs").glob("*.nii.gz"))) \
        == N_CASES
    converted = DatasetFolder(dataset)
    cases = [case for split in SPLITS for case in converted.cases(split)]
    assert len(cases) == N_CASES
    assert {case.case_id: case.patient_id for case in cases} == {
        case_id(i): patient_id(i // SCANS) for i in range(N_CASES)}  # the patients reach DatasetFolder
    split_of: dict[str, set[str]] = {}
    for case in cases:
        split_of.setdefault(case.patient_id, set()).add(case.split)
    assert all(len(found) == 1 for found in split_of.values()), f"a patient straddles splits: {split_of}"
    assert sorted(next(iter(found)) for found in split_of.values()) == ["test", "train", "val"]  # 1/1/1 patients


def _voxels_of(case, affine: np.ndarray, world: np.ndarray, other) -> np.ndarray:
    """Voxel coordinates in ``other``'s scan of the points that are at ``world`` in ``case``'s scan (same patient)."""
    frame = np.linalg.inv(case.to_scan) @ np.vstack([world, np.ones(world.shape[1])])
    return (np.linalg.inv(affine) @ other.to_scan @ frame)[:3]


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.sum(a & b) / max(1, a.sum() + b.sum()))


def test_two_scans_of_a_patient_share_labels_up_to_motion_and_differ_in_intensities(cohort):
    shape, affine = output_grid(SPACING, load_template(SPACING).centre)
    world = (affine[:3, :3] @ np.indices(shape, np.float32).reshape(3, -1)) + affine[:3, 3:]
    for p in range(2):
        first, second = (make_case(0, p, SPACING, scan=s) for s in range(SCANS))
        for s, case in enumerate((first, second)):  # the files are scan s of patient p
            seg = _arrays(cohort, case_id(p * SCANS + s))["seg"]
            assert seg.tobytes() == classes_to_brats(case.classes).tobytes()
        assert first.tumour.describe() == second.tumour.describe()  # one patient draw: the same tumour
        rotation = second.to_scan[:3, :3] @ np.linalg.inv(first.to_scan[:3, :3])
        moved = np.degrees(np.arccos(np.clip((np.trace(rotation) - 1) / 2, -1, 1)))
        assert 0 < moved < 4.5 and not np.allclose(first.to_scan, second.to_scan)  # a small rigid motion apart
        voxels = _voxels_of(first, affine, world, second)
        labels = ndimage.map_coordinates(second.classes, voxels, order=0).reshape(shape)
        whole = _dice(first.classes > 0, labels > 0)
        assert whole > 0.85, f"patient {p}: whole tumour Dice {whole:.3f} between its scans, motion undone"
        for value in (2, 3):
            assert _dice(first.classes == value, labels == value) > 0.7, (p, value)
        brain = first.tissue > 0
        anatomy = ndimage.map_coordinates(second.anatomy, voxels, order=1).reshape(shape)
        assert np.corrcoef(first.anatomy[brain], anatomy[brain])[0, 1] > 0.95  # the same anatomy
        assert np.corrcoef(first.anatomy[brain], second.anatomy[brain])[0, 1] < 0.95  # ... but moved
        anatomy_change = np.abs(anatomy[brain] - first.anatomy[brain]).mean() / first.anatomy[brain].mean()
        for modality in first.images:
            image = ndimage.map_coordinates(second.images[modality], voxels, order=1).reshape(shape)
            reference = first.images[modality][brain]
            change = np.abs(image[brain] - reference).mean() / reference.mean()
            # one acquisition for both scans would leave ~0.04 (resampling); two acquisitions give 0.08-0.35
            assert change > max(0.06, 2 * anatomy_change), f"patient {p} {modality}: scans differ by {change:.3f}"
    other = make_case(0, 2, SPACING)
    assert _dice(first.classes > 0, other.classes > 0) < 0.6  # another patient has another tumour
