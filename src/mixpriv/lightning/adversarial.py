"""Shared plumbing of the compared systems' adversarial training (Privacy-Net, Deformation-Proxy).

Both train a client-side transform and the server's segmenter against a Siamese discriminator with
manual optimisation: per batch, one step of the main optimiser (transform + segmenter, the
discriminator's gradients switched off), then one step of the discriminator's optimiser, each
decayed polynomially when ``poly_decay``. ``trainer.global_step`` counts batches, as for the other
modules: the discriminator's step goes through the strategy (precision plugin, gradient scaling) but
not ``LightningOptimizer.step``, which would count a second trainer step per batch (Lightning #17958).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from mixpriv.lightning.base import SegmentationModuleBase


class AdversarialModuleBase(SegmentationModuleBase):
    """Two Adam optimisers (main, discriminator), their schedules and their steps.

    Subclasses set ``self.automatic_optimization = False``, record ``lr``, ``discriminator_lr``
    (``None``: ``lr``), ``weight_decay`` and ``poly_decay`` in their hparams, and name their trained
    parameters in :meth:`main_parameters` and :meth:`discriminator_parameters`.
    """

    def main_parameters(self) -> Iterable[torch.nn.Parameter]:
        """Parameters of the client-side transform and the server's segmenter."""
        raise NotImplementedError

    def discriminator_parameters(self) -> Iterable[torch.nn.Parameter]:
        """Parameters of the Siamese discriminator."""
        raise NotImplementedError

    def configure_optimizers(self):
        discriminator_lr = self.hparams.discriminator_lr
        optimizers = [torch.optim.Adam(list(self.main_parameters()), lr=self.hparams.lr,
                                       weight_decay=self.hparams.weight_decay),
                      torch.optim.Adam(list(self.discriminator_parameters()),
                                       lr=self.hparams.lr if discriminator_lr is None else discriminator_lr,
                                       weight_decay=self.hparams.weight_decay)]
        if not self.hparams.poly_decay:
            return optimizers
        return optimizers, [self.poly_schedule(optimizer) for optimizer in optimizers]

    def step_main(self, optimizer, loss: torch.Tensor) -> None:
        """One step of the main optimiser on ``loss``, computed after ``self.toggle_optimizer(optimizer)`` (so that
        the adversarial term does not train the discriminator); untoggles it."""
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        self.untoggle_optimizer(optimizer)

    def step_discriminator(self, optimizer, loss: torch.Tensor) -> None:
        """One step of the discriminator's optimiser on ``loss``, then of both schedules (one per batch)."""
        optimizer.zero_grad()
        self.manual_backward(loss)
        self.trainer.strategy.optimizer_step(optimizer.optimizer, closure=lambda: None)
        schedulers = self.lr_schedulers()
        for scheduler in (schedulers if isinstance(schedulers, list) else [schedulers] if schedulers else []):
            scheduler.step()
