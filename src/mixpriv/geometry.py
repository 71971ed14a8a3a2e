"""Where volumes lie in the world: grids (shape + affine), resampling between them, overlap checks.

Scans, references and outputs meet in world coordinates (millimetres, RAS+), never by array
index. A :class:`GridSpace` is a voxel grid: its spatial shape and the 4x4 affine from voxel
indices to world coordinates. The client's key records the grid of its references (its
*space*); a scan is resampled into that space by its own affine before it is mixed
(:func:`resample_into`), and the results go back onto the scan's own grid by resampling the
class probabilities (:func:`probabilities_onto`) before taking the argmax, as nnU-Net does.

:func:`check_overlap` refuses a scan whose brain does not lie where the key's references
lie: mixing it would put the references off the patient's anatomy (a silent loss of Dice),
so the caller is told to register the scan first.

Example:
    >>> import numpy as np, torch
    >>> space = GridSpace((4, 4, 4), np.diag([2.0, 2.0, 2.0, 1.0]))
    >>> space.spacing
    (2.0, 2.0, 2.0)
    >>> GridSpace.from_dict(space.to_dict()) == space
    True
    >>> moved = torch.arange(64.0).reshape(1, 4, 4, 4)
    >>> bool(torch.equal(resample_into(moved, space, space, label=False), moved))  # same grid: unchanged
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torchio as tio

from mixpriv.validation import InputError

#: Affines that differ by less than this (mm, or per unit of the 3x3 part) describe one grid.
AFFINE_TOLERANCE = 1e-4
#: A scan must cover at least this fraction of the key's brain region to be mixed with its references.
MIN_BRAIN_COVERAGE = 0.6
#: ... and the centre of its foreground must lie within this many mm of the references' brain centre.
MAX_CENTRE_OFFSET_MM = 20.0


@dataclass(frozen=True, eq=False)
class GridSpace:
    """A voxel grid in world coordinates: spatial ``shape`` (D, H, W) and the 4x4 voxel-to-world ``affine``."""

    shape: tuple[int, int, int]
    affine: np.ndarray

    def __post_init__(self) -> None:
        shape = tuple(int(side) for side in self.shape)
        affine = np.asarray(self.affine, dtype=np.float64)
        if len(shape) != 3 or min(shape) < 1:
            raise InputError(f"a grid needs three positive sides, got {self.shape}")
        if affine.shape != (4, 4) or not np.isfinite(affine).all():
            raise InputError(f"a grid's affine must be a finite 4x4 matrix, got shape {affine.shape}")
        if abs(np.linalg.det(affine[:3, :3])) < 1e-9 or not np.allclose(affine[3], (0, 0, 0, 1)):
            raise InputError("a grid's affine must be invertible with last row (0, 0, 0, 1)")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "affine", affine)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, GridSpace) and self.shape == other.shape
                and bool(np.allclose(self.affine, other.affine, atol=AFFINE_TOLERANCE)))

    def __hash__(self) -> int:
        return hash(self.shape)

    def __repr__(self) -> str:
        spacing = "x".join(f"{s:g}" for s in self.spacing)
        return f"GridSpace(shape={self.shape}, spacing={spacing} mm, origin={tuple(np.round(self.affine[:3, 3], 2))})"

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size (mm) along each array axis."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))

    @classmethod
    def of(cls, image: tio.Image) -> GridSpace:
        """The grid of a TorchIO image."""
        return cls(image.spatial_shape, image.affine)

    def to_dict(self) -> dict:
        """JSON-ready ``{"shape": [...], "affine": [[...], ...]}``."""
        return {"shape": list(self.shape), "affine": self.affine.tolist()}

    @classmethod
    def from_dict(cls, data: Mapping) -> GridSpace:
        """Inverse of :meth:`to_dict`; a clear error for anything else."""
        try:
            return cls(tuple(data["shape"]), np.asarray(data["affine"], dtype=np.float64))
        except (KeyError, TypeError, ValueError) as error:
            raise InputError(f"not a grid description (shape and affine): {error}") from error

    def world_points(self, voxels: np.ndarray) -> np.ndarray:
        """World coordinates (N, 3) of voxel indices (N, 3)."""
        return np.asarray(voxels, dtype=np.float64) @ self.affine[:3, :3].T + self.affine[:3, 3]


def resample_into(volume: torch.Tensor, source: GridSpace, target: GridSpace, label: bool) -> torch.Tensor:
    """A (C, D, H, W) volume on ``source`` resampled onto ``target`` by world coordinates.

    Scalar volumes (images, probabilities) are interpolated linearly and label maps by nearest
    neighbour; voxels of ``target`` outside ``source`` get 0. The volume is returned as it is
    when the two grids are one.
    """
    if source == target:
        return volume
    image_class = tio.LabelMap if label else tio.ScalarImage
    moved = tio.Resample((target.shape, target.affine))(
        image_class(tensor=volume, affine=source.affine))
    return moved.data.to(volume.dtype) if label else moved.data


def probabilities_onto(probabilities: torch.Tensor, source: GridSpace, target: GridSpace) -> torch.Tensor:
    """Class probabilities (C, D, H, W) on ``source`` resampled onto ``target``, still distributions.

    Interpolated linearly (as nnU-Net resamples probabilities before the argmax, which gives
    smooth label boundaries on a finer grid, not blocks); voxels of ``target`` outside
    ``source`` are background (class 0) with probability 1.

    Example:
        >>> coarse = GridSpace((2, 2, 2), np.diag([2.0, 2.0, 2.0, 1.0]))
        >>> fine = GridSpace((4, 4, 4), np.diag([1.0, 1.0, 1.0, 1.0]))
        >>> p = torch.softmax(torch.randn(3, 2, 2, 2), 0)
        >>> q = probabilities_onto(p, coarse, fine)
        >>> q.shape, bool(torch.allclose(q.sum(0), torch.ones(4, 4, 4)))
        (torch.Size([3, 4, 4, 4]), True)
    """
    moved = resample_into(probabilities.float(), source, target, label=False).clamp_min(0)
    total = moved.sum(0, keepdim=True)
    outside = total[0] < 1e-6
    moved = moved / total.clamp_min(1e-6)
    moved[:, outside] = 0
    moved[0, outside] = 1
    return moved


@dataclass(frozen=True)
class Overlap:
    """How a scan resampled into a key's space lies on the references' brain region.

    Attributes:
        coverage: fraction of the references' brain region where the scan has signal.
        centre_offset_mm: distance between the centres of the scan's signal and of that region.
    """

    coverage: float
    centre_offset_mm: float

    @property
    def aligned(self) -> bool:
        return self.coverage >= MIN_BRAIN_COVERAGE and self.centre_offset_mm <= MAX_CENTRE_OFFSET_MM


def foreground(image: torch.Tensor, fraction: float = 0.1) -> torch.Tensor:
    """Voxels (D, H, W) of an intensity-normalised image (1, D, H, W) above ``fraction`` of its range."""
    low, high = float(image.min()), float(image.max())
    return image[0] > low + fraction * (high - low)


def measure_overlap(image: torch.Tensor, brain_region: torch.Tensor, space: GridSpace) -> Overlap:
    """The :class:`Overlap` of an image (1, D, H, W) on ``space`` with a brain region (D, H, W) on it."""
    signal = foreground(image)
    region = brain_region.bool()
    if not bool(region.any()):
        raise InputError("the key's references have no brain voxels: it cannot be mixed with")
    if not bool(signal.any()):
        return Overlap(0.0, float("inf"))
    coverage = float((signal & region).sum()) / float(region.sum())
    centres = [space.world_points(torch.nonzero(mask).double().mean(0, keepdim=True).numpy())[0]
               for mask in (signal, region)]
    return Overlap(coverage, float(np.linalg.norm(centres[0] - centres[1])))


def check_overlap(image: torch.Tensor, brain_region: torch.Tensor, space: GridSpace, what: str = "the scan") -> Overlap:
    """Raise ``InputError`` when an image (1, D, H, W) resampled into ``space`` misses the brain region.

    The message says by how much and what to do: register the scan to the model's template
    space (``--register``), or check its affine.

    Example:
        >>> space = GridSpace((8, 8, 8), np.eye(4))
        >>> region = torch.zeros(8, 8, 8, dtype=torch.bool); region[2:6, 2:6, 2:6] = True
        >>> check_overlap(region[None].float(), region, space).aligned
        True
        >>> shifted = torch.zeros(1, 8, 8, 8); shifted[0, :2, :2, :2] = 1
        >>> check_overlap(shifted, region, space)
        Traceback (most recent call last):
        ...
        mixpriv.validation.InputError: the scan, placed by its affine into the key's space, covers 0% of the references' brain region and its centre lies 5.2 mm from theirs: it is not in the key's space. Register it to the model's template space first (`--register` on the command line, `register=True` in the API), or check that its affine is right
    """
    overlap = measure_overlap(image, brain_region, space)
    if not overlap.aligned:
        raise InputError(
            f"{what}, placed by its affine into the key's space, covers {overlap.coverage:.0%} of the references' "
            f"brain region and its centre lies {overlap.centre_offset_mm:.1f} mm from theirs: it is not in the key's "
            f"space. Register it to the model's template space first (`--register` on the command line, "
            f"`register=True` in the API), or check that its affine is right")
    return overlap


def subject_into(subject: tio.Subject, space: GridSpace | None) -> tio.Subject:
    """A subject's images resampled onto ``space`` by world coordinates (labels by nearest neighbour).

    The subject is returned as it is when ``space`` is ``None`` or its images already lie there
    (the embedded cohort's scans all lie on one grid).
    """
    if space is None or all(GridSpace.of(image) == space for image in subject.get_images(intensity_only=False)):
        return subject
    return tio.Resample((space.shape, space.affine))(subject)

