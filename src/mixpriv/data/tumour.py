"""The embedded synthetic tumour cohort: BraTS 2021 layout, deterministic by seed, no download.

A **patient** is a random deformation of the MNI template (as in the tissue cohort,
:mod:`mixpriv.data.cohort`) with one tumour (:mod:`mixpriv.data.tumour_growth`): random position in
white matter away from the brain's edge, random size (mean semi-axis 8-18 mm), an irregular outline,
a necrotic core in 3 patients out of 4 (else solid enhancement), an enhancing rim, an oedema reaching
further into white matter, and mass effect (the anatomy around it pushed outwards, before the tumour
is painted in). The tumour, its appearance and its mass effect live in the patient's frame (the
scanner frame of a motion-free scan), so they belong to the patient.

A **scan** (two per patient by default, as in the tissue cohort, for the privacy audit's
re-identification and test-retest) is one acquisition of that patient, as the tissue cohort's scans:
a small rigid motion (+-1.5 deg, +-1.5 mm) of the whole head, tumour included, then, per modality,
contrast gamma, bias field, blur, Rician noise and scale (:func:`~mixpriv.data.cohort.acquire`).
The scans of a patient thus have the same label map up to the rigid motion (and its resampling),
and different intensities. Images: T1ce-like (dark core, bright rim, mildly dark oedema, healthy
tissue as the tissue cohort's T1) and FLAIR-like (bright oedema, dark CSF; healthy contrast from
the tissue probabilities, not from a FLAIR template).

What it is not: real glioma MRI. There is no skull, no contrast in vessels or choroid plexus, no
infiltration along tracts, no haemorrhage or cysts, one tumour per patient, no growth between a
patient's scans, the same template brain under every deformation; T2 and T1 are not written, so
read it with ``modalities=("t1ce",)`` (the default of :class:`~mixpriv.data.brats.BratsFolder`) or
``("t1ce", "flair")``.

Layout (what the challenge ships, one case folder per scan, plus top-level files)::

    tumour-2mm-p24x2-seed0/
        BraTS2021_00000/BraTS2021_00000_{t1ce,flair,seg}.nii.gz   (patient P000, scan 0; seg: 0, 1 NCR, 2 ED, 4 ET)
        BraTS2021_00001/...                                        (patient P000, scan 1)
        ...
        patients.csv    (case_id,patient_id: read by the BraTS reader, which splits by patient)
        cohort.json     (build parameters, each case's patient, scan and tumour; ignored by the reader)
        preview.png     (axial slices through the first scans' tumours, image and label overlay)

Case ``p * scans_per_patient + s`` is scan ``s`` of patient ``p``. Randomness comes from
``numpy.random.default_rng`` seeded by (seed, stream, patient) for the anatomy and the tumour and by
(seed, stream, patient, scan) for the acquisition, so a scan does not depend on how many patients are
built, nor on the number of worker processes.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from mixpriv.data.brats import CLASS_LABELS, classes_to_brats
from mixpriv.data.brats_patients import PATIENTS_FILE, write_patients
from mixpriv.data.cohort import (
    Patient,
    Template,
    acquire,
    draw_patient,
    load_template,
    output_grid,
    rotation,
    sample_points,
    save_nifti,
)
from mixpriv.data.cohort_cache import build_once, cohort_dir
from mixpriv.data.tumour_growth import (
    Tumour,
    draw_tumour,
    mass_effect,
    tumour_classes,
    tumour_contrast,
)

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 2  # 2: several scans per patient, the tumour in the patient's frame
#: Modalities written for each case, in the order of their acquisition streams.
TUMOUR_MODALITIES = ("t1ce", "flair")
PARAMETERS_FILE = "cohort.json"
_STREAM_PATIENT, _STREAM_SCAN, _STREAM_TUMOUR, _STREAM_ACQUISITION = 10, 11, 12, 13
_NO_MOTION = (np.eye(3), np.zeros(3))


@dataclass(frozen=True)
class TumourCase:
    """One synthetic case on the output grid.

    Attributes:
        images: modality -> float32 image (``t1ce``, ``flair``), after acquisition.
        classes: uint8 classes 0 background, 1 NCR, 2 ED, 3 ET (BraTS values: :func:`classes_to_brats`).
        tissue: uint8 healthy tissue under it, after mass effect (0 background, 1 CSF, 2 GM, 3 WM).
        anatomy: float32 noise-free T1 of that healthy anatomy (no tumour, no acquisition).
        tumour: the tumour's parameters, in the patient's frame (shared by all scans of the patient).
        to_scan: 4x4 affine from the patient's frame (mm) to this scan's scanner world (mm): the
            inverse of the scan's rigid motion (``to_scan @ [*tumour.centre, 1]`` is the tumour's
            centre in the scan's world coordinates).
    """

    images: dict[str, np.ndarray]
    classes: np.ndarray
    tissue: np.ndarray
    anatomy: np.ndarray
    tumour: Tumour
    to_scan: np.ndarray


@lru_cache(maxsize=1)
def _brain_depth(spacing: float) -> np.ndarray:
    """Distance (mm) to the outside of the template's brain mask, on the template's 1 mm grid."""
    return ndimage.distance_transform_edt(load_template(spacing).maps[2] > 0.5).astype(np.float32)


def make_case(seed: int, patient: int, spacing: float = 2.0, *, scan: int = 0, push: bool = True,
              radius_mm: tuple[float, float] = (8.0, 18.0)) -> TumourCase:
    """Build scan ``scan`` of patient ``patient`` of the cohort of ``seed`` at ``spacing`` mm (deterministic).

    Args:
        seed: the cohort's seed.
        patient: the patient's number (anatomy and tumour come from their own streams).
        spacing: isotropic voxel size in mm (the field of view is the tissue cohort's).
        scan: the scan's number (its motion and acquisition come from their own streams).
        push: apply the mass effect (``False``: the same case with the anatomy left in place).
        radius_mm: range of the tumour's mean semi-axis.

    Example:
        >>> case = make_case(0, 0, spacing=4.0)  # doctest: +SKIP
        >>> case.images["t1ce"].shape, sorted(np.unique(case.classes).tolist())  # doctest: +SKIP
        ((44, 52, 44), [0, 1, 2, 3])
        >>> bool(make_case(0, 0, spacing=4.0, scan=1).tumour.describe() == case.tumour.describe())  # doctest: +SKIP
        True
    """
    anatomy, tumour = draw_patient_and_tumour(seed, patient, spacing, radius_mm)
    if not push:
        tumour = replace(tumour, push_mm=0.0)
    return make_scan(seed, patient, scan, anatomy, tumour, spacing)


def draw_patient_and_tumour(seed: int, patient: int, spacing: float = 2.0,
                            radius_mm: tuple[float, float] = (8.0, 18.0)) -> tuple[Patient, Tumour]:
    """The anatomy (deformation of the template) and the tumour (in the patient's frame) of patient ``patient``.

    Example:
        >>> anatomy, tumour = draw_patient_and_tumour(0, 3, spacing=4.0)  # doctest: +SKIP
        >>> 8.0 * 0.8 < float(tumour.radii.mean()) < 18.0 * 1.25  # doctest: +SKIP
        True
    """
    template = load_template(spacing)
    anatomy = draw_patient(np.random.default_rng([seed, _STREAM_PATIENT, patient]), template.centre)
    tumour = draw_tumour(np.random.default_rng([seed, _STREAM_TUMOUR, patient]),
                         lambda points: _locate(template, anatomy, spacing, points), template.centre,
                         radius_mm=radius_mm)
    return anatomy, tumour


def make_scan(seed: int, patient: int, scan: int, anatomy: Patient, tumour: Tumour, spacing: float = 2.0) -> TumourCase:
    """Scan ``scan`` of a patient drawn by :func:`draw_patient_and_tumour`: rigid motion, then acquisition.

    The scanner world points of the scan are moved into the patient's frame (the rigid motion), where
    the mass effect, the tumour's classes and its appearance are evaluated; the healthy maps are then
    sampled through the patient's deformation, and each modality gets its own acquisition.

    Example:
        >>> anatomy, tumour = draw_patient_and_tumour(0, 0, spacing=4.0)  # doctest: +SKIP
        >>> first, second = (make_scan(0, 0, s, anatomy, tumour, 4.0) for s in (0, 1))  # doctest: +SKIP
        >>> bool(np.array_equal(first.images["t1ce"], second.images["t1ce"]))  # doctest: +SKIP
        False
    """
    template = load_template(spacing)
    shape, affine = output_grid(spacing, template.centre)
    scan_rng = np.random.default_rng([seed, _STREAM_SCAN, patient, scan])
    turn, shift = rotation(scan_rng.uniform(-1.5, 1.5, 3)), scan_rng.uniform(-1.5, 1.5, 3)
    world = (affine[:3, :3] @ np.indices(shape, np.float32).reshape(3, -1)) + affine[:3, 3:]
    frame = turn @ (world - template.centre[:, None]) + (template.centre + shift)[:, None]  # the patient's frame
    points = sample_points(template, anatomy, _NO_MOTION, mass_effect(frame, tumour))
    t1, support, mask, gm, wm = (
        ndimage.map_coordinates(m, points, order=1, mode="constant", cval=0.0).reshape(shape) for m in template.maps)
    csf = np.clip(mask - gm - wm, 0, None)
    tissue = np.argmax(np.stack([1 - mask, csf, gm, wm]), axis=0).astype(np.uint8)
    classes = tumour_classes(tumour, frame, shape, mask, wm, csf)
    clean = tumour_contrast(np.random.default_rng([seed, _STREAM_TUMOUR, patient, 1]), tumour, frame, classes,
                            t1, gm, wm, csf, spacing)
    images = {m: acquire(np.random.default_rng([seed, _STREAM_ACQUISITION, patient, scan, i]), clean[m], support,
                         spacing) for i, m in enumerate(TUMOUR_MODALITIES)}
    to_scan = np.eye(4)
    to_scan[:3, :3] = turn.T
    to_scan[:3, 3] = template.centre - turn.T @ (template.centre + shift)
    return TumourCase(images, classes, tissue, t1.astype(np.float32), tumour, to_scan)


def _locate(template: Template, anatomy: Patient, spacing: float, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Brain depth (mm) and white-matter probability at points (3, N) of the patient's frame."""
    voxels = sample_points(template, anatomy, _NO_MOTION, points)
    depth = ndimage.map_coordinates(_brain_depth(spacing), voxels, order=1, mode="constant", cval=0.0)
    return depth, ndimage.map_coordinates(template.maps[4], voxels, order=1, mode="constant", cval=0.0)


def case_id(index: int) -> str:
    """The BraTS 2021 name of case ``index`` (scan ``index % scans_per_patient`` of patient ``index // scans_per_patient``).

    Example:
        >>> case_id(7)
        'BraTS2021_00007'
    """
    return f"BraTS2021_{index:05d}"


def patient_id(patient: int) -> str:
    """The id of patient ``patient``, as ``patients.csv`` and ``cohort.json`` record it.

    Example:
        >>> patient_id(3)
        'P003'
    """
    return f"P{patient:03d}"


def _write_patient(task: tuple[Path, dict, int]) -> dict[str, dict]:
    """Build and save every scan of patient ``p``; returns their ``cohort.json`` entries."""
    folder, params, p = task
    seed, spacing, n_scans = params["seed"], params["spacing_mm"], params["scans_per_patient"]
    anatomy, tumour = draw_patient_and_tumour(seed, p, spacing, tuple(params["radius_mm"]))
    _, affine = output_grid(spacing, load_template(spacing).centre)
    entries = {}
    for scan in range(n_scans):
        case = make_scan(seed, p, scan, anatomy, tumour, spacing)
        name = case_id(p * n_scans + scan)
        (folder / name).mkdir()
        for modality, image in case.images.items():
            save_nifti(image, affine, folder / name / f"{name}_{modality}.nii.gz")
        save_nifti(classes_to_brats(case.classes), affine, folder / name / f"{name}_seg.nii.gz")
        volumes = {label: round(float(np.sum(case.classes == value) * spacing**3 / 1000), 2)
                   for label, value in CLASS_LABELS.items() if value}
        entries[name] = {"patient": patient_id(p), "scan": scan, "tumour": tumour.describe(), "volume_ml": volumes}
    return entries


def _write_preview(folder: Path, cases: dict[str, dict], path: Path) -> Path:
    """Axial T1ce slice through each case's tumour (its largest tumour cross-section), plain and with labels."""
    from matplotlib.figure import Figure  # matplotlib: import late

    from mixpriv.plotting import (
        label_legend,
        save_figure,
        show_image,
        show_labels,
        take_slice,
    )

    figure = Figure(figsize=(2.6 * len(cases), 5.6), layout="constrained")
    axes = figure.subplots(2, len(cases), squeeze=False)
    for column, (name, entry) in enumerate(cases.items()):
        image = np.asarray(nib.load(str(folder / name / f"{name}_t1ce.nii.gz")).dataobj)
        classes = np.asarray(nib.load(str(folder / name / f"{name}_seg.nii.gz")).dataobj)
        classes = np.where(classes == 4, 3, classes)
        z = int(np.argmax(np.sum(classes > 0, axis=(0, 1))))
        show_image(axes[0, column], take_slice(image, 2, z))
        axes[0, column].set_title(f"{name}\n{entry['patient']} scan {entry['scan']}, T1ce, axial {z}", fontsize=8)
        show_labels(axes[1, column], take_slice(image, 2, z), take_slice(classes, 2, z), len(CLASS_LABELS))
    label_legend(figure, {k: v for k, v in CLASS_LABELS.items() if v}, len(CLASS_LABELS))
    return save_figure(figure, path, dpi=100)


_KEYS = ("generator_version", "seed", "spacing_mm", "n_patients", "scans_per_patient", "radius_mm", "modalities")


def _parameters(n_patients: int, scans_per_patient: int, spacing: float, seed: int,
                radius_mm: tuple[float, float]) -> dict:
    """Validated build parameters, as stored in ``cohort.json``."""
    if n_patients < 1 or scans_per_patient < 1:
        raise ValueError(f"need n_patients >= 1 and scans_per_patient >= 1, got {n_patients}, {scans_per_patient}")
    if n_patients * scans_per_patient > 100_000:
        raise ValueError(f"{n_patients} x {scans_per_patient} scans do not fit the BraTS names (five digits)")
    if spacing < 1.0:
        raise ValueError(f"spacing must be >= 1 mm (the template's resolution), got {spacing}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    low, high = (float(r) for r in radius_mm)
    if not 3.0 <= low <= high <= 30.0:
        raise ValueError(f"radius_mm must be a range within [3, 30] mm, got {radius_mm}")
    return {"generator_version": GENERATOR_VERSION, "seed": int(seed), "spacing_mm": float(spacing),
            "n_patients": int(n_patients), "scans_per_patient": int(scans_per_patient), "radius_mm": [low, high],
            "modalities": list(TUMOUR_MODALITIES)}


def _stored_parameters(folder: Path) -> dict | None:
    """Build parameters of a complete tumour cohort in ``folder`` (None if there is none)."""
    try:
        stored = json.loads((folder / PARAMETERS_FILE).read_text())
        return {key: stored[key] for key in _KEYS} if (folder / PATIENTS_FILE).is_file() else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def default_tumour_cohort_dir(spacing: float = 2.0, seed: int = 0, n_patients: int = 24,
                              scans_per_patient: int = 2) -> Path:
    """Where ``build_tumour_cohort(None, ...)`` puts a cohort: under ``$MIXPRIV_HOME`` or ``~/.cache/mixpriv``.

    Named as the tissue cohort's (:func:`~mixpriv.data.cohort.default_cohort_dir`): patients x scans.

    Example:
        >>> default_tumour_cohort_dir().name
        'tumour-2mm-p24x2-seed0'
    """
    return cohort_dir("tumour", spacing, seed, n_patients, scans_per_patient)


def build_tumour_cohort(out_dir: str | Path | None = None, *, n_patients: int = 24, scans_per_patient: int = 2,
                        spacing: float = 2.0, seed: int = 0, radius_mm: tuple[float, float] = (8.0, 18.0),
                        n_preview: int = 4, overwrite: bool = False, workers: int | None = None) -> Path:
    """Build the synthetic tumour cohort once, in the BraTS 2021 layout, and return its folder.

    A folder already holding a complete cohort with the same parameters is returned as is; the cohort
    is written into a temporary sibling folder and renamed when complete. Read it with
    :class:`~mixpriv.data.brats.BratsFolder` (``modalities=("t1ce",)``, the default, or
    ``("t1ce", "flair")``), which reads the patients from ``patients.csv`` and splits by patient, and
    convert it with :func:`~mixpriv.data.brats_convert.brats_to_nnunet`.

    Args:
        out_dir: target folder; None uses :func:`default_tumour_cohort_dir`.
        n_patients: number of patients (one anatomy and one tumour each).
        scans_per_patient: scans of each patient (acquisitions: rigid motion, contrast, bias, blur, noise);
            ``n_patients * scans_per_patient`` case folders in all.
        spacing: isotropic voxel size in mm (>= 1); the field of view is 176x208x176 mm.
        seed: non-negative seed; the same seed gives identical arrays.
        radius_mm: range of the tumours' mean semi-axis.
        n_preview: scans shown in ``preview.png`` (the first ones: both scans of the first patients).
        overwrite: replace a folder holding something else.
        workers: processes building patients in parallel (default: the CPU count, at most 4);
            the cohort is identical whatever their number.

    Returns:
        The cohort folder.

    Raises:
        ValueError: on invalid parameters, or if ``out_dir`` holds something else and not ``overwrite``.

    Example:
        >>> import tempfile
        >>> folder = build_tumour_cohort(tempfile.mkdtemp(), n_patients=1, spacing=4.0, workers=1)
        >>> sorted(p.name for p in (folder / "BraTS2021_00001").iterdir())
        ['BraTS2021_00001_flair.nii.gz', 'BraTS2021_00001_seg.nii.gz', 'BraTS2021_00001_t1ce.nii.gz']
        >>> (folder / "patients.csv").read_text().splitlines()
        ['case_id,patient_id', 'BraTS2021_00000,P000', 'BraTS2021_00001,P000']
    """
    params = _parameters(n_patients, scans_per_patient, spacing, seed, radius_mm)
    out = (Path(out_dir) if out_dir is not None
           else default_tumour_cohort_dir(spacing, seed, n_patients, scans_per_patient))
    workers = min(workers or min(4, os.cpu_count() or 1), n_patients)
    return build_once(out, params, _stored_parameters(out), overwrite, "tumour cohort",
                      lambda tmp: _write_tumour_cohort(tmp, params, n_patients, n_preview, workers))


def _write_tumour_cohort(tmp: Path, params: dict, n_patients: int, n_preview: int, workers: int) -> None:
    """Every patient's scans, the preview, ``patients.csv`` and the parameters file, into ``tmp``."""
    _brain_depth(params["spacing_mm"])  # computed once, before forking
    tasks = [(tmp, params, p) for p in range(n_patients)]
    if workers > 1:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            per_patient = list(pool.map(_write_patient, tasks))
    else:
        per_patient = [_write_patient(task) for task in tasks]
    cases = {name: entry for entries in per_patient for name, entry in entries.items()}
    _write_preview(tmp, dict(list(cases.items())[:max(1, n_preview)]), tmp / "preview.png")
    write_patients(tmp, {name: entry["patient"] for name, entry in cases.items()})
    (tmp / PARAMETERS_FILE).write_text(json.dumps({**params, "generator": __name__, "cases": cases}, indent=1))
