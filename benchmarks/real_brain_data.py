"""Colin27 for ``benchmarks/real_brain.py``: fetch it, pseudo-label it, and make a scanner-like copy.

Colin27 (``ch2``: one real individual, 27 averaged T1 scans, 1 mm, MNI space) comes with
Debian's ``mricron-data`` package: ``usr/share/mricron/templates/ch2bet.nii.gz`` (skull-stripped)
and ``ch2.nii.gz`` (whole head), both 181×217×181 RAS uint8 on one grid and affine, equal inside
the brain mask. :func:`fetch_colin27` runs ``apt-get download mricron-data`` and ``dpkg -x`` into a
cache folder, checks both files against the sha256 below and reuses them on later runs.

Licence: the package's ``usr/share/doc/mricron-data/copyright`` names no separate terms for the
templates; its catch-all stanza (``Files: *``) says "Copyright 2006-2010, Chris Rorden",
BSD-3-clause. It does not name the Colin27 images' original authors (Holmes et al. 1998,
Montreal Neurological Institute), so we do not read it as clearly allowing us to redistribute the
images: the benchmark writes no NIfTI of Colin27 into the repository, only figures and numbers.

Pseudo-labels (:func:`pseudo_labels`), on the native 1 mm grid: the brain mask is the largest
connected component of ``ch2bet > 0`` (the shipped background is exactly 0 and the darkest brain
voxel is 8; the other 98 components hold 806 voxels); inside it a 3-class Gaussian mixture
(scikit-learn ``GaussianMixture``, full variances, seed 0) on the intensities, classes ordered by
mean → CSF 1 < GM 2 < WM 3, background 0 outside the mask. A voxel gets its class of highest
posterior, except that voxels darker than the CSF mean are CSF and voxels brighter than the WM mean
are WM (a narrow Gaussian otherwise loses its far tail to a wider one: without this the brightest
WM voxels fall to GM).

This is not the models' label convention. Their CSF is the MNI template's brain mask − GM − WM:
ventricles and sulcal CSF inside a template mask; here CSF is the dark voxels inside BET's mask,
whose edge is BET's and whose dark voxels include partial-volume GM/CSF at the cortex surface.

Usage (as a library; ``python benchmarks/real_brain.py`` runs the benchmark):
    from real_brain_data import fetch_colin27, pseudo_labels, ScannerLike, make_scanner_like
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from sklearn.mixture import GaussianMixture

log = logging.getLogger("real_brain")

PACKAGE = "mricron-data"
TEMPLATES = "usr/share/mricron/templates"
COPYRIGHT = "usr/share/doc/mricron-data/copyright"
#: sha256 of the files of mricron-data_1.2.20211006+dfsg-4_all.deb, measured when this was written.
SHA256 = {
    "ch2bet": "592a2d20abdf36eefcb540ca8958428040edffc1bc1a18ba1dcfbabac77c5dd1",
    "ch2": "a009051127f64dc3dd554d5f5b589870ea72106d9642c21b4e7093e478cfc309",
}
LABELS = {"background": 0, "CSF": 1, "GM": 2, "WM": 3}


class FetchError(RuntimeError):
    """Colin27 could not be fetched or is not the expected file."""


def default_cache() -> Path:
    """``$MIXPRIV_HOME/real-brain``, else ``~/.cache/mixpriv/real-brain``."""
    home = os.environ.get("MIXPRIV_HOME")
    return (Path(home) if home else Path.home() / ".cache" / "mixpriv") / "real-brain"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _matches(path: Path, name: str) -> bool:
    return path.is_file() and sha256(path) == SHA256[name]


def fetch_colin27(cache: Path) -> dict[str, Path]:
    """Paths of ``ch2bet`` and ``ch2`` (and ``copyright``) in ``cache``, fetching them if needed.

    Raises :class:`FetchError` when ``apt-get``/``dpkg`` is missing or fails, or a file's sha256
    differs from :data:`SHA256`.
    """
    cache = Path(cache)
    paths = {name: cache / f"{name}.nii.gz" for name in SHA256}
    if all(_matches(path, name) for name, path in paths.items()):
        log.info("Colin27 from the cache %s", cache)
        return {**paths, "copyright": cache / "copyright"}
    remedy = ("or pass --ch2bet and --ch2 with paths to Colin27 files you have "
              "(usr/share/mricron/templates/ch2bet.nii.gz and ch2.nii.gz of Debian's mricron-data)")
    missing = [tool for tool in ("apt-get", "dpkg") if shutil.which(tool) is None]
    if missing:
        raise FetchError(f"cannot fetch Colin27: {' and '.join(missing)} not found (Debian's package tools); "
                         f"install {PACKAGE} yourself, {remedy}")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix="fetch-") as tmp:
        log.info("apt-get download %s into %s", PACKAGE, cache)
        _run(["apt-get", "download", PACKAGE], Path(tmp), remedy)
        debs = sorted(Path(tmp).glob(f"{PACKAGE}_*.deb"))
        if not debs:
            raise FetchError(f"apt-get download {PACKAGE} wrote no .deb file; {remedy}")
        _run(["dpkg", "-x", str(debs[-1]), "root"], Path(tmp), remedy)
        root = Path(tmp) / "root"
        for name, path in paths.items():
            extracted = root / TEMPLATES / path.name
            if not extracted.is_file():
                raise FetchError(f"{PACKAGE} has no {TEMPLATES}/{path.name}; {remedy}")
            measured = sha256(extracted)
            if measured != SHA256[name]:
                raise FetchError(f"{PACKAGE}'s {path.name} has sha256 {measured}, expected {SHA256[name]}: "
                                 f"another version of the package; check it and {remedy}")
            shutil.move(extracted, path)
        shutil.move(root / COPYRIGHT, cache / "copyright")
    return {**paths, "copyright": cache / "copyright"}


def _run(command: list[str], cwd: Path, remedy: str) -> None:
    result = subprocess.run(command, cwd=cwd, check=False, capture_output=True, text=True)
    if result.returncode != 0:
        raise FetchError(f"`{' '.join(command)}` failed (exit {result.returncode}): {result.stderr.strip()[-500:]}\n"
                         f"Run `apt-get update` if the package is not found, {remedy}")


def brain_mask(ch2bet: np.ndarray) -> np.ndarray:
    """The largest connected component (6-connected) of ``ch2bet > 0``."""
    components, count = ndimage.label(ch2bet > 0)
    if count == 0:
        raise ValueError("the skull-stripped image is empty")
    sizes = np.bincount(components.ravel())[1:]
    return components == 1 + int(np.argmax(sizes))


@dataclass(frozen=True)
class GaussianClasses:
    """The fitted mixture, classes ordered by mean (CSF, GM, WM)."""

    means: tuple[float, ...]
    sds: tuple[float, ...]
    weights: tuple[float, ...]


def pseudo_labels(image: np.ndarray, mask: np.ndarray, seed: int = 0) -> tuple[np.ndarray, GaussianClasses]:
    """Labels 0 (outside ``mask``), 1/2/3 by a 3-class Gaussian mixture on the intensities inside it."""
    values = image[mask].astype(np.float64).reshape(-1, 1)
    mixture = GaussianMixture(3, covariance_type="full", random_state=seed).fit(values)
    order = np.argsort(mixture.means_.ravel())
    means = mixture.means_.ravel()[order]
    classes = np.argsort(order)[mixture.predict(values)] + 1  # ranks by mean → 1, 2, 3
    flat = values.ravel()
    classes[flat < means[0]] = 1
    classes[flat > means[-1]] = 3
    labels = np.zeros(image.shape, np.uint8)
    labels[mask] = classes
    fitted = GaussianClasses(tuple(means.tolist()), tuple(np.sqrt(mixture.covariances_.ravel()[order]).tolist()),
                             tuple(mixture.weights_[order].tolist()))
    return labels, fitted


@dataclass(frozen=True)
class ScannerLike:
    """How the scanner-like copy differs from the MNI-space original.

    The head is moved by a rigid transform (``rotation_deg`` about ``axis`` through the world
    origin, then ``translation_mm``), written on a grid whose voxel axes point ``axcodes`` (nibabel
    codes: "PSR" = first axis towards posterior, second superior, third right), cut to the moved
    head's bounding box plus ``margin_mm`` with ``crop_inferior_mm`` of the neck removed.
    """

    rotation_deg: float = 15.0
    axis: tuple[float, float, float] = (1.0, 0.5, 0.3)
    translation_mm: tuple[float, float, float] = (24.0, -18.0, 10.0)
    axcodes: str = "PSR"
    spacing_mm: float = 1.0
    margin_mm: float = 4.0
    crop_inferior_mm: float = 30.0

    def world_transform(self) -> np.ndarray:
        """4×4 map from original to moved world coordinates (mm)."""
        axis = np.asarray(self.axis, float) / np.linalg.norm(self.axis)
        angle = np.deg2rad(self.rotation_deg)
        cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
        transform = np.eye(4)
        transform[:3, :3] = np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross  # Rodrigues
        transform[:3, 3] = self.translation_mm
        return transform

    def describe(self) -> dict:
        return {**asdict(self), "world_transform": self.world_transform().round(6).tolist()}


def _axes_matrix(axcodes: str, spacing: float) -> np.ndarray:
    """3×3 voxel-to-world directions of a grid whose axes point ``axcodes`` (RAS+ world)."""
    orientation = nib.orientations.axcodes2ornt(tuple(axcodes))
    directions = np.zeros((3, 3))
    for voxel_axis, (world_axis, sign) in enumerate(orientation):
        directions[int(world_axis), voxel_axis] = sign * spacing
    return directions


def scanner_grid(head: np.ndarray, affine: np.ndarray,
                 settings: ScannerLike) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape and affine of the scanner-like grid around the moved ``head`` mask (on ``affine``)."""
    corners = np.argwhere(head)
    world = nib.affines.apply_affine(settings.world_transform() @ affine, corners)
    low, high = world.min(0) - settings.margin_mm, world.max(0) + settings.margin_mm
    low[2] += settings.crop_inferior_mm  # world z is superior: the neck is cut
    directions = _axes_matrix(settings.axcodes, settings.spacing_mm)
    shape = tuple(int(np.ceil(extent)) + 1 for extent in np.abs(np.linalg.inv(directions) @ (high - low)))
    # the grid's first voxel sits at the corner of the box its axes point away from
    origin = np.where(directions.sum(1) > 0, low, high)
    grid = np.eye(4)
    grid[:3, :3], grid[:3, 3] = directions, origin
    return shape, grid


