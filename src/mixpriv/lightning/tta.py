"""Test-time augmentation by mixing: one target, K references, one batched server pass."""

from __future__ import annotations

from collections.abc import Sequence

import pytorch_lightning as pl
import torch

from mixpriv.constants import IMAGE
from mixpriv.inference.mixtures import client_generator
from mixpriv.inference.pipeline import (
    PrivatePipeline,
    PrivateSegmentation,
    check_methods,
)
from mixpriv.inference.scans import check_key_for_model
from mixpriv.lightning.mixup import MixupPrivacyModule
from mixpriv.mixing.bank import ReferenceBank
from mixpriv.mixing.settings import MixingSettings


class TTAEnsembler(pl.LightningModule):
    """Private whole-volume segmentation with K references (Eq. 5-6), with its variance.

    The ensembler is built around a trained :class:`MixupPrivacyModule` and the client's
    bank; it is an inference wrapper (not trained, not checkpointed: the bank is a secret)
    over :class:`~mixpriv.inference.pipeline.PrivatePipeline`.

    Args:
        model: trained segmenter + unmixer.
        bank: the client's reference bank.
        k: number of references mixed with each target.
        methods: unmixing methods to return (``learned``, ``naive``); the server runs once for all.
        mixing: how to mix; defaults to the model's training settings (λ range, references per
            mixture, Dirichlet α). ``MixingSettings.of_model(model.hparams, lambda_range=...)``
            changes one of them.
        patch_size: grid patch side; defaults to the training patch size.
        overlap: least overlap of the grid's patches; default a quarter of a patch.
        seed: seed of the draws of references and weights (``None``: fresh randomness; a fixed seed
            only reproduces a run, and is warned about: see :func:`~mixpriv.inference.mixtures.client_generator`).

    Example:
        >>> ensembler = TTAEnsembler(model, bank, k=8)  # doctest: +SKIP
        >>> scan = prepare_scan("scan.nii.gz", TemplateSpace.of_key(bank))  # doctest: +SKIP
        >>> result = ensembler(scan.image)["learned"]  # doctest: +SKIP
        >>> result.labels.shape, result.variance.shape  # doctest: +SKIP
    """

    def __init__(
        self,
        model: MixupPrivacyModule,
        bank: ReferenceBank,
        k: int = 8,
        methods: Sequence[str] = ("learned",),
        mixing: MixingSettings | None = None,
        patch_size: int | None = None,
        overlap: int | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        self.methods = check_methods(methods)
        check_key_for_model(bank, model.num_classes, model.hparams.get("input_spacing"))
        self.model = model
        self.bank = bank
        self.k = k
        self.mixing = (mixing or MixingSettings.of_model(model.hparams)).check_bank(len(bank))
        self.patch_size = patch_size or model.hparams.patch_size
        self.overlap = overlap
        self.generator = client_generator(seed)

    def forward(self, image: torch.Tensor) -> dict[str, PrivateSegmentation]:
        """Segment an image (1, D, H, W) on the bank's grid; returns one result per method.

        Place a scan on that grid with :func:`mixpriv.inference.scans.prepare_scan` (by its
        affine, or registered), which also carries the results back onto the scan's voxels.
        """
        pipeline = PrivatePipeline.of_model(self.model, mixing=self.mixing, patch_size=self.patch_size,
                                            overlap=self.overlap, device=self.device)
        return pipeline(image, self.bank, self.k, self.methods, self.generator).results

    def predict_step(self, batch, batch_idx: int) -> list[dict[str, PrivateSegmentation]]:
        """Whole-volume subject batches (e.g. from a ``tio.SubjectsLoader``)."""
        return [self(image) for image in batch[IMAGE]["data"]]
