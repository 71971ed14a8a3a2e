"""The one intensity/geometry preprocessing shared by training, inference and the client.

Canonical (RAS+) orientation, optional resampling to the model's spacing, and intensity
rescaling to [0, 1] between the 0.5th and 99.5th percentiles (so a mixture of two
normalised volumes also lies in [0, 1]).
"""

from __future__ import annotations

from collections.abc import Sequence

import torchio as tio

from mixpriv.constants import IMAGE

INTENSITY_NORMALISATION = "percentile min-max to [0, 1] (0.5th-99.5th percentile, per volume)"


def preprocessing(spacing: float | Sequence[float] | None = None) -> tio.Compose:
    """Return the preprocessing transform; ``spacing`` (mm) resamples when given.

    Example:
        >>> import torch, torchio as tio
        >>> subject = tio.Subject(image=tio.ScalarImage(tensor=torch.rand(1, 8, 8, 8) * 500))
        >>> out = preprocessing()(subject)
        >>> float(out["image"].data.min()) >= 0 and float(out["image"].data.max()) <= 1
        True
    """
    transforms: list[tio.Transform] = [tio.ToCanonical()]
    if spacing is not None:
        transforms.append(tio.Resample(spacing))
    transforms.append(intensity_normalisation())
    return tio.Compose(transforms)


def intensity_normalisation() -> tio.RescaleIntensity:
    """The intensity step of :func:`preprocessing` alone (:data:`INTENSITY_NORMALISATION`), for the ``image``."""
    return tio.RescaleIntensity(out_min_max=(0.0, 1.0), percentiles=(0.5, 99.5), include=[IMAGE])
