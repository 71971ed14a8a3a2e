"""Domain randomisation of training subjects, in the spirit of SynthSeg (Billot et al., MedIA 2023).

Every cohort scan has one contrast and one (template) anatomy, smoothly deformed; a model
trained on it alone loses Dice on real scans. :class:`DomainRandomisation` is one settings
value (a recipe's ``randomisation:`` block, a model card's record) whose :meth:`~DomainRandomisation.build`
returns the TorchIO transform, applied to a training subject before mixing and to the target
only (references stay clean):

1. anatomy: rotation, scaling and a coarse + fine (cortical-scale) elastic warp of image and
   label together (:class:`~mixpriv.data.deformation.RandomWarp`); CSF grown into GM/WM in
   random regions and around the ventricles (:class:`~mixpriv.data.deformation.RandomAtrophy`);
2. intensities: with probability ``p_synth`` the image is replaced by a Gaussian-mixture
   sample of the labels with random per-tissue means and stds (any contrast), otherwise each
   tissue's contrast of the real image is remapped (:class:`~mixpriv.data.synthesis.RandomTissueIntensities`);
3. optional whole head: CSF layer, skull, scalp and blobs around the brain, labelled
   background (:class:`~mixpriv.data.synthesis.RandomSyntheticHead`, ``p_synthetic_head``);
4. acquisition (TorchIO): gamma, bias field, thick slices on a random axis, blur, motion,
   ghosting, Rician noise (:class:`RandomRicianNoise`); then the project's intensity
   normalisation again (:func:`mixpriv.data.preprocessing.intensity_normalisation`: 0.5-99.5
   percentile min-max to [0, 1]).

Label convention: 0 background, 1 CSF, 2 GM, 3 WM, where CSF is everything inside the brain
mask that is neither GM nor WM (ventricles and sulcal CSF). Results reproduce under
``torch.manual_seed``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from numbers import Real
from pathlib import Path

import torch
import torchio as tio
from torchio.transforms.augmentation.random_transform import RandomTransform

from mixpriv.constants import IMAGE, LABEL
from mixpriv.data.preprocessing import intensity_normalisation, preprocessing
from mixpriv.data.deformation import RandomAtrophy, RandomWarp
from mixpriv.data.synthesis import RandomSyntheticHead, RandomTissueIntensities
from mixpriv.validation import InputError

__all__ = ["DomainRandomisation", "RandomRicianNoise", "RicianNoise", "save_preview"]

logger = logging.getLogger(__name__)


class RicianNoise(tio.IntensityTransform):
    """Magnitude-image noise: ``sqrt((x + std·n1)^2 + (std·n2)^2)``, with n1, n2 ~ N(0, 1).

    The background gets Rayleigh noise, as in a real magnitude MR image.

    Example:
        >>> import torch, torchio as tio
        >>> out = RicianNoise(std=0.1, seed=0)(tio.ScalarImage(tensor=torch.zeros(1, 8, 8, 8)))
        >>> bool(out.data.min() >= 0), 0.05 < float(out.data.mean()) < 0.2
        (True, True)
    """

    def __init__(self, std: float, seed: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.std, self.seed = float(std), int(seed)
        self.args_names = ["std", "seed"]

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        generator = torch.Generator().manual_seed(self.seed)
        for image in self.get_images(subject):
            noise = self.std * torch.randn((2, *image.data.shape), generator=generator)
            image.set_data(torch.sqrt((image.data.float() + noise[0]) ** 2 + noise[1] ** 2).to(image.data.dtype))
        return subject


class RandomRicianNoise(RandomTransform):
    """Random :class:`RicianNoise` with std uniform in ``std``."""

    def __init__(self, std: Sequence[float] = (0.0, 0.05), **kwargs) -> None:
        super().__init__(**kwargs)
        self.std_range = tuple(std)

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        noise = RicianNoise(self.sample_uniform(*self.std_range), self._get_random_seed(),
                            copy=False, include=self.include, exclude=self.exclude)
        return noise(subject)


# Inclusive bounds of every number of a field (fields p_* are probabilities in [0, 1]); the
# fields of _PAIRS are (low, high) pairs, those of _INTEGERS whole numbers.
_BOUNDS: dict[str, tuple[float, float]] = {
    "rotation_degrees": (0, 180), "scaling": (0, 0.5), "displacement_mm": (0, 50), "control_points": (2, 64),
    "cortical_atrophy_voxels": (0, 8), "ventricle_growth_voxels": (0, 8), "atrophy_fraction": (0, 1),
    "synth_mean_range": (0, 10), "synth_std_range": (0, 10), "partial_volume_mm": (0, 10),
    "tissue_scale_range": (0.01, 100), "tissue_log_gamma": (0, 3), "log_gamma": (0, 3),
    "bias_coefficients": (0, 2), "slice_thickness": (1, 10), "blur_mm": (0, 10), "noise_std": (0, 1),
}
_PAIRS = ("synth_mean_range", "synth_std_range", "partial_volume_mm", "tissue_scale_range", "slice_thickness",
          "blur_mm", "noise_std")
_INTEGERS = ("control_points", "cortical_atrophy_voxels", "ventricle_growth_voxels")


@dataclass(frozen=True)
class DomainRandomisation:
    """Settings of the domain randomisation; :meth:`build` returns the TorchIO transform.

    Labels: 0 background, 1 CSF, 2 GM, 3 WM; CSF is everything inside the brain mask that is
    neither GM nor WM (ventricles and sulcal CSF). Fields ``p_*`` are probabilities of a step.

    Attributes:
        p_warp: probability of the spatial warp.
        rotation_degrees: angles uniform in ± this, about each axis.
        scaling: per-axis scales uniform in 1 ± this.
        displacement_mm: peak elastic displacement of each scale (mm), each drawn in [0, peak].
        control_points: control nodes per axis of each scale (coarse, then fine).
        p_atrophy: probability of growing CSF.
        cortical_atrophy_voxels: CSF grows by 0..this voxels in random regions.
        ventricle_growth_voxels: ventricles (CSF deeper than 16 mm) grow by 0..this voxels.
        atrophy_fraction: the regions cover a fraction in [0, this] of the brain.
        p_synth: probability of replacing the image by a Gaussian-mixture sample of the labels.
        synth_mean_range: range of each tissue's mean (background 0).
        synth_std_range: range of each tissue's std.
        partial_volume_mm: range of the synthetic image's Gaussian blur std (mm).
        tissue_scale_range: otherwise, range (log-uniform) of each tissue's mean scale.
        tissue_log_gamma: and each tissue's gamma is exp(U(-this, this)).
        p_synthetic_head: probability of adding a CSF layer, skull, scalp and blobs (label 0).
        p_gamma, log_gamma: global gamma, ``tio.RandomGamma(log_gamma)``.
        p_bias, bias_coefficients: ``tio.RandomBiasField(bias_coefficients, order=3)``.
        p_anisotropy, slice_thickness: thick slices on a random axis, this range times the voxel
            size (``tio.RandomAnisotropy``).
        p_blur, blur_mm: ``tio.RandomBlur(blur_mm)`` (std in mm).
        p_motion: ``tio.RandomMotion()`` with TorchIO's defaults.
        p_ghosting: ``tio.RandomGhosting()`` with TorchIO's defaults.
        p_noise, noise_std: Rician noise with std in this range (image in [0, 1]).

    Example:
        >>> import torch, torchio as tio
        >>> settings = DomainRandomisation.from_dict({"p_synth": 1.0, "p_motion": 0.0})
        >>> settings.to_dict()["p_synth"], DomainRandomisation.from_dict(settings.to_dict()) == settings
        (1.0, True)
        >>> label = torch.zeros(1, 16, 16, 16, dtype=torch.uint8); label[0, 4:12, 4:12, 4:12] = 3
        >>> label[0, 6:10, 6:10, 6:10] = 1
        >>> subject = tio.Subject(image=tio.ScalarImage(tensor=label.float() / 3), label=tio.LabelMap(tensor=label))
        >>> _ = torch.manual_seed(0); out = settings.build()(subject)
        >>> 0 <= float(out["image"].data.min()) <= float(out["image"].data.max()) <= 1, out["label"].shape
        (True, (1, 16, 16, 16))
        >>> DomainRandomisation(p_synth=2.0)
        Traceback (most recent call last):
        ...
        mixpriv.validation.InputError: randomisation.p_synth must be a probability in [0, 1], got 2.0
    """

    p_warp: float = 1.0
    rotation_degrees: float = 10.0
    scaling: float = 0.1
    displacement_mm: tuple[float, ...] = (8.0, 2.5)
    control_points: tuple[int, ...] = (5, 12)
    p_atrophy: float = 0.5
    cortical_atrophy_voxels: int = 2
    ventricle_growth_voxels: int = 2
    atrophy_fraction: float = 0.5
    p_synth: float = 0.5
    synth_mean_range: tuple[float, float] = (0.0, 1.0)
    synth_std_range: tuple[float, float] = (0.0, 0.1)
    partial_volume_mm: tuple[float, float] = (0.0, 2.0)
    tissue_scale_range: tuple[float, float] = (0.67, 1.5)
    tissue_log_gamma: float = 0.3
    p_synthetic_head: float = 0.0
    p_gamma: float = 0.5
    log_gamma: float = 0.3
    p_bias: float = 0.5
    bias_coefficients: float = 0.5
    p_anisotropy: float = 0.3
    slice_thickness: tuple[float, float] = (1.0, 3.0)
    p_blur: float = 0.3
    blur_mm: tuple[float, float] = (0.0, 1.5)
    p_motion: float = 0.1
    p_ghosting: float = 0.1
    p_noise: float = 0.8
    noise_std: tuple[float, float] = (0.0, 0.05)

    def __post_init__(self) -> None:
        for field in fields(self):
            value = _checked(field.name, getattr(self, field.name), isinstance(field.default, tuple))
            object.__setattr__(self, field.name, value)
        if len(self.displacement_mm) != len(self.control_points):
            raise InputError(f"randomisation.displacement_mm {list(self.displacement_mm)} and "
                             f"randomisation.control_points {list(self.control_points)} need one value per scale")

    @classmethod
    def from_dict(cls, values: Mapping | None) -> DomainRandomisation:
        """Settings from a recipe's ``randomisation:`` block (missing keys keep their defaults)."""
        if values is not None and not isinstance(values, Mapping):
            raise InputError(f"randomisation settings must be a mapping of name -> value, got {values!r}")
        values = dict(values or {})
        unknown = sorted(set(values) - {field.name for field in fields(cls)})
        if unknown:
            raise InputError(f"unknown randomisation settings {unknown}; valid: {[f.name for f in fields(cls)]}")
        return cls(**values)

    def to_dict(self) -> dict:
        """JSON/YAML-ready values (tuples as lists)."""
        return {name: list(value) if isinstance(value, tuple) else value for name, value in asdict(self).items()}

    def build(self, copy: bool = True) -> tio.Compose:
        """The TorchIO transform of a training subject with keys ``image`` and ``label``.

        Args:
            copy: copy the subject first (False when the caller hands over a fresh one, as
                ``tio.SubjectsDataset`` does).
        """
        keys = {"include": [IMAGE], "copy": False}
        transforms = [
            RandomWarp(self.rotation_degrees, self.scaling, self.displacement_mm, self.control_points,
                       p=self.p_warp, include=[IMAGE, LABEL], copy=False),
            RandomAtrophy(self.cortical_atrophy_voxels, self.ventricle_growth_voxels, self.atrophy_fraction,
                          p=self.p_atrophy, copy=False),
            RandomTissueIntensities(self.p_synth, self.synth_mean_range, self.synth_std_range, self.partial_volume_mm,
                                    self.tissue_scale_range, self.tissue_log_gamma, copy=False),
            RandomSyntheticHead(p=self.p_synthetic_head, copy=False),
            tio.RandomGamma(self.log_gamma, p=self.p_gamma, **keys),
            tio.RandomBiasField(self.bias_coefficients, order=3, p=self.p_bias, **keys),
            tio.RandomAnisotropy(axes=(0, 1, 2), downsampling=self.slice_thickness, p=self.p_anisotropy, **keys),
            tio.RandomBlur(self.blur_mm, p=self.p_blur, **keys),
            tio.RandomMotion(p=self.p_motion, **keys),
            tio.RandomGhosting(p=self.p_ghosting, **keys),
            RandomRicianNoise(self.noise_std, p=self.p_noise, **keys),
            intensity_normalisation(),
        ]
        return tio.Compose(transforms, copy=copy)


