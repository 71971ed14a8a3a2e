"""Deformation-Proxy (Kim et al., BMVC 2021), a compared system: segment a secretly deformed scan.

The client draws a fresh secret :class:`~mixpriv.proxies.DeformationKey` per scan and warps the scan
with the flow-field generator's diffeomorphism ``exp(v)`` (the key's smooth random velocity plus a
learned, bounded correction); the server segments the deformed scan; the client warps the returned
class probabilities back with ``exp(-v)``. For a pair batch (patches ``x_a``, ``x_b`` of two scans at
one place, ``s`` = same patient), with deformed ``z = x o exp(v)`` and restored
``p^ = softmax(S(z)) o exp(-v)``, each training step makes two optimiser steps:

    generator + segmenter:  CE+Dice(p^_a, y_a) + CE+Dice(p^_b, y_b)   (on the original grid)
                            - adversarial_weight * BCE_D(deformed pairs)
    discriminator:          BCE_D(raw pair (x_a, x_b) and the deformed pairs, all detached)

where the deformed pairs are those of Privacy-Net's scheme: (z_a, z_b) labelled ``s``, (x_a, z_a) and
(x_b, z_b) labelled 1, (x_a, z_b) and (x_b, z_a) labelled ``s``. The generator is trained to make the
Siamese discriminator fail (to maximise its loss); the segmentation loss is computed after the
inverse warp, so it reaches the generator too (end-to-end, as the paper trains it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

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
from mixpriv.proxies import (
    DeformationKey,
    DeformationSpec,
    FlowFieldGenerator,
    warp,
    warp_probabilities,
)

Keys = DeformationKey | Sequence[DeformationKey] | None


def restored_loss(probabilities: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CE + soft Dice of probabilities (not logits): their log is a logit whose softmax is themselves."""
    return ce_dice_loss(torch.log(probabilities.clamp_min(1e-6)), target)


