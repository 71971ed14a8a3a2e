"""Figures a person would rather look at than read (PNG, headless, no global pyplot state)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

# Background transparent, then one distinct colour per foreground label.
_LABEL_COLOURS = ["#00000000", "#1f77b4", "#2ca02c", "#d62728", "#ff7f0e", "#9467bd", "#8c564b"]


def label_colormap(n_labels: int) -> ListedColormap:
    """A colormap with a transparent background and one colour per foreground label."""
    colours = (_LABEL_COLOURS * (1 + n_labels // len(_LABEL_COLOURS)))[:n_labels]
    colours[0] = _LABEL_COLOURS[0]
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
