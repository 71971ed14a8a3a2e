"""Keep parts of a model fixed while the rest trains (fine-tuning a head, or an unmixer alone).

Example:
    >>> import pytorch_lightning as pl
    >>> freeze = FreezeModules(["segmenter.encoder"])
    >>> trainer = pl.Trainer(callbacks=[freeze], max_steps=1)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence

import pytorch_lightning as pl
from torch import nn


class FreezeModules(pl.Callback):
    """Fix the named submodules: no gradients, and eval mode, so BatchNorm statistics stay fixed too.

    Lightning puts the whole model in train mode for every epoch; this callback puts the frozen
    parts back in eval mode before each training batch. A frozen segmenter therefore gives the
    unmixer exactly the probabilities it gives at inference.

    Args:
        paths: dotted submodule names of the LightningModule, e.g. ``"segmenter"`` or ``"segmenter.encoder"``.
    """

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = tuple(paths)
        self._modules: list[nn.Module] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._modules = [frozen_submodule(pl_module, path) for path in self.paths]
        for module in self._modules:
            module.requires_grad_(False)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        for module in self._modules:
            module.eval()


def frozen_submodule(model: nn.Module, path: str) -> nn.Module:
    """``model.get_submodule(path)`` with an error that lists what can be frozen.

    Example:
        >>> frozen_submodule(nn.Sequential(nn.Linear(2, 2)), "0")
        Linear(in_features=2, out_features=2, bias=True)
    """
    try:
        return model.get_submodule(path)
    except AttributeError:
        top = sorted(name for name, _ in model.named_children())
        raise ValueError(f"cannot freeze {path!r}: the model has no such submodule (top-level parts: {top}; "
                         f"deeper ones are dotted, e.g. 'segmenter.encoder')") from None
