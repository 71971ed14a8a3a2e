"""Input checks that fail early with a message naming the problem.

Every public entry point that takes user data runs these checks, so that a wrong file
gives one clear error instead of a cryptic failure deep inside a network.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection, Mapping, Sequence

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor


class InputError(ValueError):
    """Raised when user-provided data is malformed (shape, values, metadata)."""


def check_spatial_dims(array: ArrayLike, name: str, channels_first: bool = True) -> None:
    """Check that ``array`` is a 3D volume, (C, D, H, W) if ``channels_first`` else (D, H, W).

    Example:
        >>> check_spatial_dims(np.zeros((1, 4, 4, 4)), "image")
        >>> check_spatial_dims(np.zeros((4, 4)), "image")
        Traceback (most recent call last):
        ...
        mixpriv.validation.InputError: image must have 4 dimensions (C, D, H, W), got 2 with shape (4, 4)
    """
    expected = 4 if channels_first else 3
    layout = "(C, D, H, W)" if channels_first else "(D, H, W)"
    if array.ndim != expected:
        raise InputError(
            f"{name} must have {expected} dimensions {layout}, got {array.ndim} with shape {tuple(array.shape)}"
        )


def check_finite(array: ArrayLike, name: str) -> None:
    """Check that ``array`` holds no NaN or infinite value."""
    finite = torch.isfinite(array) if isinstance(array, torch.Tensor) else np.isfinite(array)
    if not bool(finite.all()):
        n_bad = int((~finite).sum())
        raise InputError(f"{name} contains {n_bad} NaN or infinite voxel(s)")


def check_not_blank(array: ArrayLike, name: str) -> None:
    """Check that ``array`` is not blank: not every voxel has the same value (all zero, or constant).

    A blank scan holds no image to segment; intensity normalisation would turn it into an
    arbitrary constant that the models segment as one tissue.

    Example:
        >>> check_not_blank(np.zeros((1, 4, 4, 4)), "scan blank.nii.gz")
        Traceback (most recent call last):
        ...
        mixpriv.validation.InputError: scan blank.nii.gz is blank: all its 64 voxels are 0; a T1 image is expected
    """
    values = torch.as_tensor(array)
    if values.numel() and bool(values.min() == values.max()):
        raise InputError(f"{name} is blank: all its {values.numel()} voxels are {float(values.min()):g}; "
                         "a T1 image is expected")


def check_same_shape(a: ArrayLike, b: ArrayLike, name_a: str, name_b: str, spatial_only: bool = True) -> None:
    """Check that two volumes share their (spatial) shape."""
    shape_a = tuple(a.shape[-3:] if spatial_only else a.shape)
    shape_b = tuple(b.shape[-3:] if spatial_only else b.shape)
    if shape_a != shape_b:
        raise InputError(f"{name_a} shape {shape_a} does not match {name_b} shape {shape_b}")


def check_same_affine(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str, atol: float = 1e-3) -> None:
    """Check that two 4x4 affines agree (within ``atol`` mm)."""
    if not np.allclose(np.asarray(a), np.asarray(b), atol=atol):
        raise InputError(
            f"{name_a} affine differs from {name_b} affine:\n{np.round(a, 4)}\nvs\n{np.round(b, 4)}"
        )


def check_label_values(label: ArrayLike, allowed: Collection[int], name: str) -> None:
    """Check that every value of the integer label map is in the label set."""
    values = torch.unique(label).tolist() if isinstance(label, torch.Tensor) else np.unique(label).tolist()
    unknown = sorted(set(int(v) for v in values) - set(int(v) for v in allowed)) if values else []
    non_integer = [v for v in values if float(v) != int(v)]
    if non_integer:
        raise InputError(f"{name} has non-integer values {non_integer[:5]}; labels must be integers")
    if unknown:
        raise InputError(f"{name} has values {unknown} that are not in the label set {sorted(allowed)}")


def check_label_names(label_names: object, name: str) -> dict[str, int]:
    """Check a label set: a mapping of names to non-negative integers, as ``dataset.json["labels"]``.

    Example:
        >>> check_label_names({"background": 0, "WM": 3}, "labels")
        {'background': 0, 'WM': 3}
        >>> check_label_names(["background", "WM"], "key labels")
        Traceback (most recent call last):
        ...
        mixpriv.validation.InputError: key labels must map label names to integers (e.g. {"background": 0, "WM": 3}), got a list
    """
    if not isinstance(label_names, Mapping) or not label_names:
        kind = "an empty mapping" if isinstance(label_names, Mapping) else f"a {type(label_names).__name__}"
        raise InputError(f'{name} must map label names to integers (e.g. {{"background": 0, "WM": 3}}), got {kind}')
    for key, value in label_names.items():
        if (not isinstance(key, str) or isinstance(value, bool) or not isinstance(value, numbers.Integral)
                or value < 0):
            raise InputError(f"{name} must map label names to non-negative integers, got {key!r}: {value!r}")
    return {key: int(value) for key, value in label_names.items()}


def check_lambda_range(lambda_range: Sequence[float]) -> tuple[float, float]:
    """Check a (low, high) range for the mixing weight: 0 < low <= high <= 1.

    Example:
        >>> check_lambda_range((0.65, 0.95))
        (0.65, 0.95)
        >>> check_lambda_range((0.0, 0.5))
        Traceback (most recent call last):
        ...
        mixpriv.validation.InputError: lambda range must satisfy 0 < low <= high <= 1, got (0.0, 0.5)
    """
    if len(lambda_range) != 2:
        raise InputError(f"lambda range must be (low, high), got {tuple(lambda_range)}")
    low, high = float(lambda_range[0]), float(lambda_range[1])
    if not (0.0 < low <= high <= 1.0):
        raise InputError(f"lambda range must satisfy 0 < low <= high <= 1, got {(low, high)}")
    return low, high


def check_lambda(value: float | torch.Tensor, name: str = "lambda") -> None:
    """Check that a mixing weight (or each weight of a tensor) lies in (0, 1]."""
    values = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    if not bool(((values > 0) & (values <= 1)).all()):
        raise InputError(f"{name} must lie in (0, 1], got {values.flatten()[:8].tolist()}")


def check_references_per_mix(
    references_per_mix: int, dirichlet_alpha: float, bank_size: int | None = None
) -> tuple[int, float]:
    """Check the K-way mixing settings: R references per mixture, Dirichlet concentration alpha.

    R is an integer of at least 1 and alpha a finite number above 0. Given the bank's size N,
    R distinct references other than the subject's own scan must exist: R <= N - 1 (a bank of
    one reference still serves R = 1, as before K-way mixing).

    Example:
        >>> check_references_per_mix(3, 1.0, bank_size=10)
        (3, 1.0)
        >>> check_references_per_mix(4, 1.0, bank_size=4)
        Traceback (most recent call last):
        ...
        mixpriv.validation.InputError: references_per_mix must be between 1 and 3 for a bank of 4 references (distinct references, never the subject's own scan), got 4
    """
    if isinstance(references_per_mix, bool) or not isinstance(references_per_mix, numbers.Integral):
        raise InputError(f"references_per_mix must be an integer, got {references_per_mix!r}")
    references_per_mix = int(references_per_mix)
    if references_per_mix < 1:
        raise InputError(f"references_per_mix must be at least 1, got {references_per_mix}")
    if bank_size is not None and references_per_mix > max(1, bank_size - 1):
        raise InputError(f"references_per_mix must be between 1 and {max(1, bank_size - 1)} for a bank of "
                         f"{bank_size} references (distinct references, never the subject's own scan), "
                         f"got {references_per_mix}")
    if (isinstance(dirichlet_alpha, bool) or not isinstance(dirichlet_alpha, numbers.Real)
            or not (math.isfinite(dirichlet_alpha) and dirichlet_alpha > 0)):
        raise InputError(f"dirichlet_alpha must be a finite number above 0, got {dirichlet_alpha!r}")
    return references_per_mix, float(dirichlet_alpha)
