"""The lesion model of the embedded tumour cohort (:mod:`mixpriv.data.tumour`): shape, mass effect, labels, contrast.

A :class:`Tumour` lives in scanner world coordinates (mm). Its solid part (enhancing rim + necrotic
core) is an ellipsoid whose normalised radius is perturbed by a smooth random field (irregular,
lobulated outline); the necrotic core is the inner part of the same perturbed ellipsoid, at least one
voxel inside the solid part, so the enhancing tumour always surrounds it; some tumours have no core
(solid enhancement). The oedema reaches ``oedema_mm`` beyond the solid part in white matter and a
quarter of that in grey matter, never into CSF, with its own random outline. Everything is clipped
to the brain mask.

Mass effect: before the tumour is painted in, the anatomy is displaced as by a ball of radius
``push_mm`` growing from the centre in incompressible tissue. A scan point at distance ``r`` from the
centre shows the healthy anatomy found at distance ``s = cbrt(r^3 - R^3 exp(-(r / L)^2))`` (clipped
at 0), with ``R = push_mm`` and ``L = 5 x`` the mean radius: displacement ``r - s`` is radial,
outwards, ``~ R^3 / (3 r^2)`` near the tumour, tapering to nothing far away, and never folds
(``s`` increases with ``r``).

Classes here are consecutive (0 background, 1 NCR, 2 ED, 3 ET, as
:data:`mixpriv.data.brats.CLASS_LABELS`); the cohort writes them as BraTS values 0/1/2/4.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from mixpriv.data.cohort import rotation

NCR, ED, ET = 1, 2, 3
#: Spacing (mm) and smoothing (mm) of the random fields that shape the tumour.
FIELD_GRID_MM, FIELD_SMOOTH_MM = 2.0, 5.0


@dataclass(frozen=True)
class Tumour:
    """One tumour in scanner world coordinates (mm).

    Attributes:
        centre: (3,) centre of the solid part.
        axes: (3, 3) rotation whose columns are the ellipsoid's principal directions.
        radii: (3,) semi-axes of the solid part (NCR + ET) before the shape perturbation.
        rim_mm: thickness of the enhancing rim around the necrotic core.
        necrotic: whether there is a necrotic core (otherwise the enhancing tumour is solid).
        oedema_mm: how far the oedema reaches beyond the solid part in white matter.
        irregularity: relative amplitude of the random perturbation of the outline.
        push_mm: radius of the mass effect's equivalent ball (0: no mass effect).
        field_seed: seed of the random fields (outline, oedema outline, texture).
    """

    centre: np.ndarray
    axes: np.ndarray
    radii: np.ndarray
    rim_mm: float
    necrotic: bool
    oedema_mm: float
    irregularity: float
    push_mm: float
    field_seed: int

    @property
    def extent_mm(self) -> float:
        """Radius of a ball around the centre that holds the whole tumour and its oedema."""
        return float(self.radii.max() / (1 - 2.5 * self.irregularity) + self.oedema_mm / (1 - 2.5 * self.irregularity))

    def describe(self) -> dict:
        """JSON-ready description (as recorded in the cohort's ``cohort.json``).

        Example:
            >>> t = Tumour(np.zeros(3), np.eye(3), np.full(3, 10.0), 3.0, True, 8.0, 0.2, 9.0, 1)
            >>> t.describe()["radii_mm"]
            [10.0, 10.0, 10.0]
        """
        return {"centre_mm": [round(float(v), 2) for v in self.centre],
                "radii_mm": [round(float(v), 2) for v in self.radii], "rim_mm": round(self.rim_mm, 2),
                "necrotic": self.necrotic, "oedema_mm": round(self.oedema_mm, 2),
                "irregularity": round(self.irregularity, 3), "push_mm": round(self.push_mm, 2)}


def draw_tumour(rng: np.random.Generator, locate: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
                centre: np.ndarray, radius_mm: tuple[float, float] = (8.0, 18.0), p_necrotic: float = 0.75,
                edge_margin_mm: float = 6.0) -> Tumour:
    """A random tumour whose centre lies in white matter, deep enough for its solid part to fit in the brain.

    Args:
        rng: the tumour's random generator.
        locate: scanner world points (3, N) -> (depth inside the brain mask in mm, white-matter probability), (N,) each.
        centre: (3,) centre of the brain (world mm); candidate centres are drawn within 60 mm of it.
        radius_mm: range of the solid part's mean semi-axis.
        p_necrotic: probability of a necrotic core.
        edge_margin_mm: brain depth kept beyond the solid part's largest radius.

    Example:
        >>> deep = lambda p: (60 - np.linalg.norm(p, axis=0), np.ones(p.shape[1]))  # a ball of 60 mm, all WM
        >>> t = draw_tumour(np.random.default_rng(0), deep, np.zeros(3))
        >>> bool(np.linalg.norm(t.centre) < 60 - t.radii.max())
        True
    """
    mean_radius = rng.uniform(*radius_mm)
    radii = mean_radius * np.exp(rng.uniform(-0.2, 0.2, 3))
    axes = rotation(rng.uniform(-180, 180, 3))
    irregularity = float(rng.uniform(0.08, 0.22))
    necrotic = bool(rng.uniform() < p_necrotic)
    rim_mm = float(min(rng.uniform(2.5, 5.0), 0.6 * mean_radius))
    oedema_mm = float(rng.uniform(4.0, 18.0))
    push_mm = float(rng.uniform(0.8, 1.1) * mean_radius)
    candidates = centre[:, None] + rng.uniform(-60, 60, (3, 4000))
    depth, wm = locate(candidates)
    fits = depth >= radii.max() * (1 + 2 * irregularity) + edge_margin_mm
    good = np.flatnonzero(fits & (wm > 0.5))
    pick = good[0] if good.size else (np.flatnonzero(fits)[0] if fits.any() else int(np.argmax(depth)))
    return Tumour(candidates[:, pick].copy(), axes, radii, rim_mm, necrotic, oedema_mm, irregularity, push_mm,
                  int(rng.integers(2**31)))


def mass_effect(world: np.ndarray, tumour: Tumour) -> np.ndarray:
    """Where (3, N) the healthy anatomy shown at scanner world points ``world`` (3, N) comes from.

    Example:
        >>> t = Tumour(np.zeros(3), np.eye(3), np.full(3, 10.0), 3.0, True, 8.0, 0.2, 9.0, 1)
        >>> src = mass_effect(np.array([[12.0, 200.0], [0, 0], [0, 0]]), t)
        >>> bool(src[0, 0] < 12.0), round(float(src[0, 1]), 3)  # pushed outwards near it, not far away
        (True, 200.0)
    """
    if tumour.push_mm <= 0:
        return world
    offset = world - tumour.centre[:, None]
    r = np.linalg.norm(offset, axis=0)
    taper = np.exp(-((r / (5 * tumour.radii.mean())) ** 2))
    s = np.cbrt(np.clip(r**3 - tumour.push_mm**3 * taper, 0, None))
    return tumour.centre[:, None] + offset * (s / np.maximum(r, 1e-6))


def _fields(tumour: Tumour, world: np.ndarray, n: int) -> np.ndarray:
    """``n`` smooth random fields (unit SD) of the tumour at world points (3, N); 0 outside its box."""
    half = tumour.extent_mm + 3 * FIELD_SMOOTH_MM
    size = int(np.ceil(2 * half / FIELD_GRID_MM)) + 1
    noise = np.random.default_rng(tumour.field_seed).standard_normal((n, size, size, size))
    fields = [ndimage.gaussian_filter(f, FIELD_SMOOTH_MM / FIELD_GRID_MM) for f in noise]
    grid = (world - (tumour.centre - half)[:, None]) / FIELD_GRID_MM
    return np.stack([ndimage.map_coordinates(f / f.std(), grid, order=1, mode="constant", cval=0.0)
                     for f in fields])


def tumour_classes(tumour: Tumour, world: np.ndarray, shape: tuple[int, ...], mask: np.ndarray, wm: np.ndarray,
                   csf: np.ndarray) -> np.ndarray:
    """Class map (uint8, 0 background, 1 NCR, 2 ED, 3 ET) of ``tumour`` on a grid.

    Args:
        tumour: the tumour.
        world: (3, N) world coordinates of the grid's voxels (C order of ``shape``).
        shape: the grid's shape.
        mask, wm, csf: brain-mask, white-matter and CSF probabilities of the (displaced) anatomy on the grid.

    Example:
        >>> shape = (20, 20, 20)
        >>> world = 2.0 * (np.indices(shape).reshape(3, -1) - 10)
        >>> t = Tumour(np.zeros(3), np.eye(3), np.full(3, 8.0), 3.0, True, 6.0, 0.1, 6.0, 1)
        >>> classes = tumour_classes(t, world, shape, np.ones(shape), np.ones(shape), np.zeros(shape))
        >>> sorted(np.unique(classes).tolist())
        [0, 1, 2, 3]
    """
    outline, oedema_outline = _fields(tumour, world, 2)
    q = tumour.axes.T @ (world - tumour.centre[:, None]) / tumour.radii[:, None]
    rho = np.linalg.norm(q, axis=0)
    brain = mask > 0.5
    rho_solid = (rho / np.maximum(1 + tumour.irregularity * outline, 0.3)).reshape(shape)
    solid = (rho_solid < 1) & brain
    classes = np.zeros(shape, np.uint8)
    classes[solid] = ET
    if tumour.necrotic:
        core = (rho_solid < 1 - tumour.rim_mm / tumour.radii.mean()) & ndimage.binary_erosion(solid)
        classes[core] = NCR
    beyond_mm = (rho / np.maximum(1 + tumour.irregularity * oedema_outline, 0.3) - 1).reshape(shape) * tumour.radii.mean()
    reach = tumour.oedema_mm * (0.25 + 0.75 * np.clip(wm / np.maximum(mask, 1e-6), 0, 1))
    classes[(beyond_mm < reach) & ~solid & brain & (csf < 0.5)] = ED
    return classes


def _soft(classes: np.ndarray, value: int, spacing: float) -> np.ndarray:
    """Partial-volume membership of one class (its indicator blurred by ~1 mm)."""
    return ndimage.gaussian_filter((classes == value).astype(np.float32), 0.5 / spacing)


def tumour_contrast(rng: np.random.Generator, tumour: Tumour, world: np.ndarray, classes: np.ndarray,
                    t1: np.ndarray, gm: np.ndarray, wm: np.ndarray, csf: np.ndarray,
                    spacing: float) -> dict[str, np.ndarray]:
    """Noise-free T1ce-like and FLAIR-like images of the displaced anatomy with the tumour painted in.

    T1ce: the anatomy's T1 (WM ~0.85, GM ~0.6, CSF dark), dark necrosis (0.12-0.3), bright enhancing
    rim (1.1-1.5), oedema at 75-90 % of the tissue it replaces. FLAIR: dark CSF, GM slightly brighter
    than WM (from the tissue probabilities), bright oedema (0.9-1.1), enhancing tumour 0.65-0.85,
    necrosis 0.45-0.8. A smooth texture (+-8 %) modulates the tumour.

    Example:
        >>> shape = (20, 20, 20); ones = np.ones(shape, np.float32)
        >>> world = 2.0 * (np.indices(shape).reshape(3, -1) - 10)
        >>> t = Tumour(np.zeros(3), np.eye(3), np.full(3, 8.0), 3.0, True, 6.0, 0.1, 6.0, 1)
        >>> classes = tumour_classes(t, world, shape, ones, ones, 0 * ones)
        >>> images = tumour_contrast(np.random.default_rng(0), t, world, classes, 0.85 * ones, 0 * ones, ones,
        ...                          0 * ones, 2.0)
        >>> bool(images["t1ce"][classes == 3].mean() > images["t1ce"][classes == 2].mean()
        ...      > images["t1ce"][classes == 1].mean())
        True
    """
    texture = 1 + 0.08 * _fields(tumour, world, 3)[2].reshape(classes.shape)
    m_ncr, m_ed, m_et = (_soft(classes, value, spacing) for value in (NCR, ED, ET))
    healthy = np.clip(1 - m_ncr - m_ed - m_et, 0, 1)
    t1ce_ncr, t1ce_et, t1ce_ed = rng.uniform(0.12, 0.3), rng.uniform(1.1, 1.5), rng.uniform(0.75, 0.9)
    flair_ncr, flair_et, flair_ed = rng.uniform(0.45, 0.8), rng.uniform(0.65, 0.85), rng.uniform(0.9, 1.1)
    t1ce = healthy * t1 + m_ed * t1ce_ed * t1 + texture * (m_ncr * t1ce_ncr + m_et * t1ce_et)
    flair_tissue = 0.08 * csf + 0.62 * gm + 0.5 * wm
    flair = healthy * flair_tissue + texture * (m_ed * flair_ed + m_et * flair_et + m_ncr * flair_ncr)
    return {"t1ce": t1ce.astype(np.float32), "flair": flair.astype(np.float32)}
