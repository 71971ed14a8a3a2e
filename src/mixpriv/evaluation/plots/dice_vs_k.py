"""Mean foreground Dice against the number K of TTA references (the paper's Fig. 3)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from mixpriv.plotting import save_figure
from mixpriv.validation import InputError

logger = logging.getLogger("mixpriv.evaluation.plots")  # the package's name, shared by its figures

# One colour per method in Dice-vs-K curves, so figures agree with each other.
_METHOD_COLOURS = {
    "Baseline": "#444444",
    "Naive": "#ff7f0e",
    "Naive+TTA": "#ff7f0e",
    "Learned": "#1f77b4",
    "Learned+TTA": "#1f77b4",
}


def plot_dice_vs_k(
    curves: Mapping[str, Mapping[int, float]],
    out_path: str | Path,
    baseline: float | None = None,
    stds: Mapping[str, Mapping[int, float]] | None = None,
    title: str | None = None,
) -> Path:
    """Mean foreground Dice against the number K of TTA references (the paper's Fig. 3).

    Args:
        curves: method -> {K: mean foreground Dice}, e.g. ``{"Naive+TTA": {...}, "Learned+TTA": {...}}``.
        out_path: PNG path to write.
        baseline: Dice of the non-private baseline, drawn as a dashed horizontal line.
        stds: method -> {K: std over cases}, drawn as a shaded band around each curve.
        title: optional axes title.

    Returns:
        ``out_path`` as a :class:`~pathlib.Path`.

    Example:
        >>> import tempfile, os
        >>> curves = {"Naive+TTA": {1: 0.69, 4: 0.79, 8: 0.82}, "Learned+TTA": {1: 0.84, 4: 0.88, 8: 0.89}}
        >>> plot_dice_vs_k(curves, os.path.join(tempfile.mkdtemp(), "k.png"), baseline=0.9).exists()
        True
    """
    if not curves:
        raise InputError("curves is empty: give at least one method with {K: Dice}")
    fig = Figure(figsize=(6.0, 4.0), layout="constrained")
    ax = fig.subplots()
    for index, (method, curve) in enumerate(curves.items()):
        ks = sorted(int(k) for k in curve)
        values = np.array([curve[k] for k in ks], dtype=float)
        colour = _METHOD_COLOURS.get(method, f"C{index + 2}")
        ax.plot(ks, values, marker="o", markersize=4, color=colour, label=method)
        if stds and method in stds:
            spread = np.array([stds[method].get(k, np.nan) for k in ks], dtype=float)
            ax.fill_between(ks, values - spread, values + spread, color=colour, alpha=0.18, linewidth=0)
    if baseline is not None:
        ax.axhline(baseline, color=_METHOD_COLOURS["Baseline"], linestyle="--", linewidth=1.2, label="Baseline")
    all_ks = sorted({int(k) for curve in curves.values() for k in curve})
    if len(all_ks) <= 12:
        ax.set_xticks(all_ks)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("Number of TTA references K")
    ax.set_ylabel("Mean foreground Dice")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)
    if title:
        ax.set_title(title)
    return save_figure(fig, out_path, dpi=120, logger=logger)
