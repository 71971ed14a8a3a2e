"""BraTS evaluation: the tumour regions, their Dice and 95% Hausdorff distance, with the empty-region conventions.

The tumour task's classes are NCR (1), ED (2) and ET (3) (:data:`mixpriv.data.brats.CLASS_LABELS`).
BraTS scores three nested regions, not the classes:

* WT, whole tumour: NCR ∪ ED ∪ ET;
* TC, tumour core: NCR ∪ ET;
* ET, enhancing tumour: ET.

Conventions when a region is empty (the BraTS challenge's, stated here because the tissue task's
Dice leaves a class absent from both maps out as NaN, :mod:`mixpriv.evaluation.dice`):

* Dice: region empty in both maps → 1 (an absent ET correctly predicted absent); empty in one only → 0.
* HD95: empty in both → 0 mm; empty in one only → the diagonal of the volume in mm (the largest
  distance the grid holds; BraTS's 373.13 mm is that diagonal for its 240 × 240 × 155 grid at 1 mm).

HD95 is symmetric: the larger of the two directed 95th percentiles of the distances from the
surface voxels of one region to the surface of the other, in mm (SciPy's Euclidean distance
transform with the voxel spacing), as MONAI's ``compute_hausdorff_distance(percentile=95)`` does.

Example:
    >>> import numpy as np
    >>> target = np.zeros((8, 8, 8), dtype=np.uint8); target[2:5, 2:5, 2:5] = 2; target[3, 3, 3] = 1
    >>> region_dice(target, target)
    {'WT': 1.0, 'TC': 1.0, 'ET': 1.0}
    >>> region_hd95(target, target, spacing=(1.0, 1.0, 1.0))
    {'WT': 0.0, 'TC': 0.0, 'ET': 0.0}
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from mixpriv.constants import TUMOUR_CLASSES
from mixpriv.evaluation.dice import as_label_array
from mixpriv.evaluation.report import DiceTable, to_json
from mixpriv.files import write_text_atomically
from mixpriv.validation import ArrayLike, InputError, check_same_shape

__all__ = ["BRATS_REGIONS", "TUMOUR_CLASSES", "RegionTable", "hausdorff95", "region_dice", "region_hd95"]

#: BraTS region -> the classes it unites (class values of :data:`mixpriv.data.brats.CLASS_LABELS`).
BRATS_REGIONS: dict[str, tuple[int, ...]] = {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}


def _region_masks(prediction: ArrayLike, target: ArrayLike,
                  regions: Mapping[str, Sequence[int]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    check_same_shape(prediction, target, "prediction", "target", spatial_only=False)
    predicted, expected = as_label_array(prediction, "prediction"), as_label_array(target, "target")
    return {name: (np.isin(predicted, list(values)), np.isin(expected, list(values)))
            for name, values in regions.items()}


def region_dice(prediction: ArrayLike, target: ArrayLike,
                regions: Mapping[str, Sequence[int]] = BRATS_REGIONS) -> dict[str, float]:
    """Dice of each region between two class maps (BraTS convention: empty in both → 1).

    Example:
        >>> import numpy as np
        >>> target = np.array([0, 1, 2, 2]); prediction = np.array([0, 3, 2, 0])
        >>> region_dice(prediction, target)
        {'WT': 0.8, 'TC': 1.0, 'ET': 0.0}
    """
    scores = {}
    for name, (predicted, expected) in _region_masks(prediction, target, regions).items():
        total = int(predicted.sum()) + int(expected.sum())
        scores[name] = 1.0 if total == 0 else 2.0 * int((predicted & expected).sum()) / total
    return scores


def _surface(mask: np.ndarray) -> np.ndarray:
    """The voxels of ``mask`` with a neighbour (6-connectivity) outside it or outside the grid."""
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def _directed_distances(source: np.ndarray, target: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Distance (mm) from each surface voxel of ``source`` to the nearest surface voxel of ``target``."""
    return ndimage.distance_transform_edt(~_surface(target), sampling=spacing)[_surface(source)]


