"""Same-or-different-patient patch pairs: keys, shapes, patients, same location, determinism, errors."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import AFFINE, LABELS, SHAPE, write_nnunet_folder

from mixpriv.constants import (
    PAIR_IMAGE_A,
    PAIR_IMAGE_B,
    PAIR_LABEL_A,
    PAIR_LABEL_B,
    PAIR_SAME_PATIENT,
    TRAIN,
    VAL,
)
from mixpriv.data.folder import DatasetFolder
from mixpriv.data.pairs import (
    PairedPatchDataModule,
    PairedPatchDataset,
    PairedScans,
    PairKeys,
)

PATCH = 16
#: case -> (patient, split): two training patients with two scans, one with one; two validation patients.
PATIENTS = {"case000": ("P0", TRAIN), "case001": ("P0", TRAIN), "case002": ("P1", TRAIN), "case003": ("P1", TRAIN),
            "case004": ("P2", TRAIN), "case005": ("P3", VAL), "case006": ("P3", VAL), "case007": ("P4", VAL),
            "case008": ("P4", VAL)}


def write_paired_folder(root: Path, ramp: bool = False) -> Path:
    """The conftest folder, its cases given patients and splits; ``ramp``: every image the same coordinate ramp."""
    write_nnunet_folder(root, n_train=len(PATIENTS), n_test=0)
    if ramp:
        coordinates = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)
        for case in PATIENTS:
            nib.save(nib.Nifti1Image(coordinates, AFFINE), str(root / "imagesTr" / f"{case}_0000.nii.gz"))
    meta = json.loads((root / "dataset.json").read_text())
    meta["mixpriv"] = {"cases": {case: {"patient": patient, "split": split}
                                 for case, (patient, split) in PATIENTS.items()}}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def paired_datamodule(root: Path, **kwargs) -> PairedPatchDataModule:
    options = {"patch_size": PATCH, "batch_size": 4, "steps_per_epoch": 2, "val_pairs": 6, **kwargs}
    dm = PairedPatchDataModule(data_dir=str(root), **options)
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def paired(tmp_path_factory) -> PairedPatchDataModule:
    return paired_datamodule(write_paired_folder(tmp_path_factory.mktemp("pairs") / "Dataset002_Pairs"))


def test_batches_hold_both_patches_their_labels_and_the_flag(paired):
    batch = next(iter(paired.train_dataloader()))
    assert set(batch) == {PAIR_IMAGE_A, PAIR_LABEL_A, PAIR_IMAGE_B, PAIR_LABEL_B, PAIR_SAME_PATIENT}
    for key in (PAIR_IMAGE_A, PAIR_IMAGE_B):
        assert batch[key].shape == (4, 1, PATCH, PATCH, PATCH) and batch[key].dtype == torch.float32
    for key in (PAIR_LABEL_A, PAIR_LABEL_B):
        assert batch[key].shape == (4, 1, PATCH, PATCH, PATCH) and batch[key].dtype == torch.int64
        assert set(batch[key].unique().tolist()) <= set(LABELS.values())
        assert (batch[key] > 0).any()  # patches are centred in the brain
    assert batch[PAIR_SAME_PATIENT].shape == (4,) and batch[PAIR_SAME_PATIENT].dtype == torch.float32
    flags = torch.cat([b[PAIR_SAME_PATIENT] for b in paired.train_dataloader()])
    assert set(flags.tolist()) == {0.0, 1.0} and flags.sum() == len(flags) / 2  # half same-patient pairs
    assert len(paired.train_dataloader()) == 2


@pytest.mark.parametrize("split", [TRAIN, VAL])
def test_the_flag_tells_whether_the_cases_patient_ids_agree(paired, split):
    folder = DatasetFolder(paired.folder.root)
    dataset = PairedPatchDataset(paired.scans[split], PATCH)
    assert sorted(dataset.scans.case_ids) == sorted(c for c, (_, s) in PATIENTS.items() if s == split)
    specs = [dataset.spec(key) for key in PairKeys(40, seed=3)]
    for key, spec in zip(PairKeys(40, seed=3), specs):
        case_a, case_b = dataset.scans.case_ids[spec.scan_a], dataset.scans.case_ids[spec.scan_b]
        assert case_a != case_b
        assert spec.same_patient == (folder.case(case_a).patient_id == folder.case(case_b).patient_id)
        assert float(dataset[key][PAIR_SAME_PATIENT]) == float(spec.same_patient)
    assert {spec.same_patient for spec in specs} == {True, False}
    assert len({spec.corner for spec in specs}) > 10  # patches come from many places


def test_patches_are_cut_from_the_named_scans_at_one_corner(paired):
    dataset = PairedPatchDataset(paired.scans[TRAIN], PATCH)
    for key in PairKeys(8, seed=5):
        spec, item = dataset.spec(key), dataset[key]
        window = (slice(None), *(slice(c, c + PATCH) for c in spec.corner))
        torch.testing.assert_close(item[PAIR_IMAGE_A], dataset.scans.images[spec.scan_a][window])
        torch.testing.assert_close(item[PAIR_IMAGE_B], dataset.scans.images[spec.scan_b][window])
        assert torch.equal(item[PAIR_LABEL_B], dataset.scans.labels[spec.scan_b][window].long())


def test_both_patches_of_a_pair_come_from_the_same_place(tmp_path):
    # Every scan is the same coordinate ramp: two patches are equal exactly when cut at the same voxels.
    dm = paired_datamodule(write_paired_folder(tmp_path / "Dataset003_Ramp", ramp=True))
    for batch in [*dm.train_dataloader(), *dm.val_dataloader()]:
        assert torch.equal(batch[PAIR_IMAGE_A], batch[PAIR_IMAGE_B])
        assert not torch.equal(batch[PAIR_IMAGE_A][0], batch[PAIR_IMAGE_A][1])  # at different places per pair


def test_validation_pairs_are_fixed_and_training_pairs_change_every_epoch(paired):
    def images(loader):
        return torch.cat([batch[PAIR_IMAGE_A] for batch in loader])

    val = paired.val_dataloader()
    assert torch.equal(images(val), images(val))
    assert torch.equal(images(val), images(paired_datamodule(paired.folder.root).val_dataloader()))
    flags = torch.cat([batch[PAIR_SAME_PATIENT] for batch in val])
    assert flags.tolist().count(1.0) == 3
    train = paired.train_dataloader()
    assert not torch.equal(images(train), images(train))
    assert torch.equal(images(paired.train_dataloader()), images(paired.train_dataloader()))  # seeded


def test_scans_on_another_grid_are_resampled_onto_the_training_grid(tmp_path):
    root = write_paired_folder(tmp_path / "Dataset004_Grids")
    bigger = np.zeros((28, 24, 26), np.float32)
    bigger[:24, :, :24] = np.asanyarray(nib.load(str(root / "imagesTr" / "case005_0000.nii.gz")).dataobj)
    nib.save(nib.Nifti1Image(bigger, AFFINE), str(root / "imagesTr" / "case005_0000.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros(bigger.shape, np.uint8), AFFINE), str(root / "labelsTr" / "case005.nii.gz"))
    dm = paired_datamodule(root)
    assert dm.scans[VAL].shape == dm.scans[TRAIN].shape == SHAPE
    assert next(iter(dm.val_dataloader()))[PAIR_IMAGE_B].shape[2:] == (PATCH,) * 3


def test_splits_that_cannot_make_both_kinds_of_pair_are_refused(tiny_folder):
    images, labels = torch.zeros(2, 1, 4, 4, 4), torch.zeros(2, 1, 4, 4, 4, dtype=torch.int16)
    with pytest.raises(ValueError, match=r"split 'val' has 1 patient\(s\)"):
        PairedScans(images, labels, ["a", "b"], ["P0", "P0"], VAL)
    with pytest.raises(ValueError, match="no patient with two scans"):
        PairedScans(images, labels, ["a", "b"], ["P0", "P1"])
    with pytest.raises(ValueError, match="no patient with two scans"):  # conftest's folder: one scan per patient
        paired_datamodule(tiny_folder)
    with pytest.raises(ValueError, match="patch_size 8 exceeds"):
        PairedPatchDataset(PairedScans(images, labels, ["a", "b", "c"], ["P0", "P0", "P1"]), 8)
    with pytest.raises(ValueError, match="at least one pair"):
        PairKeys(0, seed=0)
