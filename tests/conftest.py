"""Shared fixtures: tiny synthetic volumes and an nnU-Net-layout folder written by the tests."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

LABELS = {"background": 0, "CSF": 1, "GM": 2, "WM": 3}
SHAPE = (24, 24, 24)
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
AFFINE[:3, 3] = [-24.0, -30.0, -20.0]

TINY_SEGMENTER = {"encoder_name": "mixpriv-light-8", "encoder_depth": 3, "decoder_channels": [16, 8, 8]}
TINY_UNMIXER = {"channels": [4, 8]}


def phantom(seed: int, shape=SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """A ball phantom: WM core, GM shell, CSF centre; intensity follows tissue plus noise."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    centre = rng.uniform(-0.1, 0.1, size=(3, 1, 1, 1))
    radius = np.sqrt(((grid - centre) ** 2).sum(0))
    scale = rng.uniform(0.9, 1.1)
    label = np.zeros(shape, np.uint8)
    label[radius < 0.8 * scale] = 2
    label[radius < 0.6 * scale] = 3
    label[radius < 0.2 * scale] = 1
    intensity = np.array([0.0, 0.3, 0.6, 0.9], np.float32)[label]
    image = intensity + rng.normal(0, 0.03, shape).astype(np.float32)
    return image.astype(np.float32), label


def write_nnunet_folder(root: Path, n_train: int = 4, n_test: int = 2, labels=LABELS, shape=SHAPE) -> Path:
    """Write a tiny nnU-Net v2 folder (no patient info: each case is its own patient)."""
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n_train + n_test):
        image, label = phantom(i, shape)
        kind = "Tr" if i < n_train else "Ts"
        nib.save(nib.Nifti1Image(image, AFFINE), str(root / f"images{kind}" / f"case{i:03d}_0000.nii.gz"))
        nib.save(nib.Nifti1Image(label, AFFINE), str(root / f"labels{kind}" / f"case{i:03d}.nii.gz"))
    meta = {"channel_names": {"0": "T1"}, "labels": dict(labels), "numTraining": n_train, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


@pytest.fixture()
def tiny_folder(tmp_path: Path) -> Path:
    return write_nnunet_folder(tmp_path / "Dataset001_Tiny")


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(2)
