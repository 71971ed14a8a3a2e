"""A scan made ready to mix with a key, and the way back onto its own grid: :func:`prepare_scan`.

The client's key records the grid its references lie on (its space). :func:`prepare_scan` reads
a scan, places it in that space by its affine (or, with ``register=True``, by an affine
registration to the key's mean reference, for scans in scanner space), resamples it there and
normalises its intensities, then checks that its brain lies where the references' brains lie.
The :class:`PreparedScan` it returns holds the image to mix and carries results back onto the
scan's own voxels: probabilities are resampled first and the label map is their argmax.

Example:
    >>> prepared = prepare_scan("scan.nii.gz", TemplateSpace.of_key(key), register=True)  # doctest: +SKIP
    >>> result = TTAEnsembler(model, key)(prepared.image)["learned"]  # doctest: +SKIP
    >>> labels = prepared.labels_to_native(result.probabilities)  # on the scan's grid  # doctest: +SKIP
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torchio as tio
from scipy import ndimage

from mixpriv.constants import IMAGE
from mixpriv.data.preprocessing import intensity_normalisation
from mixpriv.geometry import (
    GridSpace,
    Overlap,
    check_overlap,
    probabilities_onto,
    resample_into,
)
from mixpriv.inference.volume import check_scan, preprocess_scan, read_scan
from mixpriv.mixing.bank import ReferenceBank
from mixpriv.registration import register_affine, registered_affine
from mixpriv.validation import InputError


@dataclass
class PreparedScan:
    """A scan on the key's grid, ready to mix, and how its voxels lie there.

    Attributes:
        image: (1, D, H, W) float32, intensities in [0, 1], on ``space``.
        space: the grid ``image`` lies on (the key's, or the model's spacing for a key that
            records no space).
        native: the scan as read (its own grid, affine and orientation).
        placement: the voxel-to-world affine that puts the scan's voxels in ``space``'s world:
            its own affine, or the registered one.
        transform: the registration's world-to-world affine (``None``: not registered).
        overlap: how the scan lies on the references' brain region (``None``: not checked).
    """

    image: torch.Tensor
    space: GridSpace
    native: tio.ScalarImage
    placement: np.ndarray
    transform: np.ndarray | None = None
    overlap: Overlap | None = None

    @property
    def native_grid(self) -> GridSpace:
        """The scan's own voxels, as they lie in ``space``'s world."""
        return GridSpace(self.native.spatial_shape, self.placement)

    def to_native(self, volume: torch.Tensor, label: bool = False) -> torch.Tensor:
        """A (C, D, H, W) volume on ``space`` resampled onto the scan's voxels (e.g. a variance map)."""
        return resample_into(volume, self.space, self.native_grid, label=label)

    def probabilities_to_native(self, probabilities: torch.Tensor) -> torch.Tensor:
        """Class probabilities (C, D, H, W) on ``space`` resampled onto the scan's voxels, still distributions."""
        return probabilities_onto(probabilities, self.space, self.native_grid)

    def labels_to_native(self, probabilities: torch.Tensor) -> torch.Tensor:
        """The label map (1, D, H, W) uint8 on the scan's voxels: the argmax of the resampled probabilities."""
        return self.probabilities_to_native(probabilities).argmax(0, keepdim=True).to(torch.uint8)


@dataclass(frozen=True)
class TemplateSpace:
    """Where a model's inputs lie: a grid, a mean image on it (to register scans to) and its brain region.

    Attributes:
        grid: the voxel grid (shape and affine) scans are resampled onto.
        image: (1, D, H, W) mean intensity-normalised image on ``grid``: the registration template.
        brain_region: (D, H, W) bool, where any of the averaged images has a brain label.
    """

    grid: GridSpace
    image: torch.Tensor
    brain_region: torch.Tensor

    @classmethod
    def of_key(cls, key: ReferenceBank) -> TemplateSpace | None:
        """The space of a key's references (``None`` for a key that records none)."""
        if key.space is None:
            return None
        return cls(key.space, key.images.mean(0), key.brain_region)

    @classmethod
    def of_cases(cls, folder, spacing: float | None, split: str = "train", max_cases: int = 16) -> TemplateSpace:
        """The mean of the first ``max_cases`` labelled cases of a dataset split (e.g. a baseline's training data)."""
        from mixpriv.data.datamodule import bank_from_cases

        return cls.of_key(bank_from_cases(folder, split, spacing, max_cases, progress=False))

    def registration_mask(self) -> torch.Tensor:
        """Where the registration compares the scan with the template: the brain region dilated by 2 voxels."""
        return torch.from_numpy(ndimage.binary_dilation(self.brain_region.numpy(), iterations=2))


