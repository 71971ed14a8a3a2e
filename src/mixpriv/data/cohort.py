"""The embedded synthetic brain cohort: tissue segmentation, deterministic by seed, no download.

Everything is derived from the MNI ICBM152 2009a template that ships inside nilearn's wheel
(T1, grey-matter and white-matter probability maps, brain mask; 1 mm, 197x233x189).

Labels: 0 background, 1 CSF, 2 GM, 3 WM. CSF probability = brain mask - GM - WM (clipped at 0),
background probability = 1 - brain mask, and the label is the argmax over
(background, CSF, GM, WM), so ventricles and sulci come out as CSF.

* A **patient** is a smooth random non-linear deformation of the template (small random affine:
  rotation +-4 deg, scaling +-5 %, translation +-2 mm; plus Gaussian-smoothed noise on an 8 mm
  control grid, 2 mm RMS, 16 mm smoothing). The anatomy is the patient's identity.
* A **scan** is one acquisition of a patient: a small rigid motion (+-1.5 deg, +-1.5 mm) applied to
  image and label alike, then, on the image only, contrast gamma in [0.8, 1.25], a smooth
  multiplicative bias field, a slight Gaussian blur, Rician noise and a global scale.

Image and probability maps are sampled once per scan, with linear interpolation, through the
composed mapping (scan grid -> motion -> patient deformation -> template), from template maps
pre-smoothed to the output spacing; labels are the argmax of the sampled maps, so they stay
consistent with the image. Images are skull-stripped T1 (template x brain mask dilated by 2 mm),
float32, zero outside; labels uint8. The field of view is 176x208x176 mm around the brain
(88x104x88 voxels at 2 mm, 176x208x176 at 1 mm), RAS, with MNI world coordinates.

Randomness comes from ``numpy.random.default_rng`` seeded by (seed, patient) and
(seed, patient, scan), so a case does not depend on how many others are built.
The folder follows the nnU-Net v2 layout (``imagesTr``, ``labelsTr``, ``imagesTs``, ``labelsTs``,
``dataset.json``, ``splits_final.json``); patients are split into train/val/test.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from tqdm.auto import tqdm

from mixpriv.constants import SPLITS, TEST, TRAIN, VAL
from mixpriv.data.cohort_cache import build_once, cohort_dir

GENERATOR_VERSION = 1
LABELS = {"background": 0, "CSF": 1, "GM": 2, "WM": 3}
FOV_MM = np.array([176.0, 208.0, 176.0])
_GRID_MM, _GRID_MARGIN_MM, _DISPLACEMENT_RMS_MM, _DISPLACEMENT_SMOOTH_MM = 8.0, 24.0, 2.0, 16.0
_DESCRIPTION = ("Synthetic brain tissue segmentation cohort: each patient is a smooth random deformation of "
                "the MNI ICBM152 2009a template (affine + displacement field), each scan adds rigid motion, "
                "bias field, contrast gamma, blur and Rician noise; labels are the argmax over (background = "
                "1 - brain mask, CSF = mask - GM - WM, GM, WM) of the warped probability maps.")
_LICENCE = ("Synthetic data derived from the MNI ICBM152 2009a template, Copyright (C) 1993-2009 "
            "Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological Institute, McGill "
            "University; free to use, copy and distribute with this notice (see nilearn's docs).")


@dataclass(frozen=True)
class Template:
    maps: np.ndarray  # (5, X, Y, Z) float32: T1 (skull-stripped), support, brain mask, GM, WM
    world_to_voxel: np.ndarray  # 4x4
    centre: np.ndarray  # centre of the brain's bounding box, mm


@dataclass(frozen=True)
class Patient:
    matrix: np.ndarray  # patient world -> template world: x = matrix @ y + offset + d(y)
    offset: np.ndarray
    displacement: np.ndarray  # (3, gx, gy, gz) displacement d in mm, every _GRID_MM / 2 mm
    grid_origin: np.ndarray


@lru_cache(maxsize=1)
def load_template(spacing: float) -> Template:
    """Template maps, smoothed so that sampling them every ``spacing`` mm does not alias."""
    from nilearn import datasets  # slow import, only needed here

    mask_img = datasets.load_mni152_brain_mask(resolution=1)
    mask = mask_img.get_fdata(dtype=np.float32)
    t1, gm, wm = (load(resolution=1).get_fdata(dtype=np.float32) for load in (
        datasets.load_mni152_template, datasets.load_mni152_gm_template, datasets.load_mni152_wm_template))
    support = ndimage.binary_dilation(mask > 0.5, iterations=2).astype(np.float32)
    t1 = t1 / np.percentile(t1[mask > 0.5], 99.5) * support
    sigma = 0.42 * np.sqrt(max(spacing**2 - 1.0, 0.0))  # FWHM ~ voxel size
    maps = np.stack([ndimage.gaussian_filter(m, sigma) if sigma > 0 else m for m in (t1, support, mask, gm, wm)])
    voxels = np.argwhere(mask > 0.5)
    bounds = nib.affines.apply_affine(mask_img.affine, np.stack([voxels.min(0), voxels.max(0)]))
    return Template(maps, np.linalg.inv(mask_img.affine), bounds.mean(0))


def output_grid(spacing: float, centre: np.ndarray) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape and RAS affine of the output field of view, with world 0 on a voxel centre."""
    shape = tuple(int(n) for n in np.ceil(FOV_MM / spacing - 1e-6))
    origin = spacing * np.round((centre - spacing * (np.array(shape) - 1) / 2) / spacing)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = origin
    return shape, affine


