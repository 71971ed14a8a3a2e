"""Figures a person would rather look at than read (PNG, headless, no global pyplot state)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import ListedColormap, to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from mixpriv.evaluation.dice import dice_per_class, foreground_labels, mean_foreground
from mixpriv.validation import InputError

logger = logging.getLogger(__name__)

# Background transparent, then one distinct colour per foreground label.
_LABEL_COLOURS = ["#00000000", "#1f77b4", "#2ca02c", "#d62728", "#ff7f0e", "#9467bd", "#8c564b"]


def label_colormap(n_labels: int) -> ListedColormap:
    """A colormap with a transparent background and one colour per foreground label.

    Label 0 is fully transparent; labels 1, 2, ... cycle through the foreground colours
    (never through the transparent one, however many labels there are).

    Example:
        >>> float(label_colormap(4)(0)[3]), float(label_colormap(4)(1)[3])
        (0.0, 1.0)
    """
    foreground = _LABEL_COLOURS[1:]
    colours = [_LABEL_COLOURS[0]] + [foreground[i % len(foreground)] for i in range(max(n_labels, 1) - 1)]
    return ListedColormap(colours)


def plot_label_overlay(
    image: np.ndarray,
    label: np.ndarray,
    label_names: Mapping[str, int],
    out_path: str | Path,
    n_slices: int = 3,
    title: str | None = None,
) -> Path:
    """Save axial, coronal and sagittal slices of ``image`` with ``label`` overlaid.

    Args:
        image: 3D intensity volume (D, H, W).
        label: 3D integer label map of the same shape.
        label_names: name -> value, as in ``dataset.json["labels"]``.
        out_path: PNG path to write.
        n_slices: slices per orientation, evenly spaced through the middle of the volume.
        title: optional figure title.

    Example:
        >>> import numpy as np, tempfile, os
        >>> img = np.random.rand(8, 8, 8); lab = (img > 0.5).astype(int)
        >>> p = plot_label_overlay(img, lab, {"background": 0, "fg": 1}, os.path.join(tempfile.mkdtemp(), "x.png"))
        >>> p.exists()
        True
    """
    if image.shape != label.shape:
        raise ValueError(f"image shape {image.shape} and label shape {label.shape} differ")
    n_labels = int(max(max(label_names.values()), label.max())) + 1
    cmap = label_colormap(n_labels)
    fig = Figure(figsize=(3 * n_slices, 9), dpi=100)
    axes = fig.subplots(3, n_slices, squeeze=False)
    for axis in range(3):
        size = image.shape[axis]
        positions = np.linspace(0.35 * size, 0.65 * size, n_slices).astype(int)
        for column, index in enumerate(positions):
            ax = axes[axis, column]
            img_slice = np.rot90(np.take(image, index, axis=axis))
            lab_slice = np.rot90(np.take(label, index, axis=axis))
            ax.imshow(img_slice, cmap="gray")
            ax.imshow(np.ma.masked_equal(lab_slice, 0), cmap=cmap, vmin=0, vmax=n_labels - 1,
                      alpha=0.45, interpolation="nearest")
            ax.set_axis_off()
            ax.set_title(f"axis {axis}, slice {index}", fontsize=8)
    legend = ", ".join(f"{value}={name}" for name, value in sorted(label_names.items(), key=lambda kv: kv[1]))
    fig.suptitle(f"{title + ' — ' if title else ''}labels: {legend}", fontsize=9)
    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path)
    return out_path


# --------------------------------------------------------------------------- helpers

# One colour per method in Dice-vs-K curves, so figures agree with each other.
_METHOD_COLOURS = {
    "Baseline": "#444444",
    "Naive": "#ff7f0e",
    "Naive+TTA": "#ff7f0e",
    "Learned": "#1f77b4",
    "Learned+TTA": "#1f77b4",
}


def _save(fig: Figure, out_path: str | Path, dpi: int = 110) -> Path:
    """Write ``fig`` as a PNG, creating the parent folder."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=dpi)
    logger.info("wrote %s", out_path)
    return out_path


