"""Shared LightningModule plumbing: optimiser, logging names, epoch hook for DDP shards."""

from __future__ import annotations

from collections.abc import Mapping

import pytorch_lightning as pl
import torch

from mixpriv.lightning.losses import hard_dice_per_class


class SegmentationModuleBase(pl.LightningModule):
    """Adam with an optional polynomial decay (nnU-Net's schedule), namespaced logs.

    Subclasses call ``save_hyperparameters`` with ``label_names``, ``lr``, ``weight_decay``
    and ``poly_decay`` among their (serialisable) arguments.
    """

    @property
    def label_names(self) -> dict[str, int]:
        return dict(self.hparams.label_names)

    @property
    def num_classes(self) -> int:
        return len(self.hparams.label_names)

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        if not self.hparams.poly_decay:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.poly_schedule(optimizer), "interval": "step"}}

    def poly_schedule(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        """nnU-Net's polynomial decay of ``optimizer``'s learning rate to 0 over the trainer's steps."""
        total = max(1, int(self.trainer.estimated_stepping_batches))
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: (1 - min(step, total) / total) ** 0.9)

    def log_dice(self, stage: str, prefix: str, probs: torch.Tensor, target_one_hot: torch.Tensor) -> None:
        """Log ``{stage}/{prefix}dice_{label}`` for each foreground label and their mean."""
        dice = hard_dice_per_class(probs.detach(), target_one_hot)
        names = sorted(self.label_names, key=self.label_names.get)
        values: Mapping[str, torch.Tensor] = {
            f"{stage}/{prefix}dice_{name}": dice[value] for name, value in self.label_names.items() if value != 0
        }
        self.log_dict(values, batch_size=probs.shape[0], sync_dist=stage != "train")
        self.log(f"{stage}/{prefix}dice_mean", dice[[self.label_names[n] for n in names if self.label_names[n] != 0]].mean(),
                 batch_size=probs.shape[0], prog_bar=stage == "val", sync_dist=stage != "train")

    def on_train_epoch_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "set_epoch"):
            datamodule.set_epoch(self.current_epoch)
