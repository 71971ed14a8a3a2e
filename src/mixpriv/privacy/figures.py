"""Figures of the privacy audit (PNG, headless, no global pyplot state).

Written and sliced with the shared pieces of :mod:`mixpriv.plotting`; unlike the evaluation
figures, these are cropped to their content (``bbox_inches="tight"``) and log nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from mixpriv.plotting import save_figure, take_slice
from mixpriv.privacy.reliability import ICCResult

#: mAP of the paper's Table 2 (PPMI, the paper's own attacker), for comparison in the figures.
PAPER_TABLE_2_MAP = {"Mixup-Privacy (paper)": 0.352, "Privacy-Net (paper)": 0.202, "Deformation-Proxy (paper)": 0.147}
#: Line style of each of those rows.
PAPER_LINE_STYLES = ("--", "-.", ":")
_DESIGN_MARKERS = {"request": "o", "shuffled": "s", "single": "^"}


def _save(figure: Figure, path: str | Path) -> Path:
    """Every audit figure: 110 dpi, cropped to its content."""
    return save_figure(figure, path, dpi=110, bbox_inches="tight")


def _middle_slice(volume: np.ndarray | torch.Tensor) -> np.ndarray:
    """The middle slice along the last axis of a (..., D, H, W) volume with singleton leading axes, as float32."""
    array = np.asarray(volume, dtype=np.float32).reshape(np.shape(volume)[-3:])
    return take_slice(array, 2, array.shape[2] // 2)


def plot_similarity_matrices(similarities: Mapping[str, torch.Tensor], patient_ids: Sequence[str],
                             path: str | Path) -> Path:
    """The attacker's MS-SSIM matrices, scans grouped by patient (a bright 2x2 block = re-identified).

    Example:
        >>> import torch, tempfile, os
        >>> out = plot_similarity_matrices({"No proxy": torch.eye(4)}, ["a", "b", "a", "b"],
        ...                                os.path.join(tempfile.mkdtemp(), "reid.png"))
        >>> out.stat().st_size > 0
        True
    """
    order = np.argsort(np.asarray(patient_ids), kind="stable")
    figure = Figure(figsize=(4.2 * len(similarities), 4))
    axes = figure.subplots(1, len(similarities), squeeze=False)[0]
    for ax, (name, similarity) in zip(axes, similarities.items()):
        matrix = similarity.numpy()[np.ix_(order, order)].copy()
        np.fill_diagonal(matrix, np.nan)
        image = ax.imshow(matrix, cmap="viridis")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("scan (grouped by patient)")
        ax.set_ylabel("query scan")
        figure.colorbar(image, ax=ax, fraction=0.046, label="MS-SSIM")
    return _save(figure, path)


def plot_test_retest(first: Mapping[str, Sequence[float]], second: Mapping[str, Sequence[float]],
                     icc: Mapping[str, ICCResult], path: str | Path) -> Path:
    """Per class, the Dice of the first against the second prediction, titled with ICC(A,1) and its CI.

    Example:
        >>> import tempfile, os
        >>> from mixpriv.privacy.reliability import ICCResult
        >>> out = plot_test_retest({"GM": [0.9, 0.8, 0.85]}, {"GM": [0.91, 0.79, 0.86]},
        ...                        {"GM": ICCResult(0.97, 0.8, 0.99, 3)}, os.path.join(tempfile.mkdtemp(), "icc.png"))
        >>> out.name
        'icc.png'
    """
    figure = Figure(figsize=(3.6 * len(first), 3.6))
    axes = figure.subplots(1, len(first), squeeze=False)[0]
    for ax, name in zip(axes, first):
        x, y = np.asarray(first[name], float), np.asarray(second[name], float)
        ax.scatter(x, y, s=14)
        finite = np.isfinite(x) & np.isfinite(y)
        low = float(min(x[finite].min(), y[finite].min())) if finite.any() else 0.0
        high = float(max(x[finite].max(), y[finite].max())) if finite.any() else 1.0
        ax.plot([low, high], [low, high], color="grey", lw=0.8, ls="--")
        result = icc[name]
        ax.set_title(f"{name}: ICC(A,1) {result.icc:.3f}\n95% CI [{result.ci_low:.3f}, {result.ci_high:.3f}]",
                     fontsize=9)
        ax.set_xlabel("Dice, reference 1")
        ax.set_ylabel("Dice, reference 2")
    return _save(figure, path)


def plot_separation(target: torch.Tensor, reference: torch.Tensor, mixture: torch.Tensor,
                    recovered: Sequence[torch.Tensor], scores: Sequence[float], path: str | Path,
                    title: str = "") -> Path:
    """Paper Fig. 4 layout: target, reference, mixture, then the attack's recovered target per random init.

    Example:
        >>> import torch, tempfile, os
        >>> x = torch.rand(8, 8, 8)
        >>> out = plot_separation(x, x, x, [x, x], [0.1, 0.2], os.path.join(tempfile.mkdtemp(), "bss.png"))
        >>> out.stat().st_size > 0
        True
    """
    panels = [("target", target), ("reference", reference), ("mixture (sent)", mixture)]
    panels += [(f"recovered, init {i + 1}\nMS-SSIM {score:.3f}", volume)
               for i, (volume, score) in enumerate(zip(recovered, scores))]
    figure = Figure(figsize=(2.2 * len(panels), 2.6))
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, volume) in zip(axes, panels):
        ax.imshow(_middle_slice(volume), cmap="gray", vmin=0, vmax=1)
        ax.set_title(name, fontsize=8)
        ax.axis("off")
    if title:
        figure.suptitle(title, fontsize=10)
    return _save(figure, path)


def plot_privacy_utility(rows: Sequence[Mapping], path: str | Path, baseline_dice: float | None = None) -> Path:
    """The privacy-utility frontier: sweep rows (``setting``, ``worst_case_map``, ``dice``, optional
    ``mixing``, ``design`` and ``bss``), each privacy score against Dice.

    One colour per mixing setting (``mixing``, else ``setting``), one marker per request design, both
    explained in legends beside the axes. Left: worst-case re-identification mAP, with the paper's
    Table 2 rows as red vertical lines; right (when any row has one): the separation attack's MS-SSIM.
    Rows without a Dice are drawn as a dotted vertical line in their setting's colour (their privacy
    was measured, their utility not).

    Example:
        >>> import tempfile, os
        >>> rows = [{"setting": "a", "worst_case_map": 0.5, "bss": 0.6, "dice": 0.9},
        ...         {"setting": "b", "design": "single", "worst_case_map": 0.3, "bss": 0.4, "dice": None}]
        >>> plot_privacy_utility(rows, os.path.join(tempfile.mkdtemp(), "sweep.png"), 0.91).name
        'sweep.png'
    """
    from matplotlib.lines import Line2D

    panels = [("worst_case_map", "worst-case re-identification mAP (lower = more private)")]
    if any(row.get("bss") is not None for row in rows):
        panels.append(("bss", "separation attack MS-SSIM, λ known (lower = more private)"))
    settings = list(dict.fromkeys(row.get("mixing", row["setting"]) for row in rows))
    palette = [f"C{i}" for i in range(10) if i != 3]  # C3 is red: the paper's rows
    colours = {name: palette[i % len(palette)] for i, name in enumerate(settings)}
    figure = Figure(figsize=(5.5 * len(panels) + 3.5, 4.6))
    axes = np.atleast_1d(figure.subplots(1, len(panels), sharey=True))
    axes[0].set_ylabel("mean foreground Dice (Learned+TTA; Learned for single)")
    dice_values = [row["dice"] for row in rows if row.get("dice") is not None]
    references = [baseline_dice, baseline_dice - 0.01] if baseline_dice is not None else []
    for ax, (key, label) in zip(axes, panels):
        if dice_values or references:
            ax.set_ylim(min(dice_values + references) - 0.02, max(dice_values + references) + 0.01)
        for row in rows:
            x, dice = row.get(key), row.get("dice")
            colour = colours[row.get("mixing", row["setting"])]
            if x is None:
                continue
            if dice is None:
                ax.axvline(x, color=colour, lw=1.0, ls=":")
            else:
                ax.scatter([x], [dice], s=40, color=colour, edgecolors="black", linewidths=0.5, zorder=3,
                           marker=_DESIGN_MARKERS.get(row.get("design", "request"), "o"))
        if key == "worst_case_map":
            for (name, value), style in zip(PAPER_TABLE_2_MAP.items(), PAPER_LINE_STYLES):
                ax.axvline(value, color="tab:red", lw=0.7, ls=style)
        if baseline_dice is not None:
            ax.axhline(baseline_dice, color="black", lw=0.8, ls="--")
            ax.axhline(baseline_dice - 0.01, color="grey", lw=0.8, ls="--")
        ax.set_xlabel(label)
    handles = [Line2D([], [], color=colours[name], marker="s", ls="", label=name) for name in settings]
    handles += [Line2D([], [], color="grey", marker=marker, ls="", label=f"design: {design}")
                for design, marker in _DESIGN_MARKERS.items()]
    handles += [Line2D([], [], color="grey", ls=":", label="no Dice measured")]
    handles += [Line2D([], [], color="tab:red", lw=0.7, ls=style, label=name)
                for name, style in zip(PAPER_TABLE_2_MAP, PAPER_LINE_STYLES)]
    if baseline_dice is not None:
        handles += [Line2D([], [], color="black", lw=0.8, ls="--", label=f"non-private baseline ({baseline_dice:.3f})"),
                    Line2D([], [], color="grey", lw=0.8, ls="--", label="baseline − 0.01")]
    axes[-1].legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    figure.suptitle("Privacy-utility frontier", fontsize=10)
    return _save(figure, path)
