"""The client's view of one private segmentation, laid out like the paper's Fig. 2."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure

from mixpriv.evaluation.dice import dice_per_class, foreground_labels, mean_foreground
from mixpriv.plotting import (
    label_colormap,
    label_legend,
    pick_slice,
    save_figure,
    show_image,
    show_labels,
    take_slice,
)
from mixpriv.validation import InputError

logger = logging.getLogger("mixpriv.evaluation.plots")  # the package's name, shared by its figures


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
    index = pick_slice(shape, axis, slice_index)
    n_labels = int(max(max(label_names.values()), np.max(target_label))) + 1

    def dice_text(segmentation: np.ndarray) -> str | None:
        if not show_dice:
            return None
        return f"Dice {mean_foreground(dice_per_class(segmentation, target_label, label_names)):.3f}"

    image_slice = take_slice(target_image, axis, index)
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
        show_labels(row_axes[0], image_slice, take_slice(first_segmentation, axis, index), n_labels)
        show_labels(row_axes[1], take_slice(references[row], axis, index), take_slice(reference_labels[row], axis, index),
                     n_labels)
        show_image(row_axes[2], take_slice(mixtures[row], axis, index))
        probabilities = take_slice(np.asarray(mixed_predictions[row]), axis, index)
        row_axes[3].imshow(_probability_rgb(probabilities, n_labels), interpolation="nearest")
        row_axes[3].set_axis_off()
        show_labels(row_axes[4], image_slice, take_slice(naive_row, axis, index), n_labels)
        show_labels(row_axes[5], image_slice, take_slice(learned_row, axis, index), n_labels)
        titles = [first_title, f"Reference {row + 1}", "Mixture", "Prediction", "Naive", "Learned"]
        texts = [first_text, None, None, None, dice_text(naive_row), dice_text(learned_row)]
        for ax, panel_title, text in zip(row_axes, titles, texts):
            ax.set_title(panel_title, fontsize=10)
            if text:
                ax.text(0.03, 0.03, text, transform=ax.transAxes, fontsize=7.5, color="white",
                        bbox={"facecolor": "black", "alpha": 0.6, "pad": 1.5, "edgecolor": "none"})
    label_legend(fig, foreground_labels(label_names), n_labels)
    heading = f"{title} — " if title else ""
    fig.suptitle(f"{heading}slice {index} of axis {axis}; TTA over {n_references} reference(s)", fontsize=10)
    return save_figure(fig, out_path, logger=logger)


def _as_label_map(array: np.ndarray) -> np.ndarray:
    """A (D, H, W) label map as is; a (C, D, H, W) probability map reduced by argmax over C."""
    array = np.asarray(array)
    return array.argmax(axis=0) if array.ndim == 4 else array


def _probability_rgb(probabilities: np.ndarray, n_labels: int) -> np.ndarray:
    """Blend (C, h, w) class probabilities into an RGB image: background black, classes in their colours."""
    colours = np.array([to_rgb(c) for c in label_colormap(max(n_labels, probabilities.shape[0])).colors])
    colours[0] = 0.0
    probabilities = np.clip(probabilities, 0.0, 1.0)
    rgb = np.tensordot(probabilities, colours[: probabilities.shape[0]], axes=([0], [0]))
    return np.clip(rgb, 0.0, 1.0)
