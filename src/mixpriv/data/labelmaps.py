"""Tissue label maps for domain randomisation: label values, subject access and the shared array helpers.

Used by :mod:`mixpriv.data.deformation` and :mod:`mixpriv.data.synthesis`.

Example:
    >>> import numpy as np
    >>> mask = np.zeros((5, 5, 5), bool); mask[2, 2, 2] = True
    >>> int(grow(mask, 1).sum())  # a 6-connected diamond
    7
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchio as tio
from scipy import ndimage

from mixpriv.constants import IMAGE, LABEL
from mixpriv.validation import InputError

#: Label values of the tissues (0 is background).
CSF, GM, WM = 1, 2, 3
TISSUES = (CSF, GM, WM)
CROSS = ndimage.generate_binary_structure(3, 1)  # 6-connected structuring element


def image_and_label(subject: tio.Subject) -> tuple[tio.ScalarImage, np.ndarray]:
    """The subject's image and its label map as a (W, H, D) uint8 array."""
    if IMAGE not in subject or LABEL not in subject:
        raise InputError(f"domain randomisation needs subject keys {IMAGE!r} and {LABEL!r}, got {list(subject)}")
    image, label = subject[IMAGE], subject[LABEL]
    if image.spatial_shape != label.spatial_shape:
        raise InputError(f"image shape {image.spatial_shape} and label shape {label.spatial_shape} differ")
    return image, label.data[0].numpy().astype(np.uint8)


def check_labels(label: np.ndarray, n_tissues: int) -> None:
    """Raise unless every label value lies in 0..n_tissues (one parameter per tissue)."""
    if int(label.max()) > n_tissues:
        raise InputError(f"label value {int(label.max())} has no tissue parameters (given for labels 1..{n_tissues})")


def smooth_noise(shape: Sequence[int], nodes: int, generator: torch.Generator) -> np.ndarray:
    """A smooth N(0, 1) field: ``nodes``^3 random control values, trilinearly upsampled to ``shape``."""
    coarse = torch.randn((1, 1, nodes, nodes, nodes), generator=generator)
    return F.interpolate(coarse, size=tuple(shape), mode="trilinear", align_corners=True)[0, 0].numpy()


def grow(mask: np.ndarray, steps: int) -> np.ndarray:
    """Dilation by ``steps`` 6-connected steps (a diamond, not a blocky cube)."""
    return ndimage.binary_dilation(mask, structure=CROSS, iterations=steps)

