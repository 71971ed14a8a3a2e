"""nnU-Net v2 dataset folders: dataset.json checks, splits, missing files, label set from the JSON."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import AFFINE, LABELS, TINY_SEGMENTER, TINY_UNMIXER, phantom, write_nnunet_folder

from mixpriv.constants import IMAGE, LABEL, MIX_LAMBDA, REFERENCE_LABEL, SPLITS, TEST, TRAIN, VAL
from mixpriv.data.datamodule import MixprivDataModule
from mixpriv.data.folder import DatasetFolder, load_dataset_json
from mixpriv.lightning.baseline import BaselineSegmenter
from mixpriv.lightning.mixup import MixupPrivacyModule
from mixpriv.validation import InputError

THREE_LABELS = {"background": 0, "shell": 1, "core": 2}


def _meta(root: Path) -> dict:
    return json.loads((root / "dataset.json").read_text())


def _write_meta(root: Path, meta: dict) -> None:
    (root / "dataset.json").write_text(json.dumps(meta))


def _splits(folder: DatasetFolder) -> dict[str, list[str]]:
    return {split: [c.case_id for c in folder.cases(split)] for split in SPLITS}


# ----------------------------------------------------------------------------- dataset.json


def test_tiny_folder_reads(tiny_folder):
    folder = DatasetFolder(tiny_folder)
    assert folder.labels == LABELS
    assert folder.num_classes == 4
    assert folder.label_names == ["background", "CSF", "GM", "WM"]
    assert folder.n_channels == 1
    splits = _splits(folder)
    assert splits[TEST] == ["case004", "case005"]
    assert sorted(splits[TRAIN] + splits[VAL]) == ["case000", "case001", "case002", "case003"]
    assert len(splits[VAL]) == 1  # 20 % of 4 patients, at least one
    case = folder.case("case004")
    assert case.label_path is not None and case.label_path.name == "case004.nii.gz"
    subject = case.to_subject()
    assert subject["case_id"] == "case004" and subject["patient_id"] == "case004"
    assert subject[IMAGE].spatial_shape == (24, 24, 24)
    with pytest.raises(KeyError, match="case999"):
        folder.case("case999")
    with pytest.raises(ValueError, match="unknown split"):
        folder.cases("training")


def test_missing_folder(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        DatasetFolder(tmp_path / "nowhere")


def test_missing_dataset_json(tiny_folder):
    (tiny_folder / "dataset.json").unlink()
    with pytest.raises(InputError, match="dataset.json is missing"):
        DatasetFolder(tiny_folder)


def test_malformed_dataset_json(tiny_folder):
    (tiny_folder / "dataset.json").write_text('{"labels": {"background": 0,')
    with pytest.raises(InputError, match="dataset.json is not valid JSON"):
        DatasetFolder(tiny_folder)
    (tiny_folder / "dataset.json").write_text("[1, 2, 3]")
    with pytest.raises(InputError, match="must hold a JSON object"):
        DatasetFolder(tiny_folder)


@pytest.mark.parametrize("key", ["channel_names", "labels", "file_ending"])
def test_dataset_json_missing_key(tiny_folder, key):
    meta = _meta(tiny_folder)
    del meta[key]
    _write_meta(tiny_folder, meta)
    with pytest.raises(InputError, match=rf"lacks required key\(s\) \['{key}'\]"):
        load_dataset_json(tiny_folder)


def test_region_based_labels_rejected(tiny_folder):
    meta = _meta(tiny_folder)
    meta["labels"] = {"background": 0, "whole_tumor": [1, 2, 3], "tumor_core": [2, 3], "enhancing": 3}
    meta["regions_class_order"] = [1, 2, 3]
    _write_meta(tiny_folder, meta)
    with pytest.raises(InputError, match="label 'whole_tumor' is a region .*region-based labels are not supported"):
        DatasetFolder(tiny_folder)


@pytest.mark.parametrize("labels, problem", [
    ({"background": 0, "CSF": 1, "WM": 3}, r"label values \[0, 1, 3\] must be consecutive"),
    ({"CSF": 1, "GM": 2}, r"label values \[1, 2\] must be consecutive integers starting at 0"),
    ({"background": 0, "GM": -1}, "label 'GM' has value -1"),
    ({"background": 0, "GM": "1"}, "label 'GM' has value '1'"),
    ({"background": 0, "GM": 1.5}, "label 'GM' has value 1.5"),
    ({}, "'labels' must be a non-empty mapping"),
    (["background", "GM"], "'labels' must be a non-empty mapping"),
])
def test_bad_label_sets_rejected(tiny_folder, labels, problem):
    meta = _meta(tiny_folder)
    meta["labels"] = labels
    _write_meta(tiny_folder, meta)
    with pytest.raises(InputError, match=problem):
        DatasetFolder(tiny_folder)


def test_empty_channel_names_rejected(tiny_folder):
    meta = _meta(tiny_folder)
    meta["channel_names"] = {}
    _write_meta(tiny_folder, meta)
    with pytest.raises(InputError, match="'channel_names' must be a non-empty mapping"):
        DatasetFolder(tiny_folder)


def test_folder_without_images(tmp_path):
    root = tmp_path / "Dataset002_Empty"
    root.mkdir()
    _write_meta(root, {"channel_names": {"0": "T1"}, "labels": LABELS, "file_ending": ".nii.gz"})
    with pytest.raises(InputError, match="has no images"):
        DatasetFolder(root)


def test_missing_label_file_named(tiny_folder):
    missing = tiny_folder / "labelsTr" / "case002.nii.gz"
    missing.unlink()
    with pytest.raises(InputError, match=f"case case002: label file {missing} is missing"):
        DatasetFolder(tiny_folder)


def test_missing_test_label_is_allowed(tiny_folder):
    (tiny_folder / "labelsTs" / "case005.nii.gz").unlink()
    folder = DatasetFolder(tiny_folder)
    assert folder.case("case005").label_path is None
    assert LABEL not in folder.case("case005").to_subject()


def test_missing_channel_file_named(tiny_folder):
    meta = _meta(tiny_folder)
    meta["channel_names"] = {"0": "T1", "1": "FLAIR"}
    _write_meta(tiny_folder, meta)
    with pytest.raises(InputError, match=r"case case000: image file .*case000_0001.nii.gz is missing \(2 channels"):
        DatasetFolder(tiny_folder)


# ----------------------------------------------------------------------------- splits


def test_splits_recorded_in_mixpriv_block_are_used(tiny_folder):
    meta = _meta(tiny_folder)
    recorded = {"case000": VAL, "case001": TRAIN, "case002": VAL, "case003": TRAIN}
    meta["mixpriv"] = {"cases": {cid: {"split": split, "patient": f"p{cid[-1]}"} for cid, split in recorded.items()}}
    _write_meta(tiny_folder, meta)
    folder = DatasetFolder(tiny_folder)
    assert _splits(folder) == {TRAIN: ["case001", "case003"], VAL: ["case000", "case002"],
                               TEST: ["case004", "case005"]}
    assert folder.case("case002").patient_id == "p2"
    assert folder.case("case004").patient_id == "case004"  # not recorded: its own patient
    # The recorded split wins over splits_final.json.
    (tiny_folder / "splits_final.json").write_text(json.dumps([{"train": ["case000"], "val": ["case001"]}]))
    assert _splits(DatasetFolder(tiny_folder))[VAL] == ["case000", "case002"]


def test_splits_final_json_fold_zero(tiny_folder):
    folds = [
        {"train": ["case000", "case001", "case003"], "val": ["case002"]},
        {"train": ["case001", "case002", "case003"], "val": ["case000"]},
    ]
    (tiny_folder / "splits_final.json").write_text(json.dumps(folds))
    splits = _splits(DatasetFolder(tiny_folder))
    assert splits == {TRAIN: ["case000", "case001", "case003"], VAL: ["case002"], TEST: ["case004", "case005"]}


def test_splits_final_json_must_cover_training_cases(tiny_folder):
    folds = [{"train": ["case000", "case001"], "val": ["case002"]}]  # case003 forgotten
    (tiny_folder / "splits_final.json").write_text(json.dumps(folds))
    with pytest.raises(InputError, match="case003"):
        DatasetFolder(tiny_folder)


def test_default_split_is_by_patient_and_deterministic(tmp_path):
    root = write_nnunet_folder(tmp_path / "Dataset003_Patients", n_train=10, n_test=1, shape=(8, 8, 8))
    meta = _meta(root)
    # Two scans per patient (test-retest): a patient must never straddle train and val.
    meta["mixpriv"] = {"cases": {f"case{i:03d}": {"patient": f"patient{i // 2}"} for i in range(10)}}
    _write_meta(root, meta)
    folder = DatasetFolder(root)
    splits = _splits(folder)
    assert splits == _splits(DatasetFolder(root))  # deterministic
    assert len(splits[TRAIN]) + len(splits[VAL]) == 10
    patients = {split: {folder.case(cid).patient_id for cid in ids} for split, ids in splits.items()}
    assert not patients[TRAIN] & patients[VAL]
    assert len(patients[VAL]) == 1  # round(0.2 * 5 patients)
    assert len(splits[VAL]) == 2  # both scans of that patient
    # Another seed or fraction gives another (still patient-wise) split.
    split_sets = set()
    for seed in range(6):
        other = DatasetFolder(root, val_fraction=0.4, seed=seed)
        other_patients = {split: {other.case(c.case_id).patient_id for c in other.cases(split)} for split in SPLITS}
        assert not other_patients[TRAIN] & other_patients[VAL]
        assert len(other_patients[VAL]) == 2
        split_sets.add(tuple(c.case_id for c in other.cases(VAL)))
    assert len(split_sets) > 1


def test_single_training_case_goes_to_train(tmp_path):
    root = write_nnunet_folder(tmp_path / "Dataset004_One", n_train=1, n_test=0, shape=(8, 8, 8))
    splits = _splits(DatasetFolder(root))
    assert splits == {TRAIN: ["case000"], VAL: [], TEST: []}


# ----------------------------------------------------------------------------- label set from dataset.json


def write_three_label_folder(root: Path, n_train: int = 4) -> Path:
    """Like the tiny folder, but with 3 labels (0 outside, 1 shell, 2 core) and their own names."""
    write_nnunet_folder(root, n_train=n_train, n_test=1, labels=THREE_LABELS)
    for path in list((root / "labelsTr").iterdir()) + list((root / "labelsTs").iterdir()):
        case = int(path.name[4:7])
        _, label = phantom(case)
        three = np.where(label == 0, 0, np.where(label == 2, 1, 2)).astype(np.uint8)
        nib.save(nib.Nifti1Image(three, AFFINE), str(path))
    return root


def test_label_set_is_read_from_dataset_json(tmp_path):
    root = write_three_label_folder(tmp_path / "Dataset005_Three")
    folder = DatasetFolder(root)
    assert folder.labels == THREE_LABELS
    assert folder.num_classes == 3
    assert folder.label_names == ["background", "shell", "core"]
    # The 4-label phantom labels are now invalid for this label set.
    _, label = phantom(0)
    nib.save(nib.Nifti1Image(label, AFFINE), str(root / "labelsTr" / "case000.nii.gz"))
    datamodule = MixprivDataModule(data_dir=str(root), patch_size=16, batch_size=2)
    with pytest.raises(InputError, match=r"values \[3\] that are not in the label set \[0, 1, 2\]"):
        datamodule.setup("fit")


def _trainer() -> pl.Trainer:
    return pl.Trainer(fast_dev_run=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False)


@pytest.mark.slow
def test_three_label_dataset_trains_both_modules(tmp_path):
    root = write_three_label_folder(tmp_path / "Dataset005_Three")
    kwargs = dict(data_dir=str(root), patch_size=16, batch_size=2, samples_per_volume=2, queue_length=4,
                  val_samples_per_volume=2)

    datamodule = MixprivDataModule(**kwargs)
    datamodule.setup("fit")
    assert datamodule.num_classes == 3
    batch = next(iter(datamodule.train_dataloader()))
    assert batch[IMAGE]["data"].shape == (2, 1, 16, 16, 16)
    assert set(batch[LABEL]["data"].unique().tolist()) <= {0, 1, 2}
    baseline = BaselineSegmenter(datamodule.folder.labels, TINY_SEGMENTER, patch_size=16)
    trainer = _trainer()
    trainer.fit(baseline, datamodule=datamodule)
    assert baseline(torch.zeros(1, 1, 16, 16, 16)).shape == (1, 3, 16, 16, 16)
    metrics = set(trainer.callback_metrics)
    assert {"train/dice_shell", "train/dice_core", "val/dice_shell", "val/dice_core"} <= metrics
    assert not any(name.endswith(("dice_GM", "dice_WM", "dice_CSF", "dice_background")) for name in metrics)

    mixing = MixprivDataModule(**kwargs, mixing=True, lambda_range=(0.6, 0.9))
    mixing.setup("fit")
    assert mixing.bank.num_classes == 3 and mixing.bank.label_names == THREE_LABELS
    batch = next(iter(mixing.train_dataloader()))
    assert batch[REFERENCE_LABEL]["data"].shape == (2, 3, 16, 16, 16)
    assert all(0.6 <= float(lam) <= 0.9 for lam in batch[MIX_LAMBDA])
    module = MixupPrivacyModule(mixing.folder.labels, TINY_SEGMENTER, TINY_UNMIXER, lambda_range=(0.6, 0.9),
                                patch_size=16)
    trainer = _trainer()
    trainer.fit(module, datamodule=mixing)
    assert {"train/learned_dice_shell", "val/naive_dice_core"} <= set(trainer.callback_metrics)
    probs = module.segment_mixture(torch.zeros(2, 1, 16, 16, 16))
    assert module.unmix(probs, probs, torch.tensor([0.7, 0.8])).shape == (2, 3, 16, 16, 16)


def test_recorded_split_names_are_checked(tiny_folder):
    meta = _meta(tiny_folder)
    recorded = {"case000": VAL, "case001": TRAIN, "case002": "validation", "case003": TRAIN}
    meta["mixpriv"] = {"cases": {cid: {"split": split} for cid, split in recorded.items()}}
    _write_meta(tiny_folder, meta)
    with pytest.raises(InputError, match="case002.*'validation'"):
        DatasetFolder(tiny_folder)