def hausdorff95(predicted: np.ndarray, expected: np.ndarray, spacing: Sequence[float]) -> float:
    """Symmetric 95th-percentile Hausdorff distance (mm) between two boolean masks, with the BraTS
    conventions for empty masks (both empty: 0; one empty: the volume's diagonal).

    Example:
        >>> import numpy as np
        >>> a = np.zeros((1, 1, 10), dtype=bool); b = a.copy(); a[0, 0, 1] = True; b[0, 0, 4] = True
        >>> hausdorff95(a, b, spacing=(2.0, 2.0, 2.0))
        6.0
    """
    predicted, expected = np.asarray(predicted, dtype=bool), np.asarray(expected, dtype=bool)
    if predicted.shape != expected.shape or predicted.ndim != len(spacing):
        raise InputError(f"hausdorff95 needs two masks of one shape and a spacing per axis, got "
                         f"{predicted.shape}, {expected.shape} and {tuple(spacing)}")
    if min(spacing) <= 0:
        raise InputError(f"voxel spacing must be positive, got {tuple(spacing)}")
    if not predicted.any() and not expected.any():
        return 0.0
    if not predicted.any() or not expected.any():
        return float(np.linalg.norm(np.asarray(predicted.shape) * np.asarray(spacing, dtype=float)))
    forward = np.percentile(_directed_distances(predicted, expected, spacing), 95)
    backward = np.percentile(_directed_distances(expected, predicted, spacing), 95)
    return float(max(forward, backward))


def region_hd95(prediction: ArrayLike, target: ArrayLike, spacing: Sequence[float],
                regions: Mapping[str, Sequence[int]] = BRATS_REGIONS) -> dict[str, float]:
    """HD95 (mm) of each region between two class maps on a grid of ``spacing`` mm (see :func:`hausdorff95`).

    Example:
        >>> import numpy as np
        >>> target = np.zeros((4, 4, 4), dtype=np.uint8); target[1, 1, 1] = 3
        >>> region_hd95(np.zeros_like(target), target, spacing=(1.0, 1.0, 1.0))["ET"]
        6.928203230275509
    """
    return {name: hausdorff95(predicted, expected, spacing)
            for name, (predicted, expected) in _region_masks(prediction, target, regions).items()}


class RegionTable:
    """Per-case region Dice and HD95 of several methods (BraTS terms), next to the per-class :class:`DiceTable`.

    Args:
        spacing: voxel size (mm) of the grid the label maps are scored on.

    Example:
        >>> import numpy as np, tempfile
        >>> table = RegionTable(spacing=(2.0, 2.0, 2.0))
        >>> target = np.zeros((6, 6, 6), dtype=np.uint8); target[1:5, 1:5, 1:5] = 2; target[2:4, 2:4, 2:4] = 3
        >>> table.add_prediction("Baseline", "c0", target, target)["dice"]
        {'WT': 1.0, 'TC': 1.0, 'ET': 1.0}
        >>> sorted(table.save(tempfile.mkdtemp()))
        ['regions_json', 'regions_table']
    """

    def __init__(self, spacing: Sequence[float]) -> None:
        self.spacing = tuple(float(s) for s in spacing)
        names = {"background": 0, **{name: i + 1 for i, name in enumerate(BRATS_REGIONS)}}
        self.dice, self.hd95 = DiceTable(names), DiceTable(names)

    def add_prediction(self, method: str, case_id: str, prediction: ArrayLike,
                       target: ArrayLike) -> dict[str, dict[str, float]]:
        """Score one case's class map against its target: region Dice and HD95 (mm), recorded and returned."""
        scores = {"dice": region_dice(prediction, target), "hd95": region_hd95(prediction, target, self.spacing)}
        self.dice.add(method, case_id, scores["dice"])
        self.hd95.add(method, case_id, scores["hd95"])
        return scores

    def to_markdown(self) -> str:
        """Both tables, with the conventions they follow."""
        return (self.dice.to_markdown("BraTS regions: Dice", caption="Dice per case (a region empty in both maps "
                                      "scores 1, in one only 0)")
                + "\n" + self.hd95.to_markdown("BraTS regions: HD95 (mm)", digits=2, caption=(
                    "Symmetric 95th-percentile Hausdorff distance per case (a region empty in both maps: 0 mm, "
                    "in one only: the volume's diagonal)")))

    def aggregate(self) -> dict:
        """Mean and spread of each method's region scores: ``{"dice": ..., "hd95_mm": ...}`` (plain JSON types)."""
        return to_json({"dice": self.dice.aggregate(), "hd95_mm": self.hd95.aggregate()})

    def save(self, out_dir: str | Path) -> dict[str, Path]:
        """Write ``regions.json`` (per case and aggregate, both metrics) and ``regions.md`` into ``out_dir``."""
        out_dir = Path(out_dir)
        data = {"regions": {name: list(values) for name, values in BRATS_REGIONS.items()}, "spacing_mm": self.spacing,
                "dice": {"per_case": self.dice.per_case, "aggregate": self.dice.aggregate()},
                "hd95_mm": {"per_case": self.hd95.per_case, "aggregate": self.hd95.aggregate()}}
        text = json.dumps(to_json(data), indent=2, allow_nan=False, ensure_ascii=False)
        return {"regions_json": write_text_atomically(out_dir / "regions.json", text + "\n"),
                "regions_table": write_text_atomically(out_dir / "regions.md", self.to_markdown())}
