"""Privacy-Net (Kim et al., IEEE TMI 2021), a compared system: an adversarially trained image encoder.

The client encodes each scan with a 3D U-Net ``E`` into an image of the same size (one channel,
in [0, 1]: the U-Net's output through a sigmoid, as in the authors' code); the server segments the
encoded image with ``S`` and returns the segmentation as it is (nothing to decode). A Siamese
discriminator ``D`` is shown the encodings of two scans and guesses whether one patient took both.
For a pair batch (scans ``a``, ``b``, labels ``y_a``, ``y_b``, same-patient flag ``s``):

    z_a, z_b = E(a), E(b)
    L_seg    = CE+Dice(S(z_a), y_a) + CE+Dice(S(z_b), y_b)
    L_D      = BCE(D(z_a, z_b), s)
    E, S  minimise  L_seg - adversarial_weight * L_D      (the paper's min-max objective)
    D     minimises L_D, on the encodings detached from E

so the adversarial term is the discriminator's own loss negated (``loss_adversarial`` in the
logs). As in the authors' training loop, each batch makes one step of ``E`` and ``S`` (Adam,
``lr``), then one step of ``D`` (Adam, ``discriminator_lr``) on the same encodings, detached.
The segmentation loss is this project's CE + soft Dice where the paper uses a Dice loss alone, and
the discriminator is :class:`~mixpriv.networks.siamese.SiameseDiscriminator` (one logit from the
absolute difference of two embeddings) where the paper scores two concatenated DenseNet embeddings
with a two-class head.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from mixpriv.constants import (
    PAIR_IMAGE_A,
    PAIR_IMAGE_B,
    PAIR_LABEL_A,
    PAIR_LABEL_B,
    PAIR_SAME_PATIENT,
)
from mixpriv.lightning.adversarial import AdversarialModuleBase
from mixpriv.lightning.losses import ce_dice_loss
from mixpriv.mixing.functional import one_hot
from mixpriv.networks import SegmenterSpec, build_segmenter
from mixpriv.networks.siamese import SiameseDiscriminator


class PrivacyNetModule(AdversarialModuleBase):
    """Encoder (client) + segmenter (server) + Siamese discriminator, trained adversarially on pairs.

    Trains on :class:`~mixpriv.data.pairs.PairedPatchDataModule` batches, with manual optimisation:
    two Adam optimisers (encoder and segmenter; discriminator), each decayed polynomially to 0 over
    training when ``poly_decay``. ``trainer.global_step`` counts batches, as for the other modules:
    the discriminator's step is not counted (Lightning would count both steps of a batch).

    Args:
        label_names: name -> value (from ``dataset.json``).
        encoder: spec of the encoder U-Net (a :class:`~mixpriv.networks.SegmenterSpec` as a dict,
            built with one output channel; ``architecture: Unet`` for the paper's plain U-Net, which smp
            builds with fewer than 5 stages only when given ``extra: {strides: [[2, 2, 2], ...]}``,
            one stride per stage).
        segmenter: spec of the server's segmenter; it reads the 1-channel encoded image.
        discriminator: keyword arguments of :class:`~mixpriv.networks.siamese.SiameseDiscriminator`.
        adversarial_weight: weight of the adversarial term (the paper's lambda).
        lr: Adam learning rate of the encoder and the segmenter.
        discriminator_lr: Adam learning rate of the discriminator; ``None``: ``lr``.
        weight_decay: Adam weight decay of all three networks.
        poly_decay: decay both learning rates polynomially to 0 over training.
        input_spacing: voxel spacing (mm) the model expects, recorded for inference.
        patch_size: training patch side, reused for whole-volume inference.

    Example:
        >>> tiny = {"encoder_name": "mixpriv-light-8", "encoder_depth": 3, "decoder_channels": [16, 8, 8]}
        >>> module = PrivacyNetModule({"background": 0, "fg": 1}, tiny, tiny, {"channels": [4, 8]})
        >>> encoded = module.encode(torch.zeros(2, 1, 16, 16, 16))
        >>> encoded.shape, bool(((encoded >= 0) & (encoded <= 1)).all())
        (torch.Size([2, 1, 16, 16, 16]), True)
        >>> module.segment_encoded(encoded).shape, module(torch.zeros(1, 1, 16, 16, 16)).shape
        (torch.Size([2, 2, 16, 16, 16]), torch.Size([1, 2, 16, 16, 16]))
    """

    def __init__(
        self,
        label_names: Mapping[str, int],
        encoder: Mapping,
        segmenter: Mapping,
        discriminator: Mapping | None = None,
        adversarial_weight: float = 1.0,
        lr: float = 1e-3,
        discriminator_lr: float | None = None,
        weight_decay: float = 0.0,
        poly_decay: bool = True,
        input_spacing: float | None = None,
        patch_size: int = 48,
    ) -> None:
        super().__init__()
        segmenter_spec = SegmenterSpec.from_dict(segmenter)
        if segmenter_spec.in_channels != 1:
            raise ValueError(f"the segmenter reads the 1-channel encoded image; its spec has in_channels="
                             f"{segmenter_spec.in_channels}")
        if adversarial_weight < 0:
            raise ValueError(f"adversarial_weight must be >= 0, got {adversarial_weight}")
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.encoder = build_segmenter(SegmenterSpec.from_dict(encoder), num_classes=1)
        self.segmenter = build_segmenter(segmenter_spec, len(label_names))
        self.discriminator = SiameseDiscriminator(**dict(discriminator or {}))

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """Client side: the encoded image (N, 1, ...) in [0, 1] of images (N, C, ...)."""
        return torch.sigmoid(self.encoder(image).float())

    def segment_encoded(self, encoded: torch.Tensor) -> torch.Tensor:
        """Server side: class probabilities (N, C, ...) of encoded images (N, 1, ...)."""
        return torch.softmax(self.segmenter(encoded).float(), dim=1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Segmentation logits (N, C, ...) of images (N, 1, ...), through the encoder and the segmenter."""
        return self.segmenter(self.encode(image))

    def main_parameters(self):
        return [*self.encoder.parameters(), *self.segmenter.parameters()]

    def discriminator_parameters(self):
        return self.discriminator.parameters()

    def _losses(self, batch) -> dict[str, torch.Tensor]:
        """Encodings, segmentation logits and losses of a pair batch (the discriminator sees the encodings)."""
        images = torch.cat([batch[PAIR_IMAGE_A], batch[PAIR_IMAGE_B]]).float()
        targets = one_hot(torch.cat([batch[PAIR_LABEL_A], batch[PAIR_LABEL_B]]), self.num_classes)
        same = batch[PAIR_SAME_PATIENT].float()
        encoded = self.encode(images)
        logits = self.segmenter(encoded)
        n = same.shape[0]
        loss_segmenter = ce_dice_loss(logits[:n], targets[:n]) + ce_dice_loss(logits[n:], targets[n:])
        loss_discriminator, accuracy = self._discriminate(encoded, same)
        return {"encoded": encoded, "logits": logits, "targets": targets, "same": same,
                "loss_segmenter": loss_segmenter, "loss_adversarial": -loss_discriminator, "accuracy": accuracy}

    def _discriminate(self, encoded: torch.Tensor, same: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The discriminator's loss and accuracy on the encodings of a batch's two halves (scans a, then b)."""
        n = same.shape[0]
        same_logits = self.discriminator(encoded[:n], encoded[n:]).float()
        accuracy = ((same_logits > 0).float() == same).float().mean()
        return F.binary_cross_entropy_with_logits(same_logits, same), accuracy

    def _log(self, stage: str, losses: Mapping[str, torch.Tensor], loss_discriminator: torch.Tensor,
             accuracy: torch.Tensor) -> None:
        n = losses["same"].shape[0]
        loss = losses["loss_segmenter"] + self.hparams.adversarial_weight * losses["loss_adversarial"]
        self.log_dict({f"{stage}/loss": loss, f"{stage}/loss_segmenter": losses["loss_segmenter"],
                       f"{stage}/loss_adversarial": losses["loss_adversarial"],
                       f"{stage}/loss_discriminator": loss_discriminator,
                       f"{stage}/discriminator_accuracy": accuracy},
                      batch_size=n, sync_dist=stage != "train")
        self.log_dice(stage, "", torch.softmax(losses["logits"].detach().float(), 1), losses["targets"])

    def training_step(self, batch, batch_idx):
        optimizer_es, optimizer_d = self.optimizers()
        self.toggle_optimizer(optimizer_es)  # the adversarial term must not train the discriminator
        losses = self._losses(batch)
        self.step_main(optimizer_es, losses["loss_segmenter"] + self.hparams.adversarial_weight * losses["loss_adversarial"])
        loss_discriminator, accuracy = self._discriminate(losses["encoded"].detach(), losses["same"])
        self.step_discriminator(optimizer_d, loss_discriminator)
        self._log("train", losses, loss_discriminator.detach(), accuracy)

    def validation_step(self, batch, batch_idx):
        losses = self._losses(batch)
        self._log("val", losses, -losses["loss_adversarial"], losses["accuracy"])
