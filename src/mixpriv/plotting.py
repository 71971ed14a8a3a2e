"""Plotting pieces shared by every figure of the package (PNG, headless, no global pyplot state).

Why a top-level module: its users live in three packages, :mod:`mixpriv.data` (the cohort's
``preview.png``), :mod:`mixpriv.evaluation.plots` (the segmentation figures) and
:mod:`mixpriv.privacy.figures` (the audit's figures), and a data module must not depend on the
evaluation package. So this module depends on numpy, matplotlib and :mod:`mixpriv.validation`
only, never on a sub-package, and any of them may import it. It holds:

- colours: :func:`label_colormap` (transparent background, one colour per foreground label);
- writing: :func:`save_figure`;
- slicing: :func:`pick_slice` (which slice of a volume) and :func:`take_slice` (that slice, rotated for display);
- drawing: :func:`intensity_range`, :func:`show_image`, :func:`show_labels`, :func:`label_legend`;
- the one-call figure :func:`plot_label_overlay` (image slices with their labels overlaid).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from mixpriv.validation import InputError

__all__ = ["intensity_range", "label_colormap", "label_legend", "pick_slice", "plot_label_overlay", "save_figure",
           "show_image", "show_labels", "take_slice"]

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


def save_figure(figure: Figure, path: str | Path, dpi: float | None = 110, bbox_inches: str | None = None,
                logger: logging.Logger | None = None) -> Path:
    """Write ``figure`` as a PNG, creating the parent folder.

    Args:
        figure: the figure to write.
        path: PNG path.
        dpi: resolution; ``None``: matplotlib's ``savefig.dpi`` (by default the figure's own dpi).
        bbox_inches: ``"tight"`` to crop the figure to its content; ``None``: the whole figure.
        logger: when given, ``"wrote <path>"`` is logged to it (INFO).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Example:
        >>> import tempfile, os
        >>> save_figure(Figure(), os.path.join(tempfile.mkdtemp(), "sub", "empty.png")).exists()
        True
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi, bbox_inches=bbox_inches)
    if logger is not None:
        logger.info("wrote %s", path)
    return path


def pick_slice(shape: tuple[int, ...], axis: int, slice_index: int | None = None) -> int:
    """The requested slice along ``axis`` of a 3D ``shape``, the middle one by default.

    Raises:
        InputError: ``axis`` is not 0, 1 or 2, or ``slice_index`` is outside the volume.

    Example:
        >>> pick_slice((8, 9, 10), axis=2), pick_slice((8, 9, 10), axis=0, slice_index=3)
        (5, 3)
    """
    if axis not in (0, 1, 2):
        raise InputError(f"axis must be 0, 1 or 2 for a 3D volume, got {axis}")
    size = shape[axis]
    index = size // 2 if slice_index is None else int(slice_index)
    if not 0 <= index < size:
        raise InputError(f"slice_index {index} is outside axis {axis} of size {size}")
    return index


def take_slice(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """A 2D slice of the spatial volume (last three axes), rotated for display like ``plot_label_overlay``.

    Leading axes (e.g. classes of a (C, D, H, W) map) are kept.

    Example:
        >>> import numpy as np
        >>> take_slice(np.zeros((8, 9, 10)), 2, 5).shape, take_slice(np.zeros((3, 8, 9, 10)), 0, 4).shape
        ((9, 8), (3, 10, 9))
    """
    spatial_axis = volume.ndim - 3 + axis
    return np.rot90(np.take(np.asarray(volume), index, axis=spatial_axis), axes=(-2, -1))


def intensity_range(image: np.ndarray) -> tuple[float, float]:
    """Robust display window (1st-99th percentile) of an intensity slice.

    Example:
        >>> intensity_range(np.arange(101.0))
        (1.0, 99.0)
    """
    low, high = np.percentile(image, [1, 99])
    return float(low), float(max(high, low + 1e-6))


def show_image(ax: Axes, image_slice: np.ndarray) -> None:
    """Grey-level image (window: :func:`intensity_range`) without axes.

    Example:
        >>> ax = Figure().subplots()
        >>> show_image(ax, np.random.rand(8, 8)); len(ax.images), ax.axison
        (1, False)
    """
    low, high = intensity_range(image_slice)
    ax.imshow(image_slice, cmap="gray", vmin=low, vmax=high, interpolation="nearest")
    ax.set_axis_off()


def show_labels(ax: Axes, image_slice: np.ndarray, label_slice: np.ndarray, n_labels: int) -> None:
    """Grey-level image with the label map overlaid (background transparent).

    Example:
        >>> ax = Figure().subplots()
        >>> show_labels(ax, np.random.rand(8, 8), np.eye(8, dtype=int), n_labels=2); len(ax.images)
        2
    """
    show_image(ax, image_slice)
    ax.imshow(np.ma.masked_equal(label_slice, 0), cmap=label_colormap(n_labels), vmin=0,
              vmax=max(n_labels - 1, 1), alpha=0.55, interpolation="nearest")


def label_legend(figure: Figure, foreground: Mapping[str, int], n_labels: int) -> None:
    """A one-line legend of the foreground classes (name -> label value, in legend order) under the figure.

    Example:
        >>> figure = Figure(layout="constrained")
        >>> label_legend(figure, {"CSF": 1, "GM": 2, "WM": 3}, n_labels=4)
        >>> [text.get_text() for text in figure.legends[0].get_texts()]
        ['CSF', 'GM', 'WM']
    """
    cmap = label_colormap(n_labels)
    handles = [Patch(facecolor=cmap(value), label=name) for name, value in foreground.items()]
    figure.legend(handles=handles, loc="outside lower center", ncol=max(len(handles), 1), frameon=False, fontsize=9)


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
    return save_figure(fig, out_path, dpi=None)