def _slice_index(shape: tuple[int, ...], axis: int, slice_index: int | None) -> int:
    """The requested slice along ``axis`` of a 3D ``shape``, the middle one by default."""
    if axis not in (0, 1, 2):
        raise InputError(f"axis must be 0, 1 or 2 for a 3D volume, got {axis}")
    size = shape[axis]
    index = size // 2 if slice_index is None else int(slice_index)
    if not 0 <= index < size:
        raise InputError(f"slice_index {index} is outside axis {axis} of size {size}")
    return index


def _take(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """A 2D slice of the spatial volume (last three axes), rotated for display like ``plot_label_overlay``."""
    spatial_axis = volume.ndim - 3 + axis
    return np.rot90(np.take(np.asarray(volume), index, axis=spatial_axis), axes=(-2, -1))


def _as_label_map(array: np.ndarray) -> np.ndarray:
    """A (D, H, W) label map as is; a (C, D, H, W) probability map reduced by argmax over C."""
    array = np.asarray(array)
    return array.argmax(axis=0) if array.ndim == 4 else array


def _intensity_range(image: np.ndarray) -> tuple[float, float]:
    """Robust display window (1st-99th percentile) of an intensity slice."""
    low, high = np.percentile(image, [1, 99])
    return float(low), float(max(high, low + 1e-6))


def _show_image(ax: Axes, image_slice: np.ndarray) -> None:
    """Grey-level image without axes."""
    low, high = _intensity_range(image_slice)
    ax.imshow(image_slice, cmap="gray", vmin=low, vmax=high, interpolation="nearest")
    ax.set_axis_off()


def _show_labels(ax: Axes, image_slice: np.ndarray, label_slice: np.ndarray, n_labels: int) -> None:
    """Grey-level image with the label map overlaid (background transparent)."""
    _show_image(ax, image_slice)
    ax.imshow(np.ma.masked_equal(label_slice, 0), cmap=label_colormap(n_labels), vmin=0,
              vmax=max(n_labels - 1, 1), alpha=0.55, interpolation="nearest")


def _probability_rgb(probabilities: np.ndarray, n_labels: int) -> np.ndarray:
    """Blend (C, h, w) class probabilities into an RGB image: background black, classes in their colours."""
    colours = np.array([to_rgb(c) for c in label_colormap(max(n_labels, probabilities.shape[0])).colors])
    colours[0] = 0.0
    probabilities = np.clip(probabilities, 0.0, 1.0)
    rgb = np.tensordot(probabilities, colours[: probabilities.shape[0]], axes=([0], [0]))
    return np.clip(rgb, 0.0, 1.0)


def _label_legend(fig: Figure, label_names: Mapping[str, int], n_labels: int) -> None:
    """A one-line legend of the foreground classes under the figure."""
    cmap = label_colormap(n_labels)
    handles = [Patch(facecolor=cmap(value), label=name) for name, value in foreground_labels(label_names).items()]
    fig.legend(handles=handles, loc="outside lower center", ncol=max(len(handles), 1), frameon=False, fontsize=9)


# --------------------------------------------------------------------------- figures


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
    return _save(fig, out_path, dpi=120)


def plot_private_segmentation(
    target_image: np.ndarray,
    target_label: np.ndarray,
    references: Sequence[np.ndarray],
    reference_labels: Sequence[np.ndarray],
    mixtures: Sequence[np.ndarray],
    mixed_predictions: Sequence[np.ndarray],
    naive: Sequence[np.ndarray],
    learned: Sequence[np.ndarray],
    naive_tta: np.ndarray,
    learned_tta: np.ndarray,
    label_names: Mapping[str, int],
    out_path: str | Path,
    slice_index: int | None = None,
    axis: int = 2,
    title: str | None = None,
    show_dice: bool = True,
) -> Path:
    """The client's view of one private segmentation, laid out like the paper's Fig. 2.

    One row per reference k (at most 3). Columns: the first column shows "Target"
    (image with its ground truth), then "Naive + TTA" and "Learned + TTA" down the rows;
    then "Reference k" (with its label), "Mixture" (the image the server sees; the secret
    λ is not shown), "Prediction" (the server's output on the mixture, class probabilities
    blended into colours), "Naive" and "Learned" (the two unmixed segmentations for
    reference k). With fewer than 3 references, fewer rows (and first-column panels) are drawn.

    Args:
        target_image: (D, H, W) intensity volume of the patient.
        target_label: (D, H, W) ground-truth label map.
        references: per reference k, its (D, H, W) image.
        reference_labels: per reference k, its (D, H, W) label map.
        mixtures: per reference k, the (D, H, W) mixed image.
        mixed_predictions: per reference k, the server's (C, D, H, W) probability map.
        naive: per reference k, the naive unmixing, (D, H, W) labels or (C, D, H, W) probabilities.
        learned: per reference k, the learned unmixing, same forms as ``naive``.
        naive_tta: the naive unmixing averaged over all references, same forms.
        learned_tta: the learned unmixing averaged over all references, same forms.
        label_names: class name -> label value.
        out_path: PNG path to write.
        slice_index: slice along ``axis``; the middle slice by default.
        axis: spatial axis (0, 1 or 2) to slice.
        title: optional figure title.
        show_dice: write each segmentation's 3D mean foreground Dice against ``target_label`` on it.

    Returns:
        ``out_path`` as a :class:`~pathlib.Path`.

    Example:
        >>> import numpy as np, tempfile, os
        >>> rng = np.random.default_rng(0)
        >>> img, lab = rng.random((8, 8, 8)), rng.integers(0, 3, (8, 8, 8))
        >>> probs = np.stack([lab == c for c in range(3)]).astype(float)
        >>> path = plot_private_segmentation(img, lab, [img], [lab], [img], [probs], [lab], [lab], lab, lab,
        ...     {"background": 0, "a": 1, "b": 2}, os.path.join(tempfile.mkdtemp(), "fig2.png"))
        >>> path.exists()
        True
    """
    per_reference = {"references": references, "reference_labels": reference_labels, "mixtures": mixtures,
                     "mixed_predictions": mixed_predictions, "naive": naive, "learned": learned}
    n_references = len(references)
    if n_references == 0:
        raise InputError("plot_private_segmentation needs at least one reference")
    lengths = {name: len(values) for name, values in per_reference.items()}
    if len(set(lengths.values())) != 1:
        raise InputError(f"one entry per reference is needed in each sequence, got lengths {lengths}")
    shape = tuple(np.shape(target_image))
    if len(shape) != 3:
        raise InputError(f"target_image must be a (D, H, W) volume, got shape {shape}")
    volumes = {"target_label": target_label, "naive_tta": naive_tta, "learned_tta": learned_tta}
    volumes.update({f"{name}[{k}]": v for name, values in per_reference.items() for k, v in enumerate(values)})
    for name, volume in volumes.items():
        if tuple(np.shape(volume))[-3:] != shape:
            raise InputError(f"{name} spatial shape {tuple(np.shape(volume))[-3:]} does not match target_image {shape}")

    n_rows = min(3, n_references)
    if n_references > 3:
        logger.info("showing the first 3 of %d references; the TTA panels average all of them", n_references)
    elif n_references < 3:
        logger.info("%d reference(s): the first-column TTA panels beyond row %d are not drawn", n_references, n_rows)
    index = _slice_index(shape, axis, slice_index)
    n_labels = int(max(max(label_names.values()), np.max(target_label))) + 1

    def dice_text(segmentation: np.ndarray) -> str | None:
        if not show_dice:
            return None
        return f"Dice {mean_foreground(dice_per_class(segmentation, target_label, label_names)):.3f}"

    image_slice = _take(target_image, axis, index)
    first_column = [
        ("Target", np.asarray(target_label), None),
        ("Naive + TTA", _as_label_map(naive_tta), dice_text(_as_label_map(naive_tta))),
        ("Learned + TTA", _as_label_map(learned_tta), dice_text(_as_label_map(learned_tta))),
    ]
    fig = Figure(figsize=(6 * 2.0, n_rows * 2.15 + 0.9), layout="constrained")
    axes = fig.subplots(n_rows, 6, squeeze=False)
    for row in range(n_rows):
        row_axes = axes[row]
        first_title, first_segmentation, first_text = first_column[row]
        naive_row, learned_row = _as_label_map(naive[row]), _as_label_map(learned[row])
        _show_labels(row_axes[0], image_slice, _take(first_segmentation, axis, index), n_labels)
        _show_labels(row_axes[1], _take(references[row], axis, index), _take(reference_labels[row], axis, index),
                     n_labels)
        _show_image(row_axes[2], _take(mixtures[row], axis, index))
        probabilities = _take(np.asarray(mixed_predictions[row]), axis, index)
        row_axes[3].imshow(_probability_rgb(probabilities, n_labels), interpolation="nearest")
        row_axes[3].set_axis_off()
        _show_labels(row_axes[4], image_slice, _take(naive_row, axis, index), n_labels)
        _show_labels(row_axes[5], image_slice, _take(learned_row, axis, index), n_labels)
        titles = [first_title, f"Reference {row + 1}", "Mixture", "Prediction", "Naive", "Learned"]
        texts = [first_text, None, None, None, dice_text(naive_row), dice_text(learned_row)]
        for ax, panel_title, text in zip(row_axes, titles, texts):
            ax.set_title(panel_title, fontsize=10)
            if text:
                ax.text(0.03, 0.03, text, transform=ax.transAxes, fontsize=7.5, color="white",
                        bbox={"facecolor": "black", "alpha": 0.6, "pad": 1.5, "edgecolor": "none"})
    _label_legend(fig, label_names, n_labels)
    heading = f"{title} — " if title else ""
    fig.suptitle(f"{heading}slice {index} of axis {axis}; TTA over {n_references} reference(s)", fontsize=10)
    return _save(fig, out_path)


def plot_variance_map(
    image: np.ndarray,
    variance: np.ndarray,
    out_path: str | Path,
    slice_index: int | None = None,
    axis: int = 2,
    title: str | None = "TTA variance",
    hide_below: float = 0.02,
    vmax: float | None = None,
) -> Path:
    """An image slice with the per-voxel variance of the TTA predictions as a heat overlay.

    The variance across the K unmixed predictions is an uncertainty map: high where
    references disagree. Voxels whose variance is below ``hide_below`` × the top of the
    colour scale are left uncoloured so the anatomy stays visible.

    Args:
        image: (D, H, W) intensity volume.
        variance: (D, H, W) variance, or (C, D, H, W) per-class variance (summed over C).
        out_path: PNG path to write.
        slice_index: slice along ``axis``; the middle slice by default.
        axis: spatial axis (0, 1 or 2) to slice.
        title: axes title.
        hide_below: fraction of the colour scale's top under which voxels are not coloured.
        vmax: top of the colour scale; the volume's maximum variance by default (give a fixed
            value, e.g. 0.25 for the variance of binary votes, to compare figures).

    Returns:
        ``out_path`` as a :class:`~pathlib.Path`.

    Example:
        >>> import numpy as np, tempfile, os
        >>> img = np.random.rand(8, 8, 8)
        >>> plot_variance_map(img, img ** 2 / 10, os.path.join(tempfile.mkdtemp(), "var.png")).exists()
        True
    """
    image = np.asarray(image)
    variance = np.asarray(variance, dtype=float)
    if variance.ndim == 4:
        variance = variance.sum(axis=0)
    if image.ndim != 3 or variance.shape != image.shape:
        raise InputError(f"image shape {image.shape} and variance shape {variance.shape} must be the same (D, H, W)")
    index = _slice_index(image.shape, axis, slice_index)
    top = float(np.nanmax(variance)) if vmax is None else float(vmax)
    heat = _take(variance, axis, index)
    fig = Figure(figsize=(4.8, 4.2), layout="constrained")
    ax = fig.subplots()
    _show_image(ax, _take(image, axis, index))
    shown = ax.imshow(np.ma.masked_less_equal(heat, hide_below * top), cmap="inferno", vmin=0.0,
                      vmax=max(top, 1e-12), alpha=0.75, interpolation="nearest")
    colorbar = fig.colorbar(ScalarMappable(norm=shown.norm, cmap=shown.cmap), ax=ax, shrink=0.85)  # opaque bar
    colorbar.set_label("variance across TTA predictions")
    ax.set_title(f"{title + ' — ' if title else ''}slice {index} of axis {axis}", fontsize=10)
    return _save(fig, out_path)
