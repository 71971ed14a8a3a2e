"""Figures a person would rather look at than read (PNG, headless, no global pyplot state).

One module per figure; the pieces they share (label colours, slicing, drawing, writing) are in
:mod:`mixpriv.plotting`, which also holds :func:`plot_label_overlay` (it has users outside this
package) and is re-exported here:

- :mod:`~mixpriv.evaluation.plots.private_segmentation`: :func:`plot_private_segmentation` (the paper's Fig. 2);
- :mod:`~mixpriv.evaluation.plots.dice_vs_k`: :func:`plot_dice_vs_k` (the paper's Fig. 3);
- :mod:`~mixpriv.evaluation.plots.variance`: :func:`plot_variance_map` (the TTA uncertainty map).

The figures log ``wrote <path>`` under this package's name, ``mixpriv.evaluation.plots``.
"""

from __future__ import annotations

from mixpriv.evaluation.plots.dice_vs_k import plot_dice_vs_k
from mixpriv.evaluation.plots.private_segmentation import plot_private_segmentation
from mixpriv.evaluation.plots.variance import plot_variance_map
from mixpriv.plotting import label_colormap, plot_label_overlay

__all__ = ["label_colormap", "plot_dice_vs_k", "plot_label_overlay", "plot_private_segmentation", "plot_variance_map"]
