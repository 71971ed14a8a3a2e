"""Mixup-Privacy trained end to end: segmenter on mixtures, unmixer back to the target.

For a patch batch mixed by :class:`~mixpriv.mixing.RandomMix` (image ``m``, target label
``y``, reference one-hot ``y_r``, weight ``lam``):

    y_m  = lam * y + (1 - lam) * y_r          (Eq. 3, the server's training target)
    p_m  = softmax(S(m))                      (server)
    y^   = U(p_m, y_r, lam)                   (client, learned unmixing)
    loss = CE+Dice(S(m), y_m) + CE+Dice(y^, y)

The unmixer's loss back-propagates into the segmenter (end-to-end training). With K-way
mixing, ``y_r`` is the composite reference's label (a weighted mixture of R one-hot maps) and
the same losses apply.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from mixpriv.constants import (
    DEFAULT_DIRICHLET_ALPHA,
    DEFAULT_LAMBDA_RANGE,
    DEFAULT_REFERENCES_PER_MIX,
    IMAGE,
    LABEL,
    MIX_LAMBDA,
    REFERENCE_LABEL,
)
from mixpriv.lightning.base import SegmentationModuleBase
from mixpriv.lightning.losses import ce_dice_loss
from mixpriv.mixing.functional import mix, naive_unmix, one_hot, probabilities_from_unmixed
from mixpriv.networks import ContextAdaINUnmixer, SegmenterSpec, UnmixerSpec, build_segmenter, build_unmixer
from mixpriv.validation import check_references_per_mix


class MixupPrivacyModule(SegmentationModuleBase):
    """Segmenter (server) + AdaIN unmixer (client), trained jointly.

    Args:
        label_names: name -> value (from ``dataset.json``).
        segmenter: segmenter spec (dict).
        unmixer: unmixer spec (dict).
        lambda_range: range of lambda used in training, recorded for inference.
        unmix_loss_weight: weight of the unmixer's loss.
        lr, weight_decay, poly_decay, input_spacing, patch_size: as in the baseline.
        references_per_mix: R, references mixed with each target (K-way mixing, 1: the paper's
            scheme); the data must be mixed likewise (a recipe sets it once, in ``model:``).
            Recorded for the model card and used by inference (TTA, the server client).
        dirichlet_alpha: concentration of the Dirichlet weights of the R references.

    Checkpoints and cards written before K-way mixing lack the last two: they load with the
    defaults, the single-reference scheme they were trained with.

    Example:
        >>> module = MixupPrivacyModule({"background": 0, "fg": 1},
        ...     {"encoder_name": "mixpriv-light-8", "encoder_depth": 3, "decoder_channels": [16, 8, 8]})
        >>> probs = module.segment_mixture(torch.zeros(2, 1, 16, 16, 16))
        >>> module.unmix(probs, probs, torch.tensor([0.7, 0.9])).shape
        torch.Size([2, 2, 16, 16, 16])
    """

    def __init__(
        self,
        label_names: Mapping[str, int],
        segmenter: Mapping,
        unmixer: Mapping | None = None,
        lambda_range: Sequence[float] = DEFAULT_LAMBDA_RANGE,
        unmix_loss_weight: float = 1.0,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        poly_decay: bool = True,
        input_spacing: float | None = None,
        patch_size: int = 48,
        references_per_mix: int = DEFAULT_REFERENCES_PER_MIX,
        dirichlet_alpha: float = DEFAULT_DIRICHLET_ALPHA,
    ) -> None:
        super().__init__()
        check_references_per_mix(references_per_mix, dirichlet_alpha)
        self.save_hyperparameters()
        self.segmenter = build_segmenter(SegmenterSpec.from_dict(segmenter), len(label_names))
        self.unmixer = build_unmixer(len(label_names), UnmixerSpec.from_dict(unmixer or {}))

    def segment_mixture(self, mixture: torch.Tensor) -> torch.Tensor:
        """Server side: class probabilities (N, C, ...) of mixed images (N, 1, ...)."""
        return torch.softmax(self.segmenter(mixture).float(), dim=1)

    def unmix(self, mixed_probs: torch.Tensor, reference_one_hot: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """Client side, learned: target class probabilities from the server's output."""
        return torch.softmax(self.unmixer(mixed_probs, reference_one_hot, lam).float(), dim=1)

    @property
    def unmixes_whole_volumes(self) -> bool:
        """Whether the unmixer is the coarse-context one, which unmixes whole stitched volumes
        (:func:`mixpriv.inference.coarse_context.unmix_volumes`) rather than each patch."""
        return isinstance(self.unmixer, ContextAdaINUnmixer)

    def _step(self, batch, stage: str) -> torch.Tensor:
        mixture = batch[IMAGE]["data"].float()
        target = one_hot(batch[LABEL]["data"], self.num_classes)
        reference = batch[REFERENCE_LABEL]["data"].float()
        lam = torch.as_tensor(batch[MIX_LAMBDA], dtype=torch.float32, device=mixture.device)
        mixed_target = mix(target, reference, lam)
        mixed_logits = self.segmenter(mixture)
        mixed_probs = torch.softmax(mixed_logits.float(), dim=1)
        unmixed_logits = self.unmixer(mixed_probs, reference, lam)
        loss_segmenter = ce_dice_loss(mixed_logits, mixed_target)
        loss_unmixer = ce_dice_loss(unmixed_logits, target)
        loss = loss_segmenter + self.hparams.unmix_loss_weight * loss_unmixer
        n = mixture.shape[0]
        self.log_dict({f"{stage}/loss": loss, f"{stage}/loss_segmenter": loss_segmenter,
                       f"{stage}/loss_unmixer": loss_unmixer}, batch_size=n, sync_dist=stage != "train")
        self.log_dice(stage, "learned_", torch.softmax(unmixed_logits.float(), 1), target)
        if stage != "train":
            naive = probabilities_from_unmixed(naive_unmix(mixed_probs, reference, lam))
            self.log_dice(stage, "naive_", naive, target)
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        return self._step(batch, "val")