def _checked(name: str, value, sequence: bool):
    """``value`` of field ``name`` as stored (float, int or a tuple of them), or an InputError naming the field."""
    where = f"randomisation.{name}"
    if name.startswith("p_"):
        if isinstance(value, bool) or not isinstance(value, Real) or not 0 <= value <= 1:
            raise InputError(f"{where} must be a probability in [0, 1], got {value!r}")
        return float(value)
    if sequence and (isinstance(value, str) or not isinstance(value, Sequence) or not value):
        raise InputError(f"{where} must be a non-empty list of numbers, got {value!r}")
    items = list(value) if sequence else [value]
    if any(isinstance(v, bool) or not isinstance(v, Real) for v in items):
        raise InputError(f"{where} must be {'numbers' if sequence else 'a number'}, got {value!r}")
    if name in _INTEGERS and any(float(v) != int(v) for v in items):
        raise InputError(f"{where} must be whole numbers, got {value!r}")
    low, high = _BOUNDS[name]
    if any(not low <= v <= high for v in items):
        raise InputError(f"{where} must lie in [{low:g}, {high:g}], got {value!r}")
    if name in _PAIRS and (len(items) != 2 or items[0] > items[1]):
        raise InputError(f"{where} must be a (low, high) pair with low <= high, got {value!r}")
    cast = int if name in _INTEGERS else float
    items = [cast(v) for v in items]
    return tuple(items) if sequence else items[0]