def rotation(degrees: np.ndarray) -> np.ndarray:
    """Rotation matrix from angles (degrees) about x, y and z."""
    a, b, c = np.deg2rad(degrees)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rx @ ry @ rz


def draw_patient(rng: np.random.Generator, centre: np.ndarray) -> Patient:
    """A random affine about the brain centre plus a smooth random displacement field."""
    matrix = rotation(rng.uniform(-4, 4, 3)) @ np.diag(rng.uniform(0.95, 1.05, 3))
    offset = centre + rng.uniform(-2, 2, 3) - matrix @ centre
    extent = FOV_MM + 2 * _GRID_MARGIN_MM
    grid_shape = np.ceil(extent / _GRID_MM).astype(int) + 1
    noise = rng.standard_normal((3, *grid_shape))
    field = np.stack([ndimage.gaussian_filter(n, _DISPLACEMENT_SMOOTH_MM / _GRID_MM, mode="wrap") for n in noise])
    field *= _DISPLACEMENT_RMS_MM / field.std(axis=(1, 2, 3), keepdims=True)
    # Cubic upsampling to half the control spacing, so that scans can sample it linearly (fast).
    fine = np.stack([ndimage.zoom(f, (2 * grid_shape - 1) / grid_shape, order=3, mode="nearest") for f in field])
    return Patient(matrix, offset, fine.astype(np.float32), centre - extent / 2)


def sample_points(template: Template, patient: Patient, motion: tuple[np.ndarray, np.ndarray],
                   world: np.ndarray) -> np.ndarray:
    """Template voxel coordinates (3, N) of scanner world points (3, N) through motion and patient."""
    rotation, shift = motion
    y = rotation @ (world - template.centre[:, None]) + (template.centre + shift)[:, None]
    grid = (y - patient.grid_origin[:, None]) / (_GRID_MM / 2)
    d = np.stack([ndimage.map_coordinates(c, grid, order=1, mode="nearest") for c in patient.displacement])
    x = patient.matrix @ y + patient.offset[:, None] + d
    return template.world_to_voxel[:3, :3] @ x + template.world_to_voxel[:3, 3:]