def prepare_scan(
    scan: str | os.PathLike | tio.ScalarImage,
    space: TemplateSpace | None = None,
    *,
    spacing: float | None = None,
    register: bool = False,
    check: bool = True,
) -> PreparedScan:
    """Read (or take) a scan and place it in ``space``, ready to mix with the key it came from.

    Args:
        scan: a file path (read and checked by :func:`~mixpriv.inference.volume.read_scan`) or
            a one-channel TorchIO image with its affine.
        space: where the scan goes, e.g. ``TemplateSpace.of_key(key)``: it is resampled onto that
            grid by world coordinates. ``None`` (a key that records no space): the scan is put in
            canonical orientation and resampled to ``spacing``, as before keys recorded their space.
        spacing: voxel size (mm) of the model, used only without ``space``.
        register: first register the scan (12-dof affine, :mod:`mixpriv.registration`) to the
            space's template: for scans in scanner space (any position and orientation, with or
            without skull).
        check: refuse a scan whose brain does not lie on the space's brain region (see
            :func:`mixpriv.geometry.check_overlap`).

    Raises:
        InputError: an unreadable or invalid scan; a scan off the brain region (the message
            says to register it); ``register`` without a space.
    """
    name = "the scan" if isinstance(scan, tio.ScalarImage) else f"scan {os.fspath(scan)}"
    native = check_scan(scan) if isinstance(scan, tio.ScalarImage) else read_scan(scan)
    if space is None:
        if register:
            raise InputError("registration needs a template space: a key made by `mixpriv keygen` records one")
        image = preprocess_scan(native, spacing)[IMAGE]
        return PreparedScan(image.data.float(), GridSpace.of(image), native, native.affine)
    transform = None
    placement = native.affine
    if register:
        template = tio.ScalarImage(tensor=space.image, affine=space.grid.affine)
        transform = register_affine(native, template, space.registration_mask())
        placement = registered_affine(native, transform)
    image = resample_into(native.data.float(), GridSpace(native.spatial_shape, placement), space.grid, label=False)
    subject = intensity_normalisation()(tio.Subject({IMAGE: tio.ScalarImage(tensor=image, affine=space.grid.affine)}))
    data = subject[IMAGE].data.float()
    overlap = check_overlap(data, space.brain_region, space.grid, name) if check else None
    return PreparedScan(data, space.grid, native, placement, transform, overlap)


def check_key_for_model(key: ReferenceBank, num_classes: int, spacing: float | None) -> None:
    """``InputError`` when a key cannot be mixed for a model: other labels, or another voxel size.

    Example:
        >>> key = ReferenceBank(torch.rand(1, 1, 4, 4, 4), torch.zeros(1, 4, 4, 4, dtype=torch.long),
        ...                     {"background": 0, "fg": 1}, space=GridSpace((4, 4, 4), np.diag([1.0, 1, 1, 1])))
        >>> check_key_for_model(key, 2, 2.0)
        Traceback (most recent call last):
        ...
        mixpriv.validation.InputError: the key's references have 1x1x1 mm voxels but the model expects 2 mm: make a key for it with `mixpriv keygen --spacing 2`
    """
    if key.num_classes != num_classes:
        raise InputError(f"the key has {key.num_classes} labels but the model predicts {num_classes}")
    if key.space is not None and spacing is not None and not np.allclose(key.space.spacing, spacing, atol=1e-3):
        voxels = "x".join(f"{s:g}" for s in key.space.spacing)
        raise InputError(f"the key's references have {voxels} mm voxels but the model expects {spacing:g} mm: "
                         f"make a key for it with `mixpriv keygen --spacing {spacing:g}`")