def resample(volume: np.ndarray, affine: np.ndarray, shape: tuple[int, ...], grid: np.ndarray,
             world_transform: np.ndarray, order: int) -> np.ndarray:
    """``volume`` (on ``affine``) moved by ``world_transform`` and sampled on ``grid`` (0 outside).

    ``order`` 0 is nearest neighbour (labels), 1 trilinear (intensities).
    """
    voxel_map = np.linalg.inv(affine) @ np.linalg.inv(world_transform) @ grid  # grid voxel → volume voxel
    return ndimage.affine_transform(volume, voxel_map, output_shape=shape, order=order, mode="constant", cval=0.0)


@dataclass(frozen=True)
class Moved:
    image: np.ndarray
    labels: np.ndarray
    affine: np.ndarray


def make_scanner_like(image: np.ndarray, labels: np.ndarray, affine: np.ndarray, settings: ScannerLike,
                      head_threshold: float = 0.0) -> Moved:
    """The scanner-like copy of ``image`` (trilinear, int16) and of its ``labels`` (nearest neighbour)."""
    shape, grid = scanner_grid(image > head_threshold, affine, settings)
    transform = settings.world_transform()
    moved_image = resample(image.astype(np.float32), affine, shape, grid, transform, order=1)
    moved_labels = resample(labels, affine, shape, grid, transform, order=0)
    return Moved(np.round(moved_image).astype(np.int16), moved_labels.astype(np.uint8), grid)