def _bias_field(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Smooth multiplicative field: exp of a random polynomial of degree 3 over the field of view."""
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n, dtype=np.float32) for n in shape), indexing="ij", sparse=True)
    log_field = np.zeros(shape, np.float32)
    for i, j, k in ((i, j, k) for i in range(4) for j in range(4) for k in range(4) if 0 < i + j + k <= 3):
        log_field += np.float32(0.05 * rng.standard_normal()) * (x**i * y**j * z**k)
    return np.exp(log_field)


def acquire(rng: np.random.Generator, t1: np.ndarray, support: np.ndarray, spacing: float) -> np.ndarray:
    """Contrast, bias, blur, Rician noise and scale of one acquisition; zero outside the support."""
    gamma = np.exp(rng.uniform(np.log(0.8), np.log(1.25)))
    scale = np.exp(rng.uniform(np.log(0.75), np.log(1.33)))
    blur_mm, noise_sd = rng.uniform(0.3, 0.8), rng.uniform(0.01, 0.03)
    image = np.clip(t1, 0, None) ** gamma * _bias_field(rng, t1.shape)
    image = ndimage.gaussian_filter(image, blur_mm / spacing)
    noise = noise_sd * rng.standard_normal((2, *t1.shape))
    image = np.sqrt((image + noise[0]) ** 2 + noise[1] ** 2)
    return (scale * image * (support > 0.5)).astype(np.float32)


def _make_scan(template: Template, patient: Patient, rng: np.random.Generator, spacing: float,
               shape: tuple[int, ...], affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Image (float32) and label (uint8) of one scan of ``patient`` on the output grid."""
    motion = (rotation(rng.uniform(-1.5, 1.5, 3)), rng.uniform(-1.5, 1.5, 3))
    world = (affine[:3, :3] @ np.indices(shape, np.float32).reshape(3, -1)) + affine[:3, 3:]
    points = sample_points(template, patient, motion, world)
    t1, support, mask, gm, wm = (
        ndimage.map_coordinates(m, points, order=1, mode="constant", cval=0.0).reshape(shape)
        for m in template.maps)
    csf = np.clip(mask - gm - wm, 0, None)
    label = np.argmax(np.stack([1 - mask, csf, gm, wm]), axis=0).astype(np.uint8)
    return acquire(rng, t1, support, spacing), label


def split_patients(n_patients: int, fractions: tuple[float, float, float], seed: int) -> list[str]:
    """Split name of each patient, from a seeded permutation (train, then val, then test).

    Example:
        >>> split_patients(5, (0.6, 0.2, 0.2), seed=0).count("train")
        3
    """
    n_val, n_test = (round(f * n_patients) for f in fractions[1:])
    n_train = n_patients - n_val - n_test
    if n_train < 1:
        raise ValueError(f"split_fractions {fractions} leave no training patient out of {n_patients}")
    order = np.random.default_rng([seed, 2]).permutation(n_patients)
    names = [TRAIN] * n_train + [VAL] * n_val + [TEST] * n_test
    return [names[rank] for rank in np.argsort(order)]


def save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write ``array`` with ``affine`` as MNI-aligned qform and sform."""
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code="mni")
    img.set_sform(affine, code="mni")
    img.set_data_dtype(array.dtype)
    nib.save(img, path)


def _dataset_json(params: dict, cases: dict[str, dict]) -> dict:
    """The nnU-Net v2 ``dataset.json`` with a ``mixpriv`` block describing how it was made."""
    tag = f"{params['spacing_mm']:g}".replace(".", "p")
    return {
        "name": f"MixprivTissue{tag}mm",
        "description": _DESCRIPTION,
        "reference": "MNI ICBM152 2009a (nilearn)",
        "licence": _LICENCE,
        "channel_names": {"0": "T1"},
        "labels": dict(LABELS),
        "numTraining": sum(case["split"] != TEST for case in cases.values()),
        "file_ending": ".nii.gz",
        "mixpriv": {"generator": __name__, "generator_version": GENERATOR_VERSION, **params, "cases": cases},
    }


_WORKER_STATE: dict = {}  # the template and grid, inherited by forked workers (read-only)


def _write_patient(task: tuple[Path, dict, int, str]) -> dict[str, dict]:
    """Build and save every scan of patient ``p``; returns their ``dataset.json`` entries."""
    folder, params, p, split = task
    template, shape, affine = _WORKER_STATE["template"], _WORKER_STATE["shape"], _WORKER_STATE["affine"]
    seed, spacing = params["seed"], params["spacing_mm"]
    patient = draw_patient(np.random.default_rng([seed, 0, p]), template.centre)
    cases = {}
    for s in range(params["scans_per_patient"]):
        case = f"P{p:03d}_S{s}"
        image, label = _make_scan(template, patient, np.random.default_rng([seed, 1, p, s]), spacing, shape, affine)
        suffix = "Ts" if split == TEST else "Tr"
        save_nifti(image, affine, folder / f"images{suffix}" / f"{case}_0000.nii.gz")
        save_nifti(label, affine, folder / f"labels{suffix}" / f"{case}.nii.gz")
        cases[case] = {"patient": f"P{p:03d}", "scan": s, "split": split}
    return cases


def _write_cohort(folder: Path, params: dict, progress: bool, workers: int) -> None:
    """Build every scan and ``preview.png`` into ``folder``; ``dataset.json`` is written last.

    Patients are built in ``workers`` forked processes (each patient's randomness is its own,
    so the result does not depend on the number of workers).
    """
    from mixpriv.plotting import plot_label_overlay  # matplotlib: import late

    spacing, seed = params["spacing_mm"], params["seed"]
    template = load_template(spacing)
    shape, affine = output_grid(spacing, template.centre)
    _WORKER_STATE.update(template=template, shape=shape, affine=affine)
    splits = split_patients(params["n_patients"], tuple(params["split_fractions"]), seed)
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (folder / sub).mkdir()
    tasks = [(folder, params, p, split) for p, split in enumerate(splits)]
    cases: dict[str, dict] = {}
    try:
        with tqdm(total=len(tasks) * params["scans_per_patient"], desc="cohort scans", unit="scan",
                  disable=not progress) as bar:
            if workers > 1:
                context = multiprocessing.get_context("fork")
                with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
                    for patient_cases in pool.map(_write_patient, tasks):
                        cases.update(patient_cases)
                        bar.update(len(patient_cases))
            else:
                for task in tasks:
                    patient_cases = _write_patient(task)
                    cases.update(patient_cases)
                    bar.update(len(patient_cases))
    finally:
        _WORKER_STATE.clear()
    cases = dict(sorted(cases.items()))
    first_train = next(case for case, info in cases.items() if info["split"] == TRAIN)
    preview = (first_train, np.asarray(nib.load(str(folder / "imagesTr" / f"{first_train}_0000.nii.gz")).dataobj),
               np.asarray(nib.load(str(folder / "labelsTr" / f"{first_train}.nii.gz")).dataobj))
    case, image, label = preview
    plot_label_overlay(image, label, LABELS, folder / "preview.png", n_slices=3, title=f"{case} (train)")
    by_split = {name: sorted(c for c, info in cases.items() if info["split"] == name) for name in SPLITS}
    (folder / "splits_final.json").write_text(json.dumps([{"train": by_split[TRAIN], "val": by_split[VAL]}], indent=1))
    (folder / "dataset.json").write_text(json.dumps(_dataset_json(params, cases), indent=1))


def _parameters(n_patients: int, scans_per_patient: int, spacing: float, seed: int,
                split_fractions: tuple[float, float, float]) -> dict:
    """Validated build parameters, as stored in ``dataset.json["mixpriv"]``."""
    fractions = [float(f) for f in split_fractions]
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"split_fractions must be 3 non-negative numbers summing to 1, got {split_fractions}")
    if n_patients < 1 or scans_per_patient < 1:
        raise ValueError(f"need n_patients >= 1 and scans_per_patient >= 1, got {n_patients}, {scans_per_patient}")
    if spacing < 1.0:
        raise ValueError(f"spacing must be >= 1 mm (the template's resolution), got {spacing}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    split_patients(n_patients, tuple(fractions), seed)  # raises if no patient is left to train on
    return {"seed": int(seed), "spacing_mm": float(spacing), "n_patients": int(n_patients),
            "scans_per_patient": int(scans_per_patient), "split_fractions": fractions}


def _stored_parameters(folder: Path) -> dict | None:
    """Build parameters of a complete cohort in ``folder`` (None if there is none)."""
    try:
        stored = json.loads((folder / "dataset.json").read_text())["mixpriv"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {key: stored.get(key) for key in ("generator_version", "seed", "spacing_mm", "n_patients",
                                             "scans_per_patient", "split_fractions")}


def default_cohort_dir(spacing: float = 2.0, seed: int = 0, n_patients: int = 60, scans_per_patient: int = 2) -> Path:
    """Where ``build_cohort(None, ...)`` puts a cohort: under ``$MIXPRIV_HOME`` or ``~/.cache/mixpriv``.

    Example:
        >>> default_cohort_dir().name
        'tissue-2mm-p60x2-seed0'
    """
    return cohort_dir("tissue", spacing, seed, n_patients, scans_per_patient)


def build_cohort(out_dir: str | Path | None = None, *, n_patients: int = 60, scans_per_patient: int = 2,
                 spacing: float = 2.0, seed: int = 0, split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
                 progress: bool = True, overwrite: bool = False, workers: int | None = None) -> Path:
    """Build the synthetic brain tissue cohort once (nnU-Net v2 layout) and return its folder.

    A folder already holding a complete cohort with the same parameters is returned as is. The
    cohort is written into a temporary sibling folder and renamed when complete.

    Args:
        out_dir: target folder; None uses :func:`default_cohort_dir`.
        n_patients: number of patients (random deformations of the template).
        scans_per_patient: acquisitions per patient.
        spacing: isotropic voxel size in mm (>= 1); the field of view is 176x208x176 mm.
        seed: non-negative seed; the same seed gives identical arrays.
        split_fractions: train/val/test fractions of patients.
        progress: show a tqdm bar over scans.
        overwrite: replace a folder holding something else (another cohort, other files).
        workers: processes building patients in parallel (default: the CPU count, at most 4);
            the cohort is identical whatever their number.

    Returns:
        The cohort folder.

    Raises:
        ValueError: on invalid parameters, or if ``out_dir`` holds something else and not ``overwrite``.

    Example:
        >>> import tempfile
        >>> folder = build_cohort(tempfile.mkdtemp(), n_patients=3, scans_per_patient=1, spacing=4.0,
        ...                       split_fractions=(0.34, 0.33, 0.33), progress=False)
        >>> len(list((folder / "imagesTr").glob("P*_S0_0000.nii.gz")))  # 2 train + val patients
        2
    """
    params = _parameters(n_patients, scans_per_patient, spacing, seed, split_fractions)
    out = Path(out_dir) if out_dir is not None else default_cohort_dir(spacing, seed, n_patients, scans_per_patient)
    wanted = {"generator_version": GENERATOR_VERSION, **params}
    return build_once(out, wanted, _stored_parameters(out), overwrite, "cohort",
                      lambda tmp: _write_cohort(tmp, params, progress, workers or min(4, os.cpu_count() or 1)))
