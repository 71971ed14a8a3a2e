"""Label-driven TorchIO transforms that change the anatomy (see :mod:`mixpriv.data.randomisation`).

Random transforms draw their parameters from torch's global generator and apply their
deterministic twin, as in :mod:`mixpriv.data.synthesis`; shapes and affines are kept.

- :class:`Warp` / :class:`RandomWarp`: rotation, scaling and a multi-scale elastic field, one
  resampling (linear for intensities, nearest for labels).
- :class:`Atrophy` / :class:`RandomAtrophy`: CSF grown into GM/WM, the image following the labels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchio as tio
from scipy import ndimage
from scipy.spatial.transform import Rotation
from torchio.transforms.augmentation.random_transform import RandomTransform

from mixpriv.constants import LABEL
from mixpriv.data.labelmaps import CROSS, CSF, GM, WM, grow, image_and_label, smooth_noise
from mixpriv.validation import InputError

# Ventricles: connected CSF of at least this volume, deeper than this inside the brain mask
# (city-block distance, in 6-connected steps of the smallest voxel size).
VENTRICLE_DEPTH_MM, VENTRICLE_MIN_MM3 = 16.0, 400.0


class Warp(tio.SpatialTransform):
    """Rotate and scale about the centre of the grid and add a multi-scale elastic displacement.

    Output voxel ``p`` (mm from the grid centre) samples the input at ``R·S·p + Σ_s d_s(p)``,
    where ``d_s`` holds uniform displacements in ``[-displacement_mm[s], displacement_mm[s]]``
    on ``control_points[s]``^3 nodes, trilinearly interpolated. A fold-free warp wants each
    displacement under half its node spacing (e.g. 176 mm / 11 = 16 mm for 12 nodes).

    Args:
        rotation: angles (degrees) about the three axes.
        scaling: scale factor of each axis.
        displacement_mm: peak displacement of each scale (mm).
        control_points: nodes per axis of each scale (>= 2).
        seed: seed of the node displacements.

    Example:
        >>> import torch, torchio as tio
        >>> subject = tio.Subject(image=tio.ScalarImage(tensor=torch.rand(1, 8, 8, 8)),
        ...                       label=tio.LabelMap(tensor=torch.ones(1, 8, 8, 8, dtype=torch.uint8)))
        >>> warped = Warp((0.0, 0.0, 5.0), (1.0, 1.0, 1.0), (2.0,), (4,), seed=1)(subject)
        >>> warped["label"].data.dtype, warped["image"].shape
        (torch.uint8, (1, 8, 8, 8))
    """

    def __init__(self, rotation: Sequence[float] = (0.0, 0.0, 0.0), scaling: Sequence[float] = (1.0, 1.0, 1.0),
                 displacement_mm: Sequence[float] = (), control_points: Sequence[int] = (), seed: int = 0,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        if len(displacement_mm) != len(control_points) or min(control_points, default=2) < 2:
            raise InputError(f"need one control_points >= 2 per displacement, got {control_points} "
                             f"for {displacement_mm}")
        self.rotation, self.scaling = tuple(rotation), tuple(scaling)
        self.displacement_mm, self.control_points, self.seed = tuple(displacement_mm), tuple(control_points), seed
        self.args_names = ["rotation", "scaling", "displacement_mm", "control_points", "seed"]

    def _grid(self, shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> torch.Tensor:
        """``grid_sample`` coordinates (1, W, H, D, 3) of the source point of every output voxel."""
        size, mm = torch.tensor(shape, dtype=torch.float32), torch.tensor(spacing, dtype=torch.float32)
        centre = ((size - 1) / 2).view(3, 1, 1, 1)
        index = torch.stack(torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in shape), indexing="ij"))
        points = (index - centre) * mm.view(3, 1, 1, 1)
        rotation = torch.from_numpy(Rotation.from_euler("xyz", self.rotation, degrees=True).as_matrix())
        matrix = rotation.float() @ torch.diag(torch.tensor(self.scaling, dtype=torch.float32))
        source = torch.einsum("ij,jxyz->ixyz", matrix, points)
        generator = torch.Generator().manual_seed(int(self.seed))
        for amplitude, nodes in zip(self.displacement_mm, self.control_points, strict=True):
            nodes_field = (torch.rand((1, 3, nodes, nodes, nodes), generator=generator) * 2 - 1) * amplitude
            source += F.interpolate(nodes_field, size=shape, mode="trilinear", align_corners=True)[0]
        normalised = source / mm.view(3, 1, 1, 1) / centre.clamp(min=0.5)
        return normalised.flip(0).permute(1, 2, 3, 0)[None]  # grid_sample wants (z, y, x) order last

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        images = list(self.get_images(subject))
        if not images:
            return subject
        grid = self._grid(images[0].spatial_shape, images[0].spacing)
        for image in images:
            if image.spatial_shape != images[0].spatial_shape:
                raise InputError(f"Warp needs one grid, got shapes {images[0].spatial_shape} and {image.spatial_shape}")
            label = isinstance(image, tio.LabelMap)
            data = F.grid_sample(image.data[None].float(), grid, mode="nearest" if label else "bilinear",
                                 padding_mode="zeros", align_corners=True)[0]
            image.set_data(data.round().to(image.data.dtype) if label else data.to(image.data.dtype))
        return subject


class RandomWarp(RandomTransform, tio.SpatialTransform):
    """Random :class:`Warp`: angles in ±``degrees``, scales in 1 ± ``scaling``, each scale's peak
    displacement uniform in ``[0, displacement_mm[s]]``.

    Example:
        >>> import torch, torchio as tio
        >>> subject = tio.Subject(image=tio.ScalarImage(tensor=torch.rand(1, 8, 8, 8)))
        >>> RandomWarp(degrees=10.0, scaling=0.1, displacement_mm=(4.0, 1.0), control_points=(4, 6))(subject).shape
        (1, 8, 8, 8)
    """

    def __init__(self, degrees: float = 10.0, scaling: float = 0.1, displacement_mm: Sequence[float] = (8.0, 2.5),
                 control_points: Sequence[int] = (5, 12), **kwargs) -> None:
        super().__init__(**kwargs)
        self.degrees, self.scaling = degrees, scaling
        self.displacement_mm, self.control_points = tuple(displacement_mm), tuple(control_points)

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        rotation = tuple(self.sample_uniform(-self.degrees, self.degrees) for _ in range(3))
        scaling = tuple(self.sample_uniform(1 - self.scaling, 1 + self.scaling) for _ in range(3))
        displacement = tuple(self.sample_uniform(0.0, peak) for peak in self.displacement_mm)
        warp = Warp(rotation, scaling, displacement, self.control_points, self._get_random_seed(),
                    copy=False, include=self.include, exclude=self.exclude)
        return warp(subject)


class Atrophy(tio.Transform):
    """Grow CSF into GM and WM; the image of every relabelled voxel takes a CSF intensity.

    Cortical atrophy grows all CSF by ``cortical_voxels`` (6-connected steps) inside random
    smooth regions that cover ``region_fraction`` of the brain mask; ventricular enlargement
    grows the ventricles (connected CSF of at least ``VENTRICLE_MIN_MM3`` deeper than
    ``VENTRICLE_DEPTH_MM`` inside the brain mask) by ``ventricle_voxels``. New voxels copy the
    intensities of random CSF voxels that touch no GM or WM (pure CSF, whatever the contrast),
    lightly smoothed, so the image follows the new labels. No label other than CSF is created, and the
    brain mask is unchanged.

    Example:
        >>> import torch, torchio as tio
        >>> label = torch.full((1, 9, 9, 9), 2, dtype=torch.uint8); label[0, 4, 4, 4] = 1
        >>> subject = tio.Subject(image=tio.ScalarImage(tensor=label.float() / 6), label=tio.LabelMap(tensor=label))
        >>> out = Atrophy(cortical_voxels=1, ventricle_voxels=0, region_fraction=1.0, seed=0)(subject)
        >>> int((out["label"].data == 1).sum()), bool(out["image"].data[out["label"].data == 1].max() < 2 / 6)
        (7, True)
    """

    def __init__(self, cortical_voxels: int = 0, ventricle_voxels: int = 0, region_fraction: float = 0.5,
                 seed: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.cortical_voxels, self.ventricle_voxels = int(cortical_voxels), int(ventricle_voxels)
        self.region_fraction, self.seed = float(region_fraction), int(seed)
        self.args_names = ["cortical_voxels", "ventricle_voxels", "region_fraction", "seed"]

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        image, label = image_and_label(subject)
        brain, csf, tissue = label > 0, label == CSF, (label == GM) | (label == WM)
        generator = torch.Generator().manual_seed(self.seed)
        grown = np.zeros_like(brain)
        if self.cortical_voxels > 0 and self.region_fraction > 0 and csf.any():
            field = smooth_noise(label.shape, 6, generator)
            region = field >= np.quantile(field[brain], 1 - min(self.region_fraction, 1.0))
            grown |= grow(csf, self.cortical_voxels) & region
        if self.ventricle_voxels > 0 and csf.any():
            depth = max(1, round(VENTRICLE_DEPTH_MM / min(image.spacing)))
            deep = csf & ndimage.binary_erosion(brain, CROSS, iterations=depth)
            components, _ = ndimage.label(deep)
            volume = np.bincount(components.ravel()) * float(np.prod(image.spacing))
            grown |= grow(deep & (volume >= VENTRICLE_MIN_MM3)[components], self.ventricle_voxels)
        grown &= tissue
        if grown.any():
            x = image.data.numpy()
            pure = csf & ~grow(tissue, 1)  # CSF not touching tissue: no partial volume, any contrast
            values = x[:, pure if pure.any() else csf]
            pick = torch.randint(values.shape[1], (int(grown.sum()),), generator=generator).numpy()
            filled = x.copy()
            filled[:, grown] = values[:, pick]
            smooth = np.stack([ndimage.gaussian_filter(channel, 0.5) for channel in filled])
            filled[:, grown] = smooth[:, grown]
            image.set_data(torch.from_numpy(filled))
            label[grown] = CSF
            subject[LABEL].set_data(torch.from_numpy(label)[None].to(subject[LABEL].data.dtype))
        return subject


class RandomAtrophy(RandomTransform):
    """Random :class:`Atrophy`: voxels uniform in ``0..cortical_voxels`` and ``0..ventricle_voxels``,
    region fraction uniform in ``[0, region_fraction]``."""

    def __init__(self, cortical_voxels: int = 2, ventricle_voxels: int = 2, region_fraction: float = 0.5,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.cortical_voxels, self.ventricle_voxels, self.region_fraction = cortical_voxels, ventricle_voxels, region_fraction

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        cortical = int(torch.randint(self.cortical_voxels + 1, (1,)))
        ventricle = int(torch.randint(self.ventricle_voxels + 1, (1,)))
        fraction = self.sample_uniform(0.0, self.region_fraction)
        return Atrophy(cortical, ventricle, fraction, self._get_random_seed(), copy=False)(subject)
