"""Test-time augmentation by mixing: one target, K references, one batched server pass."""

from __future__ import annotations

from collections.abc import Sequence

import pytorch_lightning as pl
import torch

from mixpriv.constants import IMAGE
from mixpriv.inference.private import (
    UNMIX_METHODS,
    PrivateSegmentation,
    mix_with_references,
    mixing_settings,
    segment_mixtures,
    unmix_volumes,
)
from mixpriv.lightning.mixup import MixupPrivacyModule
from mixpriv.mixing.bank import ReferenceBank
from mixpriv.validation import InputError


class TTAEnsembler(pl.LightningModule):
    """Private whole-volume segmentation with K references (Eq. 5-6), with its variance.

    The ensembler is built around a trained :class:`MixupPrivacyModule` and the client's
    bank; it is an inference wrapper (not trained, not checkpointed: the bank is a secret).

    Args:
        model: trained segmenter + unmixer.
        bank: the client's reference bank.
        k: number of references mixed with each target.
        methods: unmixing methods to return (``learned``, ``naive``); the server runs once for all.
        lambda_range: range of the weights; defaults to the model's training range.
        patch_size: grid patch side; defaults to the training patch size.
        overlap: grid overlap; default a quarter of a patch.
        seed: seed of the draws of references and weights (``None``: fresh randomness).
        references_per_mix: R, references in each mixture's composite (K-way mixing); defaults
            to the model's (1 for models trained before K-way mixing).
        dirichlet_alpha: concentration of the Dirichlet weights of the R references; defaults
            to the model's.

    Example:
        >>> ensembler = TTAEnsembler(model, bank, k=8)  # doctest: +SKIP
        >>> result = ensembler(image)["learned"]  # doctest: +SKIP
        >>> result.labels.shape, result.variance.shape  # doctest: +SKIP
    """

    def __init__(
        self,
        model: MixupPrivacyModule,
        bank: ReferenceBank,
        k: int = 8,
        methods: Sequence[str] = ("learned",),
        lambda_range: Sequence[float] | None = None,
        patch_size: int | None = None,
        overlap: int | None = None,
        seed: int | None = None,
        references_per_mix: int | None = None,
        dirichlet_alpha: float | None = None,
    ) -> None:
        super().__init__()
        unknown = set(methods) - set(UNMIX_METHODS)
        if unknown:
            raise InputError(f"unknown unmixing method(s) {sorted(unknown)}; choose from {UNMIX_METHODS}")
        if bank.num_classes != model.num_classes:
            raise InputError(f"the bank has {bank.num_classes} labels but the model predicts {model.num_classes}")
        self.model = model
        self.bank = bank
        self.k = k
        self.methods = tuple(methods)
        self.lambda_range = tuple(lambda_range or model.hparams.lambda_range)
        self.patch_size = patch_size or model.hparams.patch_size
        self.overlap = overlap
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.references_per_mix, self.dirichlet_alpha = mixing_settings(model.hparams, references_per_mix,
                                                                         dirichlet_alpha, len(bank))

    def forward(self, image: torch.Tensor) -> dict[str, PrivateSegmentation]:
        """Segment a preprocessed image (1, D, H, W); returns one result per method."""
        mixtures = mix_with_references(image, self.bank, self.k, self.lambda_range, self.generator,
                                       references_per_mix=self.references_per_mix,
                                       dirichlet_alpha=self.dirichlet_alpha)
        self.model.eval()
        mixed_probs = segment_mixtures(self.model.segment_mixture, mixtures.mixtures, self.patch_size,
                                       self.overlap, device=self.device)
        return {
            method: PrivateSegmentation(unmix_volumes(
                mixed_probs, mixtures.reference_one_hot, mixtures.lambdas, method, self.model.unmix,
                self.patch_size, self.overlap, device=self.device))
            for method in self.methods
        }

    def predict_step(self, batch, batch_idx: int) -> list[dict[str, PrivateSegmentation]]:
        """Whole-volume subject batches (e.g. from a ``tio.SubjectsLoader``)."""
        return [self(image) for image in batch[IMAGE]["data"]]
