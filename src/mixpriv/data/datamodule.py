"""LightningDataModule: nnU-Net-layout folder -> TorchIO subjects -> patch queue -> batches.

Training patches come from a ``tio.Queue`` with a label-aware sampler. With ``mixing``
enabled, every loaded volume is mixed with a random reference of the training split by
:class:`~mixpriv.mixing.RandomMix` before patches are drawn, so patches carry the mixed image,
the reference's one-hot label and the weight lambda. Under DDP the subjects are sharded per
process with a ``DistributedSampler`` passed to the queue, as TorchIO documents (and the
Trainer must not add its own sampler: ``use_distributed_sampler=False``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import pytorch_lightning as pl
import torch
import torchio as tio
from torch.utils.data import DistributedSampler
from tqdm.auto import tqdm

from mixpriv.constants import (
    DEFAULT_DIRICHLET_ALPHA,
    DEFAULT_LAMBDA_RANGE,
    DEFAULT_REFERENCES_PER_MIX,
    IMAGE,
    LABEL,
    TRAIN,
    VAL,
)
from mixpriv.data.folder import DatasetFolder, validate_case
from mixpriv.data.preprocessing import preprocessing
from mixpriv.data.randomisation import DomainRandomisation
from mixpriv.data.sources import resolve_data_dir
from mixpriv.geometry import GridSpace, resample_into
from mixpriv.mixing import RandomMix, ReferenceBank
from mixpriv.mixing.settings import MixingSettings
from mixpriv.validation import check_lambda_range, check_references_per_mix

log = logging.getLogger(__name__)


def bank_from_cases(folder: DatasetFolder, split: str = TRAIN, spacing=None, max_references: int | None = None,
                    progress: bool = True) -> ReferenceBank:
    """Preprocess the labelled cases of a split into a reference bank that records its space and patients.

    The first case, preprocessed (canonical orientation, ``spacing``), sets the bank's grid; every
    other case is resampled onto that grid by world coordinates (its labels by nearest
    neighbour), so references lie where their anatomy is, whatever their shape or field of view.
    """
    cases = [c for c in folder.cases(split) if c.label_path is not None][:max_references]
    if not cases:
        raise ValueError(f"split {split!r} of {folder.root} has no labelled case to build references from")
    transform = preprocessing(spacing)
    images, labels, space = [], [], None
    for case in tqdm(cases, desc=f"references ({split})", disable=not progress, leave=False):
        subject = transform(case.to_subject())
        space = space or GridSpace.of(subject[IMAGE])
        here = GridSpace.of(subject[IMAGE])
        images.append(resample_into(subject[IMAGE].data[:1].float(), here, space, label=False))
        labels.append(resample_into(subject[LABEL].data, here, space, label=True)[0].long())
    return ReferenceBank(torch.stack(images), torch.stack(labels), folder.labels, [c.case_id for c in cases],
                         space, [c.patient_id for c in cases])


class MixprivDataModule(pl.LightningDataModule):
    """Patch batches for the baseline (``mixing=False``) or Mixup-Privacy (``mixing=True``).

    Args:
        data_dir: nnU-Net v2 folder; ``None`` uses the embedded cohort.
        embedded_spacing: spacing (mm) of the embedded cohort used when ``data_dir`` is ``None``.
        patch_size: cubic patch side (voxels).
        batch_size: patches per batch.
        samples_per_volume: patches drawn from each loaded (and mixed) volume.
        queue_length: patches held by the queue.
        num_workers: processes loading volumes for the queue.
        label_probabilities: label value -> probability of a patch centre; default uniform over labels.
        mixing: mix every volume with a random training reference (Mixup-Privacy).
        lambda_range: bounds of the uniform mixing weight.
        spacing: resample to this spacing (mm) when given.
        val_samples_per_volume: patches per validation volume.
        validate_files: check every file (dims, finite values, shapes, affines, labels) in ``setup``.
        references_per_mix: R, distinct training references mixed with each volume (K-way
            mixing; 1: the paper's scheme). At most the number of training cases minus one.
        dirichlet_alpha: concentration of the Dirichlet weights of the R references.
        randomisation: domain randomisation of the training volumes (a recipe's ``randomisation``
            block, :class:`~mixpriv.data.randomisation.DomainRandomisation`; ``{}`` for its
            defaults, ``None`` for none): applied to each training target before it is mixed, never
            to validation volumes nor to the references.

    Example:
        >>> dm = MixprivDataModule(data_dir=None, patch_size=48, mixing=True)  # doctest: +SKIP
        >>> dm.setup("fit"); batch = next(iter(dm.train_dataloader()))  # doctest: +SKIP
    """

    def __init__(
        self,
        data_dir: str | None = None,
        embedded_spacing: float = 2.0,
        patch_size: int = 48,
        batch_size: int = 4,
        samples_per_volume: int = 8,
        queue_length: int = 64,
        num_workers: int = 0,
        label_probabilities: Mapping[int, float] | None = None,
        mixing: bool = False,
        lambda_range: Sequence[float] = DEFAULT_LAMBDA_RANGE,
        spacing: float | None = None,
        val_samples_per_volume: int = 4,
        validate_files: bool = True,
        references_per_mix: int = DEFAULT_REFERENCES_PER_MIX,
        dirichlet_alpha: float = DEFAULT_DIRICHLET_ALPHA,
        randomisation: Mapping | None = None,
    ) -> None:
        super().__init__()
        check_lambda_range(lambda_range)
        check_references_per_mix(references_per_mix, dirichlet_alpha)
        self.randomisation = DomainRandomisation.from_dict(randomisation) if randomisation is not None else None
        self.save_hyperparameters()
        self.folder: DatasetFolder | None = None
        self.bank: ReferenceBank | None = None
        self._subject_samplers: list[DistributedSampler] = []

    def setup(self, stage: str | None = None) -> None:
        if self.folder is not None:
            return
        self.folder = DatasetFolder(resolve_data_dir(self.hparams.data_dir, self.hparams.embedded_spacing))
        if self.hparams.validate_files:
            for case in tqdm(self.folder.cases(TRAIN) + self.folder.cases(VAL), desc="checking files", leave=False):
                validate_case(case, self.folder.labels.values())
        if self.hparams.mixing:
            self.bank = bank_from_cases(self.folder, TRAIN, self.hparams.spacing)

    @property
    def num_classes(self) -> int:
        return self.folder.num_classes

    @property
    def mixing_settings(self) -> MixingSettings:
        """The λ range, references per mixture and Dirichlet α the training volumes are mixed with."""
        return MixingSettings.of_model(self.hparams)

    def _transform(self, train: bool) -> tio.Compose:
        """Preprocessing, then (training) domain randomisation, then mixing; the outer steps do not copy
        again what the dataset and the preprocessing already copied (``tio.SubjectsDataset`` hands each
        load a fresh subject)."""
        transforms = [preprocessing(self.hparams.spacing)]
        if train and self.randomisation is not None:
            transforms.append(self.randomisation.build(copy=False))
        if self.hparams.mixing:
            transforms.append(RandomMix(self.bank, mixing=self.mixing_settings, copy=False))
        return tio.Compose(transforms, copy=False)

    def _sampler(self) -> tio.LabelSampler:
        probabilities = self.hparams.label_probabilities
        if probabilities is None:
            probabilities = {value: 1.0 for value in self.folder.labels.values()}
        probabilities = {int(k): float(v) for k, v in probabilities.items()}
        return tio.LabelSampler(self.hparams.patch_size, label_name=LABEL, label_probabilities=probabilities)

    def _queue(self, split: str, samples_per_volume: int, shuffle: bool) -> tio.Queue:
        subjects = [case.to_subject() for case in self.folder.cases(split)]
        if not subjects:
            raise ValueError(f"split {split!r} of {self.folder.root} is empty")
        dataset = tio.SubjectsDataset(subjects, transform=self._transform(train=split == TRAIN))
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        subject_sampler = DistributedSampler(dataset, shuffle=shuffle) if distributed else None
        if subject_sampler is not None:
            self._subject_samplers.append(subject_sampler)
        return tio.Queue(
            dataset,
            max_length=max(self.hparams.queue_length, samples_per_volume),
            samples_per_volume=samples_per_volume,
            sampler=self._sampler(),
            num_workers=self.hparams.num_workers,
            subject_sampler=subject_sampler,
            shuffle_subjects=shuffle and subject_sampler is None,
            shuffle_patches=shuffle,
        )

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle the per-process subject shards (called by the training modules)."""
        for sampler in self._subject_samplers:
            sampler.set_epoch(epoch)

    def train_dataloader(self) -> tio.SubjectsLoader:
        queue = self._queue(TRAIN, self.hparams.samples_per_volume, shuffle=True)
        return tio.SubjectsLoader(queue, batch_size=self.hparams.batch_size, num_workers=0)

    def val_dataloader(self) -> tio.SubjectsLoader:
        queue = self._queue(VAL, self.hparams.val_samples_per_volume, shuffle=False)
        return tio.SubjectsLoader(queue, batch_size=self.hparams.batch_size, num_workers=0)
