"""Datasets in the nnU-Net v2 layout: ``imagesTr/ labelsTr/ imagesTs/ labelsTs/ dataset.json``.

The label set always comes from ``dataset.json["labels"]``. Splits are resolved in order:
1. ``dataset.json["mixpriv"]["cases"][case]["split"]`` (written by the embedded cohort);
2. ``splits_final.json`` (nnU-Net's own file; fold 0) for train/val, imagesTs for test;
3. otherwise a deterministic 80/20 train/val split of imagesTr by patient, imagesTs for test.
A patient id comes from the ``mixpriv`` block when present, else every case is its own patient.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torchio as tio

from mixpriv.constants import IMAGE, LABEL, SPLITS, TEST, TRAIN, VAL
from mixpriv.validation import (
    InputError,
    check_finite,
    check_label_values,
    check_same_affine,
    check_same_shape,
    check_spatial_dims,
)

REQUIRED_KEYS = ("channel_names", "labels", "file_ending")


@dataclass(frozen=True)
class Case:
    """Files of one case: one image per channel, an optional label map, its patient."""

    case_id: str
    patient_id: str
    split: str
    image_paths: tuple[Path, ...]
    label_path: Path | None

    def to_subject(self) -> tio.Subject:
        """A lazy ``tio.Subject`` (nothing is read until a transform needs the data)."""
        images = {IMAGE: tio.ScalarImage(list(self.image_paths))}
        if self.label_path is not None:
            images[LABEL] = tio.LabelMap(self.label_path)
        return tio.Subject(**images, case_id=self.case_id, patient_id=self.patient_id)


def load_dataset_json(root: str | Path) -> dict:
    """Read and check ``root/dataset.json``; raise :class:`InputError` naming what is wrong."""
    path = Path(root) / "dataset.json"
    if not path.is_file():
        raise InputError(f"{path} is missing: a dataset folder needs an nnU-Net v2 dataset.json")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise InputError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(meta, dict):
        raise InputError(f"{path} must hold a JSON object, got {type(meta).__name__}")
    missing = [key for key in REQUIRED_KEYS if key not in meta]
    if missing:
        raise InputError(f"{path} lacks required key(s) {missing}")
    labels = meta["labels"]
    if not isinstance(labels, dict) or not labels:
        raise InputError(f"{path}: 'labels' must be a non-empty mapping name -> integer value")
    for name, value in labels.items():
        if isinstance(value, (list, tuple)):
            raise InputError(f"{path}: label {name!r} is a region {value}; region-based labels are not supported")
        if not isinstance(value, int) or value < 0:
            raise InputError(f"{path}: label {name!r} has value {value!r}; values must be non-negative integers")
    values = sorted(labels.values())
    if values != list(range(len(values))):
        raise InputError(f"{path}: label values {values} must be consecutive integers starting at 0 (background)")
    if not isinstance(meta["channel_names"], dict) or not meta["channel_names"]:
        raise InputError(f"{path}: 'channel_names' must be a non-empty mapping")
    return meta


class DatasetFolder:
    """A dataset folder in the nnU-Net v2 layout.

    Args:
        root: folder holding ``dataset.json``.
        val_fraction: fraction of imagesTr patients used for validation when no split is recorded.
        seed: seed of that split.

    Example:
        >>> folder = DatasetFolder("~/.cache/mixpriv/cohorts/tissue-2mm-p60x2-seed0")  # doctest: +SKIP
        >>> folder.labels  # doctest: +SKIP
        {'background': 0, 'CSF': 1, 'GM': 2, 'WM': 3}
        >>> len(folder.cases("test")) > 0  # doctest: +SKIP
        True
    """

    def __init__(self, root: str | Path, val_fraction: float = 0.2, seed: int = 0) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise InputError(f"dataset folder {self.root} does not exist")
        self.meta = load_dataset_json(self.root)
        self.labels: dict[str, int] = dict(self.meta["labels"])
        self.file_ending: str = self.meta["file_ending"]
        self.n_channels = len(self.meta["channel_names"])
        self._cases = self._discover(val_fraction, seed)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def label_names(self) -> list[str]:
        """Label names ordered by value."""
        return [name for name, _ in sorted(self.labels.items(), key=lambda item: item[1])]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size (mm) of the first case's first image, read from its header."""
        zooms = nib.load(str(self._cases[0].image_paths[0])).header.get_zooms()[:3]
        return tuple(round(float(z), 4) for z in zooms)

    def cases(self, split: str) -> list[Case]:
        """The cases of one split (``train``, ``val`` or ``test``), sorted by id."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
        return [case for case in self._cases if case.split == split]

    def case(self, case_id: str) -> Case:
        for case in self._cases:
            if case.case_id == case_id:
                return case
        raise KeyError(f"no case {case_id!r} in {self.root}")

    def _case_ids(self, images_dir: str) -> list[str]:
        folder = self.root / images_dir
        if not folder.is_dir():
            return []
        suffix = f"_0000{self.file_ending}"
        return sorted(p.name[: -len(suffix)] for p in folder.iterdir() if p.name.endswith(suffix))

    def _discover(self, val_fraction: float, seed: int) -> list[Case]:
        recorded = self.meta.get("mixpriv", {}).get("cases", {})
        train_ids, test_ids = self._case_ids("imagesTr"), self._case_ids("imagesTs")
        if not train_ids and not test_ids:
            raise InputError(f"{self.root} has no images: expected imagesTr/<case>_0000{self.file_ending}")
        patient = {cid: recorded.get(cid, {}).get("patient", cid) for cid in train_ids + test_ids}
        split = {cid: TEST for cid in test_ids}
        split.update(self._train_val_split(train_ids, patient, recorded, val_fraction, seed))
        cases = []
        for cid in train_ids + test_ids:
            images_dir, labels_dir = ("imagesTs", "labelsTs") if cid in test_ids else ("imagesTr", "labelsTr")
            images = tuple(self.root / images_dir / f"{cid}_{c:04d}{self.file_ending}" for c in range(self.n_channels))
            for image in images:
                if not image.is_file():
                    raise InputError(f"case {cid}: image file {image} is missing ({self.n_channels} channels declared)")
            label = self.root / labels_dir / f"{cid}{self.file_ending}"
            if cid in train_ids and not label.is_file():
                raise InputError(f"case {cid}: label file {label} is missing")
            cases.append(Case(cid, patient[cid], split[cid], images, label if label.is_file() else None))
        return sorted(cases, key=lambda c: c.case_id)

    def _train_val_split(self, train_ids, patient, recorded, val_fraction, seed) -> dict[str, str]:
        if all(cid in recorded and "split" in recorded[cid] for cid in train_ids):
            bad = {cid: recorded[cid]["split"] for cid in train_ids if recorded[cid]["split"] not in (TRAIN, VAL)}
            if bad:
                raise InputError(f"dataset.json records splits {bad} for imagesTr cases; expected {TRAIN!r} or {VAL!r}")
            return {cid: recorded[cid]["split"] for cid in train_ids}
        splits_file = self.root / "splits_final.json"
        if splits_file.is_file():
            fold = json.loads(splits_file.read_text())[0]
            assigned = {**{cid: TRAIN for cid in fold["train"]}, **{cid: VAL for cid in fold["val"]}}
            unassigned = sorted(set(train_ids) - set(assigned))
            if unassigned:
                raise InputError(f"{splits_file}: fold 0 assigns no split to imagesTr case(s) {unassigned[:10]}")
            return assigned
        patients = sorted({patient[cid] for cid in train_ids})
        random.Random(seed).shuffle(patients)
        n_val = max(1, round(val_fraction * len(patients))) if len(patients) > 1 else 0
        val_patients = set(patients[:n_val])
        return {cid: VAL if patient[cid] in val_patients else TRAIN for cid in train_ids}


def validate_case(case: Case, label_values: Sequence[int]) -> None:
    """Load a case's files and check dims, finite voxels, shapes, affines and label values."""
    reference = None
    for path in case.image_paths:
        image = nib.load(str(path))
        data = np.asanyarray(image.dataobj)
        check_spatial_dims(data, f"image {path.name}", channels_first=False)
        check_finite(data, f"image {path.name}")
        if reference is None:
            reference = image
        else:
            check_same_shape(data, np.asanyarray(reference.dataobj), f"image {path.name}", "first channel")
            check_same_affine(image.affine, reference.affine, f"image {path.name}", "first channel")
    if case.label_path is not None:
        label = nib.load(str(case.label_path))
        label_data = np.asanyarray(label.dataobj)
        name = f"label {case.label_path.name}"
        check_spatial_dims(label_data, name, channels_first=False)
        check_same_shape(label_data, np.asanyarray(reference.dataobj), name, f"image of case {case.case_id}")
        check_same_affine(label.affine, reference.affine, name, f"image of case {case.case_id}")
        check_label_values(label_data, label_values, name)
