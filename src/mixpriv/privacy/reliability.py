"""Test-retest reliability of private predictions (paper Table 1, third section).

Each test case is segmented twice with different references; the agreement of the two Dice scores
over the cases is the intraclass correlation ICC(A,1) of McGraw & Wong (1996): two-way random effects,
absolute agreement, single measurement (Shrout & Fleiss's ICC(2,1)). With ``n`` cases, ``k = 2``
predictions and the mean squares of the two-way ANOVA without replication (rows = cases ``MSR``,
columns = predictions ``MSC``, residual ``MSE``)::

    ICC(A,1) = (MSR - MSE) / (MSR + (k - 1) MSE + k (MSC - MSE) / n)

It is computed by pingouin 0.7.0 (``intraclass_corr``, row ``"ICC(A,1)"``, F-based 95% interval in
column ``"CI95"``), with the interval left unrounded (pingouin rounds ``CI95`` to 2 decimals by default).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pingouin

from mixpriv.validation import InputError

log = logging.getLogger(__name__)

_ICC_ROW = "ICC(A,1)"
_CI_COLUMN = "CI95"
_CI_ROUNDING_OPTION = f"round.column.{_CI_COLUMN}"
_MIN_CASES = 3


@dataclass(frozen=True)
class ICCResult:
    """ICC(A,1) with its 95% confidence interval.

    Attributes:
        icc: the intraclass correlation.
        ci_low: lower bound of the 95% confidence interval.
        ci_high: upper bound of the 95% confidence interval.
        n: number of cases used.
        n_dropped: cases left out because one of their two values was NaN.
    """

    icc: float
    ci_low: float
    ci_high: float
    n: int
    n_dropped: int = 0


def icc_a1(first: Sequence[float], second: Sequence[float], name: str = "ratings") -> ICCResult:
    """ICC(A,1) of two ratings per case, e.g. the Dice of two private predictions of each test case.

    Cases where either value is NaN (e.g. a Dice left undefined by an empty class) are dropped, and
    their number is logged and kept in the result. The ICC is undefined, and returned as NaN with a
    logged warning, when every rating is the same.

    Args:
        first: the first rating of each case.
        second: the second rating of each case, in the same order.
        name: what is rated, named in error and log messages.

    Returns:
        The ICC, its 95% interval and the number of cases used and dropped.

    Raises:
        InputError: for ratings of different lengths or not one-dimensional, an infinite value, or fewer
            than 3 cases with two values.

    Example:
        >>> result = icc_a1([0.80, 0.85, 0.90, 0.70, 0.75], [0.82, 0.84, 0.91, 0.72, 0.73])
        >>> round(result.icc, 3), result.n
        (0.978, 5)
        >>> result.ci_low < result.icc < result.ci_high
        True
    """
    a, b, n_dropped = _complete_cases(first, second, name)
    n = len(a)
    ratings = np.concatenate([a, b])
    if np.ptp(ratings) == 0:
        log.warning("%s: every rating equals %g; the ICC is undefined (NaN)", name, ratings[0])
        return ICCResult(icc=math.nan, ci_low=math.nan, ci_high=math.nan, n=n, n_dropped=n_dropped)
    table = pd.DataFrame({"case": np.tile(np.arange(n), 2), "rater": np.repeat([0, 1], n),
                          "rating": ratings})
    with _unrounded_confidence_intervals():
        stats = pingouin.intraclass_corr(data=table, targets="case", raters="rater", ratings="rating")
    row = stats.set_index("Type").loc[_ICC_ROW]
    low, high = row[_CI_COLUMN]
    return ICCResult(icc=float(row["ICC"]), ci_low=float(low), ci_high=float(high), n=n, n_dropped=n_dropped)


def test_retest(first: Mapping[str, Sequence[float]], second: Mapping[str, Sequence[float]]) -> dict[str, ICCResult]:
    """ICC(A,1) per class of the scores of two predictions per case.

    Args:
        first: class name -> score of each case with the first reference.
        second: class name -> score of each case with the second reference (same classes, same case order).

    Returns:
        class name -> ICC result, in the order of ``first``.

    Raises:
        InputError: if the classes differ, or as :func:`icc_a1` (naming the class).

    Example:
        >>> first = {"GM": [0.80, 0.85, 0.90, 0.70], "WM": [0.90, 0.92, 0.88, 0.95]}
        >>> second = {"GM": [0.81, 0.86, 0.88, 0.72], "WM": [0.91, 0.90, 0.89, 0.94]}
        >>> {name: round(result.icc, 2) for name, result in test_retest(first, second).items()}
        {'GM': 0.98, 'WM': 0.87}
    """
    if set(first) != set(second):
        raise InputError(f"the two predictions score different classes: {sorted(set(first) - set(second))} only in "
                         f"the first, {sorted(set(second) - set(first))} only in the second")
    return {name: icc_a1(first[name], second[name], name=name) for name in first}


test_retest.__test__ = False  # a library function named test_*: not a pytest test


def _complete_cases(first: Sequence[float], second: Sequence[float], name: str) -> tuple[np.ndarray, np.ndarray, int]:
    """The two ratings of the cases without a NaN, and the number of cases dropped."""
    a, b = _as_ratings(first, f"{name} (first)"), _as_ratings(second, f"{name} (second)")
    if len(a) != len(b):
        raise InputError(f"{name}: the first ratings have {len(a)} cases but the second have {len(b)}")
    keep = ~(np.isnan(a) | np.isnan(b))
    n, n_dropped = int(keep.sum()), int((~keep).sum())
    if n_dropped:
        log.warning("%s: %d of %d cases dropped from the ICC for a NaN rating", name, n_dropped, len(a))
    if n < _MIN_CASES:
        raise InputError(f"{name}: the ICC needs at least {_MIN_CASES} cases with two ratings, got {n} "
                         f"({n_dropped} dropped for a NaN)")
    return a[keep], b[keep], n_dropped


def _as_ratings(values: Sequence[float], name: str) -> np.ndarray:
    ratings = np.asarray(values, dtype=np.float64)
    if ratings.ndim != 1:
        raise InputError(f"{name} must be one value per case, got shape {ratings.shape}")
    if np.isinf(ratings).any():
        raise InputError(f"{name} contains an infinite value")
    return ratings


@contextmanager
def _unrounded_confidence_intervals() -> Iterator[None]:
    """Switch off pingouin's default 2-decimal rounding of the CI95 column, then restore the option."""
    missing = object()
    saved = pingouin.options.get(_CI_ROUNDING_OPTION, missing)
    pingouin.options[_CI_ROUNDING_OPTION] = None
    try:
        yield
    finally:
        if saved is missing:
            pingouin.options.pop(_CI_ROUNDING_OPTION, None)
        else:
            pingouin.options[_CI_ROUNDING_OPTION] = saved