def save_preview(path: str | Path, seed: int = 0, settings: DomainRandomisation | None = None, n: int = 6,
                 subject: tio.Subject | None = None) -> Path:
    """A PNG of ``n`` randomised versions of a scan (mid-axial slice, label contours), after the original.

    Args:
        path: PNG to write.
        seed: ``torch.manual_seed`` of the draws (the global generator is restored afterwards).
        settings: the randomisation; default :class:`DomainRandomisation` ().
        n: number of randomised versions.
        subject: the scan; default the first training scan of the embedded cohort (built on first use).

    Example:
        >>> import tempfile, os
        >>> save_preview(os.path.join(tempfile.mkdtemp(), "p.png"), n=1).exists()  # doctest: +SKIP
        True
    """
    from matplotlib.figure import Figure

    from mixpriv.plotting import save_figure, show_image, take_slice

    if subject is None:
        from mixpriv.data.cohort import build_cohort
        from mixpriv.data.folder import DatasetFolder

        subject = DatasetFolder(build_cohort(progress=False)).cases("train")[0].to_subject()
    settings = settings or DomainRandomisation()
    subject = preprocessing()(subject)
    transform = settings.build()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        versions = [subject] + [transform(subject) for _ in range(n)]
    figure = Figure(figsize=(2.2 * (n + 1), 2.9), layout="constrained")
    for ax, version, title in zip(figure.subplots(1, n + 1, squeeze=False)[0], versions,
                                  ["original"] + [f"seed {seed}, #{i + 1}" for i in range(n)], strict=True):
        index = version[IMAGE].spatial_shape[2] // 2
        show_image(ax, take_slice(version[IMAGE].data[0].numpy(), 2, index))
        label = take_slice(version[LABEL].data[0].numpy(), 2, index)
        ax.contour(label, levels=[0.5, 1.5, 2.5], colors=["#ffd700", "#1f77b4", "#d62728"], linewidths=0.6)
        ax.set_title(title, fontsize=8)
    defaults = DomainRandomisation().to_dict()
    changed = {name: value for name, value in settings.to_dict().items() if value != defaults[name]}
    figure.suptitle(f"domain randomisation {changed or '(defaults)'}; contours: brain, CSF|GM, GM|WM", fontsize=8)
    return save_figure(figure, path, logger=logger)

