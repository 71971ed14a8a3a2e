"""The non-private baseline: the same U-Net++ trained on raw images."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from mixpriv.constants import IMAGE, LABEL
from mixpriv.lightning.base import SegmentationModuleBase
from mixpriv.lightning.losses import ce_dice_loss
from mixpriv.mixing.functional import one_hot
from mixpriv.networks import SegmenterSpec, build_segmenter


class BaselineSegmenter(SegmentationModuleBase):
    """U-Net++ on raw images, cross-entropy + soft Dice.

    Args:
        label_names: name -> value (from ``dataset.json``).
        segmenter: a :class:`~mixpriv.networks.SegmenterSpec` as a dict.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        poly_decay: decay the learning rate polynomially to 0 over training.
        input_spacing: voxel spacing (mm) the model expects, recorded for inference.
        patch_size: training patch side, reused for whole-volume inference.

    Example:
        >>> module = BaselineSegmenter({"background": 0, "fg": 1},
        ...     {"encoder_name": "mixpriv-light-8", "encoder_depth": 3, "decoder_channels": [16, 8, 8]})
        >>> module(torch.zeros(1, 1, 16, 16, 16)).shape
        torch.Size([1, 2, 16, 16, 16])
    """

    def __init__(
        self,
        label_names: Mapping[str, int],
        segmenter: Mapping,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        poly_decay: bool = True,
        input_spacing: float | None = None,
        patch_size: int = 48,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.segmenter = build_segmenter(SegmenterSpec.from_dict(segmenter), len(label_names))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Logits (N, C, D, H, W) for images (N, 1, D, H, W)."""
        return self.segmenter(image)

    def _step(self, batch, stage: str) -> torch.Tensor:
        image = batch[IMAGE]["data"].float()
        target = one_hot(batch[LABEL]["data"], self.num_classes)
        logits = self(image)
        loss = ce_dice_loss(logits, target)
        self.log(f"{stage}/loss", loss, batch_size=image.shape[0], prog_bar=True, sync_dist=stage != "train")
        self.log_dice(stage, "", torch.softmax(logits.float(), 1), target)
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        return self._step(batch, "val")
