"""Affine registration (12 degrees of freedom) of a scan to a template, on the client, with SimpleITK.

Hospitals have scans in scanner space: any orientation, position and field of view, often with
skull and neck. Before such a scan can be mixed with the key's references it must lie where
they lie. :func:`register_affine` finds the world-to-world affine that carries the scan onto a
template (for mixpriv, the mean of the key's references, in the key's space), in two stages: a
rigid one (6 dof) started from the images' centres of mass, then a full affine one (12 dof)
started from it; each over three resolutions, maximising Mattes mutual information (so the
scan's contrast need not match the template's), computed only inside a mask of the template's
brain so that skull, scalp and neck in the scan do not pull the brain off.

Why SimpleITK: it is the registration toolkit of ITK (the reference implementation behind ANTs
and elastix), it ships in a wheel for every platform, and TorchIO, which mixpriv already
depends on, depends on it: nothing new to install. ANTsPy would add a 100 MB wheel for the
same affine stage.

The result is a 4x4 matrix in RAS world coordinates (mm): a point ``p`` of the scan lies at
``transform @ p`` in the template's world. Giving the scan the affine
``transform @ scan.affine`` (:func:`registered_affine`) places it on the template without
resampling it, so results computed in the template's space go back onto the scan's own voxels
by resampling through that affine, and are written with the scan's original affine.

Example:
    >>> import numpy as np, torch, torchio as tio
    >>> from scipy import ndimage
    >>> texture = ndimage.gaussian_filter(np.random.default_rng(0).random((40, 40, 40)), 2).astype(np.float32)
    >>> template = tio.ScalarImage(tensor=torch.from_numpy(texture)[None], affine=np.diag([2.0, 2, 2, 1]))
    >>> shift = np.eye(4); shift[:3, 3] = (6.0, -4.0, 2.0)  # the scan lies 6 mm right, 4 mm back, 2 mm up
    >>> scan = tio.ScalarImage(tensor=template.data, affine=shift @ template.affine)
    >>> transform = register_affine(scan, template)
    >>> bool(np.allclose(transform[:3, 3], (-6.0, 4.0, -2.0), atol=0.25))  # within an eighth of a voxel
    True
    >>> bool(np.allclose(transform[:3, :3], np.eye(3), atol=0.01))
    True
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk
import torch
import torchio as tio

from mixpriv.validation import InputError

log = logging.getLogger(__name__)

#: ITK's physical space is LPS, NIfTI's (and TorchIO's) RAS: the two differ by this flip.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
STAGES = ("rigid", "affine")


def _to_sitk(image: tio.ScalarImage) -> sitk.Image:
    """A float32 SimpleITK image of a one-channel TorchIO image (its geometry kept)."""
    return sitk.Cast(tio.ScalarImage(tensor=image.data[:1].float(), affine=image.affine).as_sitk(), sitk.sitkFloat32)


def _matrix(transform: sitk.Transform) -> np.ndarray:
    """The 4x4 LPS matrix of a SimpleITK matrix-offset transform (``y = A (x - c) + t + c``)."""
    linear = np.asarray(transform.GetMatrix(), dtype=np.float64).reshape(3, 3)
    centre = np.asarray(transform.GetCenter(), dtype=np.float64)
    matrix = np.eye(4)
    matrix[:3, :3] = linear
    matrix[:3, 3] = np.asarray(transform.GetTranslation()) + centre - linear @ centre
    return matrix


def _run_stage(fixed: sitk.Image, moving: sitk.Image, initial: sitk.Transform, mask: sitk.Image | None,
               iterations: int, seed: int) -> sitk.Transform:
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(0.25, seed)
    if mask is not None:
        method.SetMetricFixedMask(mask)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-3, numberOfIterations=iterations,
                                                   relaxationFactor=0.6, gradientMagnitudeTolerance=1e-6)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([4, 2, 1])
    method.SetSmoothingSigmasPerLevel([2.0, 1.0, 0.0])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetInitialTransform(initial, inPlace=True)
    method.Execute(fixed, moving)
    log.debug("registration stage %s: metric %.4f after %d iterations (%s)", initial.GetName(),
              method.GetMetricValue(), method.GetOptimizerIteration(), method.GetOptimizerStopConditionDescription())
    return initial


def register_affine(
    moving: tio.ScalarImage,
    fixed: tio.ScalarImage,
    fixed_mask: torch.Tensor | None = None,
    stages: Sequence[str] = STAGES,
    iterations: int = 200,
    seed: int = 0,
) -> np.ndarray:
    """The RAS world affine (4x4) that carries ``moving`` onto ``fixed``: ``p_fixed = T @ p_moving``.

    Args:
        moving: the scan (one channel, any orientation, spacing and field of view).
        fixed: the template.
        fixed_mask: where on ``fixed``'s grid the similarity is measured (D, H, W), e.g. the
            template's brain, dilated; ``None``: everywhere.
        stages: ``("rigid", "affine")`` (default: 6, then 12 degrees of freedom) or ``("rigid",)``.
        iterations: most optimiser steps per resolution level.
        seed: seed of the metric's random sampling (for a seed and a number of ITK threads the
            result is the same; across thread counts it can differ by about a tenth of a mm).

    Raises:
        InputError: an unknown stage, or a registration that failed (e.g. images with no overlap).
    """
    unknown = set(stages) - set(STAGES)
    if not stages or unknown or stages[0] != "rigid":
        raise InputError(f"registration stages must start with 'rigid' and be among {STAGES}, got {tuple(stages)}")
    fixed_image, moving_image = _to_sitk(fixed), _to_sitk(moving)
    mask = None
    if fixed_mask is not None:
        mask = tio.LabelMap(tensor=fixed_mask[None].to(torch.uint8), affine=fixed.affine).as_sitk()
    rigid = sitk.CenteredTransformInitializer(fixed_image, moving_image, sitk.Euler3DTransform(),
                                              sitk.CenteredTransformInitializerFilter.MOMENTS)
    try:
        transform = _run_stage(fixed_image, moving_image, rigid, mask, iterations, seed)
        if "affine" in stages:
            affine = sitk.AffineTransform(3)
            affine.SetCenter(transform.GetCenter())
            affine.SetMatrix(transform.GetMatrix())
            affine.SetTranslation(transform.GetTranslation())
            transform = _run_stage(fixed_image, moving_image, affine, mask, iterations, seed)
    except RuntimeError as error:  # ITK's exceptions, e.g. "All samples map outside moving image buffer"
        raise InputError(f"affine registration to the template failed: {error.args[0].splitlines()[-1]}") from error
    fixed_to_moving = _LPS_TO_RAS @ _matrix(transform) @ _LPS_TO_RAS
    return np.linalg.inv(fixed_to_moving)


def registered_affine(image: tio.ScalarImage, transform: np.ndarray) -> np.ndarray:
    """The voxel-to-world affine that places ``image``'s voxels where ``transform`` carries them."""
    return np.asarray(transform, dtype=np.float64) @ image.affine
