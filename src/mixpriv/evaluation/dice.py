"""Dice similarity coefficient with nnU-Net conventions.

For every foreground label ``v`` (``v != 0``)::

    Dice = 2·TP / (2·TP + FP + FN)

and Dice is NaN (not 0, not 1) when neither the prediction nor the target has a voxel of
that label: such a case says nothing about the class and is left out of means
(``np.nanmean``), as nnU-Net does in its ``summary.json``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np

from mixpriv.validation import ArrayLike, InputError, check_same_shape

logger = logging.getLogger(__name__)


def as_label_array(label_map: ArrayLike, name: str) -> np.ndarray:
    """Return ``label_map`` as a numpy array of integer labels (torch tensors are copied to CPU).

    Example:
        >>> as_label_array(np.array([0.0, 2.0]), "label").tolist()
        [0, 2]
    """
    if hasattr(label_map, "detach"):  # torch.Tensor, without importing torch here
        label_map = label_map.detach().cpu().numpy()
    array = np.asarray(label_map)
    if np.issubdtype(array.dtype, np.floating):
        # Label maps read with nibabel's get_fdata() are float; probabilities are not labels.
        if not np.array_equal(array, np.round(array)):
            raise InputError(
                f"{name} must be an integer label map, got non-integer values of dtype {array.dtype} "
                "(take the argmax of probability maps first)"
            )
        array = array.astype(np.int64)
    elif not (np.issubdtype(array.dtype, np.integer) or array.dtype == bool):
        raise InputError(f"{name} must be an integer label map, got dtype {array.dtype}")
    return array


def foreground_labels(labels: Mapping[str, int]) -> dict[str, int]:
    """Return the foreground part of a label set (value != 0), sorted by label value.

    Args:
        labels: class name -> label value, as in ``dataset.json["labels"]``.

    Returns:
        The entries whose value is not 0, in increasing label-value order.

    Example:
        >>> foreground_labels({"background": 0, "WM": 3, "CSF": 1, "GM": 2})
        {'CSF': 1, 'GM': 2, 'WM': 3}
    """
    return {name: int(value) for name, value in sorted(labels.items(), key=lambda kv: kv[1]) if int(value) != 0}


def dice_per_class(prediction: ArrayLike, target: ArrayLike, labels: Mapping[str, int]) -> dict[str, float]:
    """Dice of each foreground class between two integer label maps (nnU-Net convention).

    Args:
        prediction: predicted label map, numpy array or torch tensor, any number of dimensions.
        target: reference label map of the same shape.
        labels: class name -> label value; the background (value 0) is skipped.

    Returns:
        Class name -> Dice in [0, 1], in label-value order; NaN where the class is absent
        from both ``prediction`` and ``target``.

    Raises:
        InputError: (a ``ValueError``) if the shapes differ or a map holds non-integer values.

    Example:
        >>> import numpy as np
        >>> target = np.array([0, 1, 1, 2, 2, 2])
        >>> prediction = np.array([0, 1, 2, 2, 2, 0])
        >>> dice_per_class(prediction, target, {"background": 0, "a": 1, "b": 2, "c": 3})
        {'a': 0.6666666666666666, 'b': 0.6666666666666666, 'c': nan}
    """
    check_same_shape(prediction, target, "prediction", "target", spatial_only=False)
    prediction_np = as_label_array(prediction, "prediction")
    target_np = as_label_array(target, "target")
    scores: dict[str, float] = {}
    for name, value in foreground_labels(labels).items():
        predicted = prediction_np == value
        expected = target_np == value
        true_positives = int(np.count_nonzero(predicted & expected))
        false_positives = int(np.count_nonzero(predicted)) - true_positives
        false_negatives = int(np.count_nonzero(expected)) - true_positives
        denominator = 2 * true_positives + false_positives + false_negatives
        scores[name] = float("nan") if denominator == 0 else 2.0 * true_positives / denominator
    return scores


def mean_foreground(dice: Mapping[str, float]) -> float:
    """Mean Dice over classes, ignoring NaN (classes absent from both maps).

    Args:
        dice: class name -> Dice, e.g. the output of :func:`dice_per_class`.

    Returns:
        The NaN-ignoring mean, or NaN when every value is NaN (or there is none),
        without numpy's "mean of empty slice" warning.

    Example:
        >>> mean_foreground({"GM": 0.75, "WM": 0.25, "CSF": float("nan")})
        0.5
    """
    values = np.asarray([float(v) for v in dice.values()], dtype=np.float64)
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")