class DeformationProxyModule(AdversarialModuleBase):
    """Flow-field generator (client) + U-Net++ segmenter (server) + Siamese discriminator, adversarial.

    Args:
        label_names: name -> value (from ``dataset.json``).
        segmenter: a :class:`~mixpriv.networks.SegmenterSpec` as a dict.
        deformation: a :class:`~mixpriv.proxies.DeformationSpec` as a dict (the keys' magnitude,
            control spacing, smoothing and steps, in voxels, and the learned correction).
        discriminator: :class:`~mixpriv.networks.siamese.SiameseDiscriminator` arguments as a dict.
        adversarial_weight: weight of the identity-obfuscation term in the generator's loss.
        lr: Adam learning rate of the generator and segmenter.
        discriminator_lr: Adam learning rate of the discriminator.
        weight_decay: Adam weight decay of both optimisers.
        poly_decay: decay both learning rates polynomially to 0 over training.
        input_spacing, patch_size: as in the baseline, recorded for inference.

    Optimisation is manual: two Adam optimisers, each stepped once per batch (and its polynomial
    decay with it). ``trainer.global_step`` counts batches, as for the other modules: the
    discriminator's step goes through the strategy but is not counted as a second trainer step.

    Example:
        >>> module = DeformationProxyModule({"background": 0, "fg": 1},
        ...     {"encoder_name": "mixpriv-light-8", "encoder_depth": 3, "decoder_channels": [16, 8, 8]},
        ...     deformation={"magnitude": 2.0, "channels": [4]}, discriminator={"channels": [4, 8]})
        >>> image = torch.rand(2, 1, 16, 16, 16)
        >>> deformed, secret = module.deform(image, module.deformation_spec.key(42))    # client
        >>> served = module.segment_deformed(deformed)                                # server
        >>> probs = module.restore(served, secret)                                    # client
        >>> probs.shape, bool(torch.allclose(probs.sum(1), torch.ones(2, 16, 16, 16)))
        (torch.Size([2, 2, 16, 16, 16]), True)
    """

    def __init__(
        self,
        label_names: Mapping[str, int],
        segmenter: Mapping,
        deformation: Mapping | None = None,
        discriminator: Mapping | None = None,
        adversarial_weight: float = 0.1,
        lr: float = 1e-3,
        discriminator_lr: float = 1e-4,
        weight_decay: float = 0.0,
        poly_decay: bool = True,
        input_spacing: float | Sequence[float] | None = None,
        patch_size: int = 48,
    ) -> None:
        super().__init__()
        if not adversarial_weight >= 0:
            raise ValueError(f"adversarial_weight must be >= 0, got {adversarial_weight!r}")
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.deformation_spec = DeformationSpec.from_dict(deformation)
        self.generator = FlowFieldGenerator(self.deformation_spec)
        self.segmenter = build_segmenter(SegmenterSpec.from_dict(segmenter), len(label_names))
        try:
            self.discriminator = SiameseDiscriminator(**dict(discriminator or {}))
        except TypeError as error:
            raise ValueError(f"discriminator spec {dict(discriminator or {})} does not fit SiameseDiscriminator "
                             f"(it takes in_channels and channels): {error}") from error

    # -- the client/server chain -------------------------------------------------------------

    def new_keys(self, n: int) -> list[DeformationKey]:
        """``n`` fresh secret keys, their seeds from torch's global generator (seeded by the run)."""
        return [self.deformation_spec.key(int(seed)) for seed in torch.randint(0, 2 ** 31 - 1, (n,))]

    def _keys(self, key: Keys, n: int) -> list[DeformationKey]:
        if key is None:
            return self.new_keys(n)
        if isinstance(key, DeformationKey):
            return [key] * n
        keys = list(key)
        if len(keys) != n:
            raise ValueError(f"{n} images but {len(keys)} deformation keys")
        return keys

    def deform(self, image: torch.Tensor, key: Keys = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Client: the deformed images (N, 1, D, H, W) and the secret inverse displacement (N, 3, D, H, W).

        ``key``: one key for every image, one per image, or None for fresh random keys.
        """
        image = image.float()
        forward, inverse = self.generator(image, self._keys(key, image.shape[0]))
        return warp(image, forward), inverse

    def segment_deformed(self, deformed: torch.Tensor) -> torch.Tensor:
        """Server: class probabilities (N, C, D, H, W) of deformed images."""
        return torch.softmax(self.segmenter(deformed).float(), dim=1)

    def restore(self, probabilities: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        """Client: the server's probabilities warped back to the original grid (they sum to 1)."""
        return warp_probabilities(probabilities.float(), inverse)

    def forward(self, image: torch.Tensor, key: Keys = None) -> torch.Tensor:
        """The whole chain: class probabilities (not logits) (N, C, D, H, W) on the original grid."""
        deformed, inverse = self.deform(image, key)
        return self.restore(self.segment_deformed(deformed), inverse)

    # -- training ----------------------------------------------------------------------------

    def _identity_terms(self, raw: Sequence[torch.Tensor], deformed: Sequence[torch.Tensor],
                        same: torch.Tensor) -> torch.Tensor:
        """Mean BCE of the discriminator on Privacy-Net's five pairs that involve a deformed image."""
        (x_a, x_b), (z_a, z_b) = raw, deformed
        ones = torch.ones_like(same)
        pairs = [(z_a, z_b, same), (x_a, z_a, ones), (x_b, z_b, ones), (x_a, z_b, same), (x_b, z_a, same)]
        return torch.stack([F.binary_cross_entropy_with_logits(self.discriminator(a, b).float(), label)
                            for a, b, label in pairs]).mean()

    def _unpack(self, batch) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        images = [batch[PAIR_IMAGE_A].float(), batch[PAIR_IMAGE_B].float()]
        targets = [one_hot(batch[PAIR_LABEL_A], self.num_classes), one_hot(batch[PAIR_LABEL_B], self.num_classes)]
        same = torch.as_tensor(batch[PAIR_SAME_PATIENT], dtype=torch.float32, device=images[0].device)
        return images, targets, same

    def training_step(self, batch, batch_idx):
        main_optimizer, discriminator_optimizer = self.optimizers()
        images, targets, same = self._unpack(batch)
        deformed, inverses = zip(*(self.deform(image) for image in images))

        self.toggle_optimizer(main_optimizer)
        restored = [self.restore(self.segment_deformed(z), inverse) for z, inverse in zip(deformed, inverses)]
        loss_segmenter = sum(restored_loss(p, t) for p, t in zip(restored, targets)) / 2
        loss = loss_segmenter
        adversarial = self.generator.net is not None and self.hparams.adversarial_weight > 0
        if adversarial:
            loss_adversarial = -self._identity_terms(images, deformed, same)
            loss = loss + self.hparams.adversarial_weight * loss_adversarial
        self.step_main(main_optimizer, loss)
        raw_term = F.binary_cross_entropy_with_logits(self.discriminator(*images).float(), same)
        loss_discriminator = (raw_term + 5 * self._identity_terms(images, [z.detach() for z in deformed], same)) / 6
        self.step_discriminator(discriminator_optimizer, loss_discriminator)

        n = images[0].shape[0]
        logs = {"train/loss": loss, "train/loss_segmenter": loss_segmenter,
                "train/loss_discriminator": loss_discriminator}
        if adversarial:
            logs["train/loss_adversarial"] = loss_adversarial
        self.log_dict(logs, batch_size=n)
        self.log_dice("train", "", torch.cat(restored), torch.cat(targets))
        return loss

    def validation_step(self, batch, batch_idx):
        images, targets, same = self._unpack(batch)
        n = images[0].shape[0]
        # Fixed keys per batch: the validation score does not change between epochs by chance.
        seeds = [[2 * (batch_idx * n + i) + side for i in range(n)] for side in (0, 1)]
        deformed, restored = [], []
        for image, side_seeds in zip(images, seeds):
            z, inverse = self.deform(image, [self.deformation_spec.key(seed) for seed in side_seeds])
            deformed.append(z)
            restored.append(self.restore(self.segment_deformed(z), inverse))
        loss = sum(restored_loss(p, t) for p, t in zip(restored, targets)) / 2
        # Same-patient accuracy on the deformed pairs (what obfuscation lowers) and on the raw scans.
        accuracy = ((self.discriminator(*deformed) > 0).float() == same).float().mean()
        accuracy_raw = ((self.discriminator(*images) > 0).float() == same).float().mean()
        self.log_dict({"val/loss": loss, "val/discriminator_accuracy": accuracy,
                       "val/discriminator_accuracy_raw": accuracy_raw}, batch_size=n, sync_dist=True)
        self.log_dice("val", "", torch.cat(restored), torch.cat(targets))
        return loss

    def main_parameters(self):
        return [*self.generator.parameters(), *self.segmenter.parameters()]

    def discriminator_parameters(self):
        return self.discriminator.parameters()
