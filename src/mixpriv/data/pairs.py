"""Same-or-different-patient patch pairs for the Siamese discriminators of the compared systems.

Privacy-Net and Deformation-Proxy train their client-side transform against a discriminator that
sees two scans and guesses whether one patient took both. :class:`PairedPatchDataModule` serves
those pairs: half of them are two scans of one patient, the rest two scans of two patients, and
both patches of a pair are cut at the same place (the same voxels of one shared grid).

Every case of a split is preprocessed once (:func:`~mixpriv.data.preprocessing.preprocessing`)
and held in memory; cases are resampled by world coordinates onto the grid of the first training
case (labels by nearest neighbour), as the reference bank does, so "the same voxels" means "the
same place in the world" even when scans differ in shape or field of view. On the embedded cohort
all scans already share one grid and nothing is resampled. Patches are then cut by slicing.

Patch centres are drawn, like Privacy-Net's, from a brain mask: the voxels that are foreground in
at least one scan of the split. A pair is drawn from an integer key alone (its lowest bit says
same patient or not), so a batch does not depend on the number of loader processes, and the
validation pairs, drawn from fixed keys, are the same at every validation.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from mixpriv.constants import (
    IMAGE,
    LABEL,
    PAIR_IMAGE_A,
    PAIR_IMAGE_B,
    PAIR_LABEL_A,
    PAIR_LABEL_B,
    PAIR_SAME_PATIENT,
    TRAIN,
    VAL,
)
from mixpriv.data.folder import DatasetFolder, validate_case
from mixpriv.data.preprocessing import preprocessing
from mixpriv.data.sources import resolve_data_dir
from mixpriv.geometry import GridSpace, resample_into

log = logging.getLogger(__name__)

#: Keys are drawn below this bound, then doubled and given the same-patient bit.
_KEY_BOUND = 2**62


@dataclass(frozen=True)
class PairSpec:
    """What a key draws: two scans (indices into the split's cases), the patch corner, same patient or not."""

    scan_a: int
    scan_b: int
    corner: tuple[int, int, int]
    same_patient: bool


class PairedScans:
    """The preprocessed scans of one split on one grid, grouped by patient.

    Args:
        images: (S, 1, D, H, W) float images.
        labels: (S, 1, D, H, W) integer label maps.
        case_ids: the S case ids.
        patient_ids: the patient of each scan.
        split: the split's name, for the messages.

    Raises:
        ValueError: fewer than two patients, or no patient with two scans.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, case_ids: Sequence[str],
                 patient_ids: Sequence[str], split: str = TRAIN) -> None:
        by_patient: dict[str, list[int]] = {}
        for index, patient in enumerate(patient_ids):
            by_patient.setdefault(patient, []).append(index)
        if len(by_patient) < 2:
            raise ValueError(f"split {split!r} has {len(by_patient)} patient(s); different-patient pairs need "
                             "at least 2")
        repeated = [scans for scans in by_patient.values() if len(scans) >= 2]
        if not repeated:
            raise ValueError(f"split {split!r} has no patient with two scans ({len(patient_ids)} scans of "
                             f"{len(by_patient)} patients): same-patient pairs need repeated scans")
        self.images, self.labels = images, labels
        self.case_ids, self.patient_ids = list(case_ids), list(patient_ids)
        self.patients = list(by_patient.values())
        self.repeated = repeated
        self.shape = tuple(images.shape[2:])
        foreground = (labels > 0).any(0)[0]
        self.centres = torch.nonzero(foreground if foreground.any() else torch.ones_like(foreground)).int()

    def __len__(self) -> int:
        return len(self.case_ids)


class PairedPatchDataset(Dataset):
    """Patch pairs of a :class:`PairedScans`, indexed by integer keys (see :class:`PairKeys`)."""

    def __init__(self, scans: PairedScans, patch_size: int) -> None:
        if any(side < patch_size for side in scans.shape):
            raise ValueError(f"patch_size {patch_size} exceeds the scans' grid {scans.shape}")
        self.scans = scans
        self.patch_size = patch_size

    def spec(self, key: int) -> PairSpec:
        """The pair that ``key`` draws: odd keys are same-patient pairs."""
        rng = np.random.default_rng(key >> 1)
        same = bool(key & 1)
        scans = self.scans
        if same:
            scan_a, scan_b = rng.choice(scans.repeated[rng.integers(len(scans.repeated))], 2, replace=False)
        else:
            patient_a, patient_b = rng.choice(len(scans.patients), 2, replace=False)
            scan_a = rng.choice(scans.patients[patient_a])
            scan_b = rng.choice(scans.patients[patient_b])
        centre = scans.centres[rng.integers(len(scans.centres))].numpy()
        corner = np.clip(centre - self.patch_size // 2, 0, np.array(scans.shape) - self.patch_size)
        return PairSpec(int(scan_a), int(scan_b), tuple(int(c) for c in corner), same)

    def __getitem__(self, key: int) -> dict[str, torch.Tensor]:
        spec = self.spec(key)
        window = (slice(None), *(slice(c, c + self.patch_size) for c in spec.corner))
        images, labels = self.scans.images, self.scans.labels
        return {
            PAIR_IMAGE_A: images[spec.scan_a][window].clone(),
            PAIR_LABEL_A: labels[spec.scan_a][window].long(),
            PAIR_IMAGE_B: images[spec.scan_b][window].clone(),
            PAIR_LABEL_B: labels[spec.scan_b][window].long(),
            PAIR_SAME_PATIENT: torch.tensor(float(spec.same_patient)),
        }


class PairKeys(Sampler[int]):
    """Keys of ``length`` pairs, half of them (in random order) same-patient pairs.

    With ``fixed=True`` every pass yields the same keys (validation); otherwise each pass draws new
    ones from a generator seeded once (training: new pairs every epoch, reproducibly).

    Example:
        >>> keys = list(PairKeys(6, seed=0))
        >>> sum(key & 1 for key in keys), keys == list(PairKeys(6, seed=0))
        (3, True)
    """

    def __init__(self, length: int, seed: int | Sequence[int], fixed: bool = False) -> None:
        if length < 1:
            raise ValueError(f"a pair loader needs at least one pair, got {length}")
        self.length = length
        self._rng = np.random.default_rng(seed)
        self._fixed = self._draw() if fixed else None

    def _draw(self) -> list[int]:
        same = self._rng.permutation(self.length) % 2
        return [int(2 * key + flag) for key, flag in zip(self._rng.integers(0, _KEY_BOUND, self.length), same)]

    def __iter__(self) -> Iterator[int]:
        return iter(self._fixed if self._fixed is not None else self._draw())

    def __len__(self) -> int:
        return self.length


def load_split(folder: DatasetFolder, split: str, spacing=None, space: GridSpace | None = None,
               progress: bool = True) -> tuple[PairedScans, GridSpace]:
    """Preprocess every labelled case of ``split`` onto ``space`` (default: the first case's grid)."""
    cases = [case for case in folder.cases(split) if case.label_path is not None]
    if not cases:
        raise ValueError(f"split {split!r} of {folder.root} has no labelled case")
    transform = preprocessing(spacing)
    images, labels = [], []
    for case in tqdm(cases, desc=f"pair scans ({split})", disable=not progress, leave=False):
        subject = transform(case.to_subject())
        here = GridSpace.of(subject[IMAGE])
        space = space or here
        images.append(resample_into(subject[IMAGE].data[:1].float(), here, space, label=False))
        labels.append(resample_into(subject[LABEL].data, here, space, label=True).to(torch.int16))
    scans = PairedScans(torch.stack(images), torch.stack(labels), [c.case_id for c in cases],
                        [c.patient_id for c in cases], split)
    return scans, space


class PairedPatchDataModule(pl.LightningDataModule):
    """Batches of patch pairs for Privacy-Net and Deformation-Proxy.

    A batch is a dict: ``PAIR_IMAGE_A`` / ``PAIR_IMAGE_B`` (N, 1, P, P, P) float patches,
    ``PAIR_LABEL_A`` / ``PAIR_LABEL_B`` (N, 1, P, P, P) int64 label values, both cut at the same
    voxels, and ``PAIR_SAME_PATIENT`` (N,) float, 1.0 where one patient took both scans.

    Args:
        data_dir: nnU-Net v2 folder or embedded cohort (:func:`~mixpriv.data.sources.resolve_data_dir`);
            ``None`` is the embedded tissue cohort.
        embedded_spacing: spacing (mm) of the embedded cohort used when ``data_dir`` names one.
        patch_size: cubic patch side (voxels).
        batch_size: pairs per batch.
        steps_per_epoch: training batches per epoch (new random pairs every epoch).
        val_pairs: validation pairs, the same at every validation.
        spacing: resample to this spacing (mm) when given.
        num_workers: processes cutting patches (they share the preloaded scans).
        seed: seed of the training and validation pairs.
        validate_files: check every file (dims, finite values, shapes, affines, labels) in ``setup``.

    Example:
        >>> dm = PairedPatchDataModule(data_dir=None, patch_size=48, batch_size=2)  # doctest: +SKIP
        >>> dm.setup("fit"); batch = next(iter(dm.train_dataloader()))  # doctest: +SKIP
        >>> batch[PAIR_IMAGE_A].shape, batch[PAIR_SAME_PATIENT]  # doctest: +SKIP
        (torch.Size([2, 1, 48, 48, 48]), tensor([1., 0.]))
    """

    def __init__(
        self,
        data_dir: str | None = None,
        embedded_spacing: float = 2.0,
        patch_size: int = 48,
        batch_size: int = 2,
        steps_per_epoch: int = 100,
        val_pairs: int = 16,
        spacing: float | None = None,
        num_workers: int = 0,
        seed: int = 0,
        validate_files: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.folder: DatasetFolder | None = None
        self.space: GridSpace | None = None
        self.scans: dict[str, PairedScans] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.folder is not None:
            return
        folder = DatasetFolder(resolve_data_dir(self.hparams.data_dir, self.hparams.embedded_spacing))
        if self.hparams.validate_files:
            for case in tqdm(folder.cases(TRAIN) + folder.cases(VAL), desc="checking files", leave=False):
                validate_case(case, folder.labels.values())
        self.scans[TRAIN], self.space = load_split(folder, TRAIN, self.hparams.spacing)
        self.scans[VAL], _ = load_split(folder, VAL, self.hparams.spacing, self.space)
        self.folder = folder
        log.info("pairs from %d training and %d validation scans on %s", len(self.scans[TRAIN]),
                 len(self.scans[VAL]), self.space)

    @property
    def num_classes(self) -> int:
        return self.folder.num_classes

    def _loader(self, split: str, keys: PairKeys) -> DataLoader:
        workers = self.hparams.num_workers
        return DataLoader(PairedPatchDataset(self.scans[split], self.hparams.patch_size), self.hparams.batch_size,
                          sampler=keys, num_workers=workers, persistent_workers=workers > 0)

    def train_dataloader(self) -> DataLoader:
        rank = self.trainer.global_rank if self.trainer is not None else 0
        keys = PairKeys(self.hparams.steps_per_epoch * self.hparams.batch_size, [self.hparams.seed, 0, rank])
        return self._loader(TRAIN, keys)

    def val_dataloader(self) -> DataLoader:
        return self._loader(VAL, PairKeys(self.hparams.val_pairs, [self.hparams.seed, 1], fixed=True))
