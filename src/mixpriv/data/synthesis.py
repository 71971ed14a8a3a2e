"""Label-driven TorchIO transforms that synthesise intensities and heads (see :mod:`mixpriv.data.randomisation`).

Each random transform draws its parameters (and one seed for its random fields) from torch's
global generator and applies its deterministic twin, which records them in the subject's
history (TorchIO's ``RandomNoise`` -> ``Noise`` shape), so ``torch.manual_seed`` reproduces a
result. They read and write the subject's ``image`` (1-channel ``ScalarImage``) and ``label``
(``LabelMap``, 0 background, 1 CSF, 2 GM, 3 WM) and keep shapes and affines.

- :class:`SynthesiseIntensities`, :class:`RemapIntensities` / :class:`RandomTissueIntensities`:
  SynthSeg's Gaussian mixture, or per-tissue contrast changes of the real image.
- :class:`SyntheticHead` / :class:`RandomSyntheticHead`: CSF layer, skull, scalp and blobs around
  the brain, labelled background.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torchio as tio
from scipy import ndimage
from torchio.transforms.augmentation.random_transform import RandomTransform

from mixpriv.data.labelmaps import CSF, TISSUES, check_labels, image_and_label, smooth_noise
from mixpriv.validation import InputError

# Whole head: shell thicknesses (mm), intensities relative to the brain's 99th percentile.
HEAD_CSF_MM, SKULL_MM, SCALP_MM = (1.0, 3.0), (3.0, 7.0), (3.0, 8.0)
SKULL_INTENSITY, SCALP_INTENSITY, BLOB_INTENSITY = (0.0, 0.25), (0.6, 1.3), (0.1, 1.2)
BLOB_RADIUS_MM, MAX_BLOBS = (4.0, 15.0), 4


class SynthesiseIntensities(tio.Transform):
    """Replace the image by a sample of SynthSeg's Gaussian mixture on the label map.

    Tissue ``l`` (1, 2, 3, ...) gets N(``means[l-1]``, ``stds[l-1]``) per voxel, the background 0;
    the sample is then blurred by a Gaussian of std ``partial_volume_mm`` (partial volume) and
    clipped at 0.

    Example:
        >>> import torch, torchio as tio
        >>> label = torch.randint(0, 4, (1, 8, 8, 8), dtype=torch.uint8)
        >>> subject = tio.Subject(image=tio.ScalarImage(tensor=torch.rand(1, 8, 8, 8)), label=tio.LabelMap(tensor=label))
        >>> out = SynthesiseIntensities(means=(0.9, 0.2, 0.5), stds=(0.0, 0.0, 0.0))(subject)
        >>> round(float(out["image"].data[label == 1].mean()), 3), float(out["image"].data[label == 0].max())
        (0.9, 0.0)
    """

    def __init__(self, means: Sequence[float], stds: Sequence[float], partial_volume_mm: float = 0.0, seed: int = 0,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        if len(means) != len(stds):
            raise InputError(f"need one std per mean, got means {means} and stds {stds}")
        self.means, self.stds = tuple(means), tuple(stds)
        self.partial_volume_mm, self.seed = float(partial_volume_mm), int(seed)
        self.args_names = ["means", "stds", "partial_volume_mm", "seed"]

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        image, label = image_and_label(subject)
        check_labels(label, len(self.means))
        index = torch.from_numpy(label.astype(np.int64))
        mean, std = torch.tensor((0.0, *self.means))[index], torch.tensor((0.0, *self.stds))[index]
        noise = torch.randn(label.shape, generator=torch.Generator().manual_seed(self.seed))
        sample = (mean + std * noise).numpy()
        if self.partial_volume_mm > 0:
            sample = ndimage.gaussian_filter(sample, [self.partial_volume_mm / s for s in image.spacing])
        data = torch.from_numpy(np.clip(sample, 0, None)).to(image.data.dtype)
        image.set_data(data.expand_as(image.data).clone())
        return subject


class RemapIntensities(tio.Transform):
    """Change each tissue's contrast and keep the real image's texture.

    On tissue ``l`` with mean intensity ``m_l``: ``x -> scales[l-1]·m_l·(x / m_l)^gammas[l-1]``;
    the background is unchanged. The per-tissue maps are blended with the one-hot labels smoothed
    by half a voxel, so no intensity step falls exactly on a label boundary.

    Example:
        >>> import torch, torchio as tio
        >>> label = torch.ones(1, 6, 6, 6, dtype=torch.uint8); label[0, 3:] = 3
        >>> subject = tio.Subject(image=tio.ScalarImage(tensor=label.float() / 4), label=tio.LabelMap(tensor=label))
        >>> out = RemapIntensities(scales=(3.0, 1.0, 1.0), gammas=(1.0, 1.0, 1.0))(subject)
        >>> round(float(out["image"].data[0, 0, 0, 0]), 3), round(float(out["image"].data[0, 5, 0, 0]), 3)
        (0.75, 0.75)
    """

    def __init__(self, scales: Sequence[float], gammas: Sequence[float], **kwargs) -> None:
        super().__init__(**kwargs)
        if len(scales) != len(gammas):
            raise InputError(f"need one gamma per scale, got scales {scales} and gammas {gammas}")
        self.scales, self.gammas = tuple(scales), tuple(gammas)
        self.args_names = ["scales", "gammas"]

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        image, label = image_and_label(subject)
        check_labels(label, len(self.scales))
        x = image.data.numpy().clip(0, None)
        mapped, weights = np.zeros_like(x), np.zeros(label.shape, np.float32)
        for value in range(len(self.scales) + 1):
            inside = label == value
            if not inside.any():
                continue
            weight = ndimage.gaussian_filter(inside.astype(np.float32), 0.5)
            if value == 0:
                mapped += weight * x
            else:
                mean = max(float(x[:, inside].mean()), 1e-6)
                mapped += weight * (self.scales[value - 1] * mean * (x / mean) ** self.gammas[value - 1])
            weights += weight
        image.set_data(torch.from_numpy(mapped / np.maximum(weights, 1e-6)).to(image.data.dtype))
        return subject


class RandomTissueIntensities(RandomTransform):
    """SynthSeg's generative model with probability ``p_synth``, otherwise a per-tissue remap.

    Synthesis draws each tissue's mean from ``mean_range`` (any contrast: CSF may be brighter
    than WM), its std from ``std_range`` and the partial-volume blur from ``partial_volume_mm``;
    the remap draws each tissue's scale log-uniformly in ``scale_range`` and its gamma as
    ``exp(U(-log_gamma, log_gamma))``. Tissues are labels 1, 2, 3 (CSF, GM, WM).
    """

    def __init__(self, p_synth: float = 0.5, mean_range: Sequence[float] = (0.0, 1.0),
                 std_range: Sequence[float] = (0.0, 0.1), partial_volume_mm: Sequence[float] = (0.0, 2.0),
                 scale_range: Sequence[float] = (0.67, 1.5), log_gamma: float = 0.3, **kwargs) -> None:
        super().__init__(**kwargs)
        self.p_synth, self.mean_range, self.std_range = p_synth, tuple(mean_range), tuple(std_range)
        self.partial_volume_mm, self.scale_range, self.log_gamma = tuple(partial_volume_mm), tuple(scale_range), log_gamma

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        n = len(TISSUES)
        if torch.rand(1).item() < self.p_synth:
            means = tuple(self.sample_uniform(*self.mean_range) for _ in range(n))
            stds = tuple(self.sample_uniform(*self.std_range) for _ in range(n))
            blur = self.sample_uniform(*self.partial_volume_mm)
            return SynthesiseIntensities(means, stds, blur, self._get_random_seed(), copy=False)(subject)
        low, high = (math.log(v) for v in self.scale_range)
        scales = tuple(math.exp(self.sample_uniform(low, high)) for _ in range(n))
        gammas = tuple(math.exp(self.sample_uniform(-self.log_gamma, self.log_gamma)) for _ in range(n))
        return RemapIntensities(scales, gammas, copy=False)(subject)


class SyntheticHead(tio.Transform):
    """Wrap the brain mask (label > 0) in a CSF layer, a skull and a scalp, and add blobs below it.

    The shells follow the distance to the brain mask, with smooth irregular outer surfaces
    (each thickness is modulated by a smooth random factor); the CSF layer takes the mean CSF
    intensity of the image, skull and scalp ``intensity`` times the brain's 99th percentile.
    ``n_blobs`` ellipsoids (eyes, neck, muscle) are centred at random outside the CSF layer in
    the lower half of the brain's extent along the third axis (superior in RAS). Everything
    added is labelled background; the brain and the grid are unchanged, and a shell that runs
    past the field of view is cut.

    Args:
        thickness_mm: mean thickness of the CSF layer, skull and scalp (mm).
        intensity: skull and scalp intensities, relative to the brain's 99th percentile.
        n_blobs: number of non-brain blobs.
        seed: seed of the surfaces, textures and blobs.

    Example:
        >>> import torch, torchio as tio
        >>> label = torch.zeros(1, 24, 24, 24, dtype=torch.uint8); label[0, 8:16, 8:16, 8:16] = 3
        >>> subject = tio.Subject(image=tio.ScalarImage(tensor=label.float() / 3), label=tio.LabelMap(tensor=label))
        >>> out = SyntheticHead(thickness_mm=(1.0, 2.0, 3.0), intensity=(0.1, 1.0), n_blobs=1, seed=0)(subject)
        >>> bool(out["image"].data[label == 0].max() > 0), bool((out["label"].data == label).all())
        (True, True)
    """

    def __init__(self, thickness_mm: Sequence[float] = (2.0, 5.0, 5.0), intensity: Sequence[float] = (0.1, 1.0),
                 n_blobs: int = 2, seed: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        if len(thickness_mm) != 3 or len(intensity) != 2:
            raise InputError(f"need 3 thicknesses (CSF, skull, scalp) and 2 intensities (skull, scalp), "
                             f"got {thickness_mm} and {intensity}")
        self.thickness_mm, self.intensity = tuple(thickness_mm), tuple(intensity)
        self.n_blobs, self.seed = int(n_blobs), int(seed)
        self.args_names = ["thickness_mm", "intensity", "n_blobs", "seed"]

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        image, label = image_and_label(subject)
        brain = label > 0
        if not brain.any():
            return subject
        x = image.data[0].numpy()
        generator = torch.Generator().manual_seed(self.seed)
        distance = ndimage.distance_transform_edt(~brain, sampling=image.spacing)
        reference = float(np.percentile(x[brain], 99))
        csf_value = float(x[label == CSF].mean()) if (label == CSF).any() else reference * self.intensity[0]
        edges = np.cumsum([t * np.exp(0.4 * smooth_noise(x.shape, 8, generator)) for t in self.thickness_mm], axis=0)
        layer = (distance[None] > edges).sum(0)  # 0 CSF layer, 1 skull, 2 scalp, 3 outside the head
        head = np.array([csf_value, *(v * reference for v in self.intensity), 0.0], np.float32)[layer]
        painted = ~brain & (layer < 3)
        beyond_csf = distance > edges[0]
        voxels = np.argwhere(beyond_csf & (np.arange(x.shape[2]) < np.argwhere(brain)[:, 2].mean()))
        index = np.indices(x.shape, sparse=True)
        for _ in range(self.n_blobs if len(voxels) else 0):
            centre = voxels[int(torch.randint(len(voxels), (1,), generator=generator))]
            radii = np.interp(torch.rand(3, generator=generator).numpy(), (0, 1), BLOB_RADIUS_MM)
            value = reference * np.interp(float(torch.rand(1, generator=generator)), (0, 1), BLOB_INTENSITY)
            blob = beyond_csf & (sum(((i - c) * s / r) ** 2 for i, c, s, r in
                                     zip(index, centre, image.spacing, radii, strict=True)) <= 1)
            head[blob], painted = value, painted | blob
        texture = np.exp(0.1 * smooth_noise(x.shape, 16, generator))
        out = np.where(painted, head * texture, x)
        image.set_data(torch.from_numpy(out.astype(np.float32))[None].to(image.data.dtype))
        return subject


class RandomSyntheticHead(RandomTransform):
    """Random :class:`SyntheticHead`: thicknesses uniform in ``HEAD_CSF_MM``, ``SKULL_MM``,
    ``SCALP_MM``, intensities in ``SKULL_INTENSITY``, ``SCALP_INTENSITY``, ``0..MAX_BLOBS`` blobs."""

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        thickness = tuple(self.sample_uniform(*r) for r in (HEAD_CSF_MM, SKULL_MM, SCALP_MM))
        intensity = tuple(self.sample_uniform(*r) for r in (SKULL_INTENSITY, SCALP_INTENSITY))
        n_blobs = int(torch.randint(MAX_BLOBS + 1, (1,)))
        return SyntheticHead(thickness, intensity, n_blobs, self._get_random_seed(), copy=False)(subject)
