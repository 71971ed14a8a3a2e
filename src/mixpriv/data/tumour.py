"""The embedded synthetic tumour cohort: BraTS 2021 layout, deterministic by seed, no download.

Each case is a new patient (a random deformation of the MNI template, as in the tissue cohort,
:mod:`mixpriv.data.cohort`) scanned once (rigid motion), with one tumour (:mod:`mixpriv.data.tumour_growth`):
random position in white matter away from the brain's edge, random size (mean semi-axis 8-18 mm), an
irregular outline, a necrotic core in 3 cases out of 4 (else solid enhancement), an enhancing rim, an
oedema reaching further into white matter, and mass effect (the anatomy around it pushed outwards,
before the tumour is painted in). Images: T1ce-like (dark core, bright rim, mildly dark oedema,
healthy tissue as the tissue cohort's T1) and FLAIR-like (bright oedema, dark CSF; healthy contrast
from the tissue probabilities, not from a FLAIR template), each with its own acquisition (gamma,
bias field, blur, Rician noise, scale: the tissue cohort's :func:`~mixpriv.data.cohort.acquire`).

What it is not: real glioma MRI. There is no skull, no contrast in vessels or choroid plexus, no
infiltration along tracts, no haemorrhage or cysts, one tumour per case, the same template brain
under every deformation; T2 and T1 are not written, so read it with ``modalities=("t1ce",)`` (the
default of :class:`~mixpriv.data.brats.BratsFolder`) or ``("t1ce", "flair")``.

Layout (what the challenge ships, plus two top-level files that the BraTS reader ignores)::

    tumour-2mm-c48-seed0/
        BraTS2021_00000/BraTS2021_00000_{t1ce,flair,seg}.nii.gz   (seg: 0, 1 NCR, 2 ED, 4 ET; uint8)
        ...
        cohort.json     (build parameters and each case's tumour)
        preview.png     (axial slices through the first tumours, image and label overlay)

Randomness comes from ``numpy.random.default_rng`` seeded by (seed, stream, case), so a case does not
depend on how many others are built, nor on the number of worker processes.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from mixpriv.constants import ENV_HOME
from mixpriv.data.brats import CLASS_LABELS, classes_to_brats
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
    swap_in,
)
from mixpriv.data.tumour_growth import (
    Tumour,
    draw_tumour,
    mass_effect,
    tumour_classes,
    tumour_contrast,
)

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1
#: Modalities written for each case, in the order of their acquisition streams.
TUMOUR_MODALITIES = ("t1ce", "flair")
PARAMETERS_FILE = "cohort.json"
_STREAM_PATIENT, _STREAM_SCAN, _STREAM_TUMOUR, _STREAM_ACQUISITION = 10, 11, 12, 13


@dataclass(frozen=True)
class TumourCase:
    """One synthetic case on the output grid.

    Attributes:
        images: modality -> float32 image (``t1ce``, ``flair``), after acquisition.
        classes: uint8 classes 0 background, 1 NCR, 2 ED, 3 ET (BraTS values: :func:`classes_to_brats`).
        tissue: uint8 healthy tissue under it, after mass effect (0 background, 1 CSF, 2 GM, 3 WM).
        anatomy: float32 noise-free T1 of that healthy anatomy (no tumour, no acquisition).
        tumour: the tumour's parameters.
    """

    images: dict[str, np.ndarray]
    classes: np.ndarray
    tissue: np.ndarray
    anatomy: np.ndarray
    tumour: Tumour


@lru_cache(maxsize=1)
def _brain_depth(spacing: float) -> np.ndarray:
    """Distance (mm) to the outside of the template's brain mask, on the template's 1 mm grid."""
    return ndimage.distance_transform_edt(load_template(spacing).maps[2] > 0.5).astype(np.float32)


def make_case(seed: int, index: int, spacing: float = 2.0, *, push: bool = True,
              radius_mm: tuple[float, float] = (8.0, 18.0)) -> TumourCase:
    """Build case ``index`` of the cohort of ``seed`` at ``spacing`` mm (identical for the same arguments).

    Args:
        seed: the cohort's seed.
        index: the case's number (its patient, scan and tumour come from their own streams).
        spacing: isotropic voxel size in mm (the field of view is the tissue cohort's).
        push: apply the mass effect (``False``: the same case with the anatomy left in place).
        radius_mm: range of the tumour's mean semi-axis.

    Example:
        >>> case = make_case(0, 0, spacing=4.0)  # doctest: +SKIP
        >>> case.images["t1ce"].shape, sorted(np.unique(case.classes).tolist())  # doctest: +SKIP
        ((44, 52, 44), [0, 1, 2, 3])
    """
    template = load_template(spacing)
    shape, affine = output_grid(spacing, template.centre)
    patient = draw_patient(np.random.default_rng([seed, _STREAM_PATIENT, index]), template.centre)
    scan_rng = np.random.default_rng([seed, _STREAM_SCAN, index])
    motion = (rotation(scan_rng.uniform(-1.5, 1.5, 3)), scan_rng.uniform(-1.5, 1.5, 3))
    tumour = draw_tumour(np.random.default_rng([seed, _STREAM_TUMOUR, index]),
                         lambda points: _locate(template, patient, motion, spacing, points),
                         template.centre, radius_mm=radius_mm)
    if not push:
        tumour = replace(tumour, push_mm=0.0)
    world = (affine[:3, :3] @ np.indices(shape, np.float32).reshape(3, -1)) + affine[:3, 3:]
    points = sample_points(template, patient, motion, mass_effect(world, tumour))
    t1, support, mask, gm, wm = (
        ndimage.map_coordinates(m, points, order=1, mode="constant", cval=0.0).reshape(shape) for m in template.maps)
    csf = np.clip(mask - gm - wm, 0, None)
    tissue = np.argmax(np.stack([1 - mask, csf, gm, wm]), axis=0).astype(np.uint8)
    classes = tumour_classes(tumour, world, shape, mask, wm, csf)
    clean = tumour_contrast(np.random.default_rng([seed, _STREAM_TUMOUR, index, 1]), tumour, world, classes,
                            t1, gm, wm, csf, spacing)
    images = {m: acquire(np.random.default_rng([seed, _STREAM_ACQUISITION, index, i]), clean[m], support, spacing)
              for i, m in enumerate(TUMOUR_MODALITIES)}
    return TumourCase(images, classes, tissue, t1.astype(np.float32), tumour)


def _locate(template: Template, patient: Patient, motion: tuple[np.ndarray, np.ndarray], spacing: float,
            points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Brain depth (mm) and white-matter probability at scanner world points (3, N) of one scan."""
    voxels = sample_points(template, patient, motion, points)
    depth = ndimage.map_coordinates(_brain_depth(spacing), voxels, order=1, mode="constant", cval=0.0)
    return depth, ndimage.map_coordinates(template.maps[4], voxels, order=1, mode="constant", cval=0.0)


def case_id(index: int) -> str:
    """The BraTS 2021 name of case ``index``.

    Example:
        >>> case_id(7)
        'BraTS2021_00007'
    """
    return f"BraTS2021_{index:05d}"


def _write_case(task: tuple[Path, dict, int]) -> dict:
    """Build and save case ``index``; returns its ``cohort.json`` entry."""
    folder, params, index = task
    case = make_case(params["seed"], index, params["spacing_mm"], radius_mm=tuple(params["radius_mm"]))
    _, affine = output_grid(params["spacing_mm"], load_template(params["spacing_mm"]).centre)
    name = case_id(index)
    (folder / name).mkdir()
    for modality, image in case.images.items():
        save_nifti(image, affine, folder / name / f"{name}_{modality}.nii.gz")
    save_nifti(classes_to_brats(case.classes), affine, folder / name / f"{name}_seg.nii.gz")
    voxel_ml = params["spacing_mm"] ** 3 / 1000
    volumes = {label: round(float(np.sum(case.classes == value) * voxel_ml), 2)
               for label, value in CLASS_LABELS.items() if value}
    return {"tumour": case.tumour.describe(), "volume_ml": volumes}


def _write_preview(folder: Path, cases: list[str], path: Path) -> Path:
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
    for column, name in enumerate(cases):
        image = np.asarray(nib.load(str(folder / name / f"{name}_t1ce.nii.gz")).dataobj)
        classes = np.asarray(nib.load(str(folder / name / f"{name}_seg.nii.gz")).dataobj)
        classes = np.where(classes == 4, 3, classes)
        z = int(np.argmax(np.sum(classes > 0, axis=(0, 1))))
        show_image(axes[0, column], take_slice(image, 2, z))
        axes[0, column].set_title(f"{name}\nT1ce, axial {z}", fontsize=8)
        show_labels(axes[1, column], take_slice(image, 2, z), take_slice(classes, 2, z), len(CLASS_LABELS))
    label_legend(figure, {k: v for k, v in CLASS_LABELS.items() if v}, len(CLASS_LABELS))
    return save_figure(figure, path, dpi=100)


def _parameters(n_cases: int, spacing: float, seed: int, radius_mm: tuple[float, float]) -> dict:
    """Validated build parameters, as stored in ``cohort.json``."""
    if n_cases < 1:
        raise ValueError(f"need n_cases >= 1, got {n_cases}")
    if spacing < 1.0:
        raise ValueError(f"spacing must be >= 1 mm (the template's resolution), got {spacing}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    low, high = (float(r) for r in radius_mm)
    if not 3.0 <= low <= high <= 30.0:
        raise ValueError(f"radius_mm must be a range within [3, 30] mm, got {radius_mm}")
    return {"generator_version": GENERATOR_VERSION, "seed": int(seed), "spacing_mm": float(spacing),
            "n_cases": int(n_cases), "radius_mm": [low, high], "modalities": list(TUMOUR_MODALITIES)}


def _stored_parameters(folder: Path) -> dict | None:
    """Build parameters of a complete tumour cohort in ``folder`` (None if there is none)."""
    try:
        stored = json.loads((folder / PARAMETERS_FILE).read_text())
        return {key: stored[key] for key in ("generator_version", "seed", "spacing_mm", "n_cases", "radius_mm",
                                             "modalities")}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def default_tumour_cohort_dir(spacing: float = 2.0, seed: int = 0, n_cases: int = 48) -> Path:
    """Where ``build_tumour_cohort(None, ...)`` puts a cohort: under ``$MIXPRIV_HOME`` or ``~/.cache/mixpriv``.

    Example:
        >>> default_tumour_cohort_dir().name
        'tumour-2mm-c48-seed0'
    """
    home = Path(os.environ.get(ENV_HOME) or "~/.cache/mixpriv").expanduser()
    tag = f"{float(spacing):g}".replace(".", "p")
    return home / "cohorts" / f"tumour-{tag}mm-c{n_cases}-seed{seed}"


def build_tumour_cohort(out_dir: str | Path | None = None, *, n_cases: int = 48, spacing: float = 2.0, seed: int = 0,
                        radius_mm: tuple[float, float] = (8.0, 18.0), n_preview: int = 4, overwrite: bool = False,
                        workers: int | None = None) -> Path:
    """Build the synthetic tumour cohort once, in the BraTS 2021 layout, and return its folder.

    A folder already holding a complete cohort with the same parameters is returned as is; the cohort
    is written into a temporary sibling folder and renamed when complete. Read it with
    :class:`~mixpriv.data.brats.BratsFolder` (``modalities=("t1ce",)``, the default, or
    ``("t1ce", "flair")``) and convert it with :func:`~mixpriv.data.brats.brats_to_nnunet`.

    Args:
        out_dir: target folder; None uses :func:`default_tumour_cohort_dir`.
        n_cases: number of cases (one patient, one scan, one tumour each).
        spacing: isotropic voxel size in mm (>= 1); the field of view is 176x208x176 mm.
        seed: non-negative seed; the same seed gives identical arrays.
        radius_mm: range of the tumours' mean semi-axis.
        n_preview: cases shown in ``preview.png``.
        overwrite: replace a folder holding something else.
        workers: processes building cases in parallel (default: the CPU count, at most 4);
            the cohort is identical whatever their number.

    Returns:
        The cohort folder.

    Raises:
        ValueError: on invalid parameters, or if ``out_dir`` holds something else and not ``overwrite``.

    Example:
        >>> import tempfile
        >>> folder = build_tumour_cohort(tempfile.mkdtemp(), n_cases=2, spacing=4.0, workers=1)
        >>> sorted(p.name for p in (folder / "BraTS2021_00001").iterdir())
        ['BraTS2021_00001_flair.nii.gz', 'BraTS2021_00001_seg.nii.gz', 'BraTS2021_00001_t1ce.nii.gz']
    """
    params = _parameters(n_cases, spacing, seed, radius_mm)
    out = Path(out_dir) if out_dir is not None else default_tumour_cohort_dir(spacing, seed, n_cases)
    stored = _stored_parameters(out)
    if stored == params:
        logger.info("Reusing the tumour cohort in %s", out)
        return out
    if out.exists() and any(out.iterdir()) and not overwrite:
        what = f"a tumour cohort built with {stored}" if stored else "files that are not a complete tumour cohort"
        raise ValueError(f"{out} already holds {what}, not {params}; pass overwrite=True or another out_dir")
    out.parent.mkdir(parents=True, exist_ok=True)
    start, tmp = time.perf_counter(), Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)
        _brain_depth(spacing)  # computed once, before forking
        tasks = [(tmp, params, index) for index in range(n_cases)]
        workers = min(workers or min(4, os.cpu_count() or 1), n_cases)
        if workers > 1:
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
                entries = list(pool.map(_write_case, tasks))
        else:
            entries = [_write_case(task) for task in tasks]
        names = [case_id(index) for index in range(n_cases)]
        _write_preview(tmp, names[:max(1, n_preview)], tmp / "preview.png")
        (tmp / PARAMETERS_FILE).write_text(json.dumps({**params, "generator": __name__,
                                                       "cases": dict(zip(names, entries))}, indent=1))
        swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("Built the tumour cohort in %s in %.1f s", out, time.perf_counter() - start)
    return out
