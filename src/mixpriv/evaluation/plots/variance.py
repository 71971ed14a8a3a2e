"""An image slice with the per-voxel variance of the TTA predictions as a heat overlay."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.figure import Figure

from mixpriv.plotting import pick_slice, save_figure, show_image, take_slice
from mixpriv.validation import InputError

logger = logging.getLogger("mixpriv.evaluation.plots")  # the package's name, shared by its figures


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
    index = pick_slice(image.shape, axis, slice_index)
    top = float(np.nanmax(variance)) if vmax is None else float(vmax)
    heat = take_slice(variance, axis, index)
    fig = Figure(figsize=(4.8, 4.2), layout="constrained")
    ax = fig.subplots()
    show_image(ax, take_slice(image, axis, index))
    shown = ax.imshow(np.ma.masked_less_equal(heat, hide_below * top), cmap="inferno", vmin=0.0,
                      vmax=max(top, 1e-12), alpha=0.75, interpolation="nearest")
    colorbar = fig.colorbar(ScalarMappable(norm=shown.norm, cmap=shown.cmap), ax=ax, shrink=0.85)  # opaque bar
    colorbar.set_label("variance across TTA predictions")
    ax.set_title(f"{title + ' — ' if title else ''}slice {index} of axis {axis}", fontsize=10)
    return save_figure(fig, out_path, logger=logger)
