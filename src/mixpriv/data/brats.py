"""BraTS 2021 folders: the challenge layout, its labels, and conversion to and from the nnU-Net v2 layout.

The challenge ships ``BraTS2021_XXXXX/BraTS2021_XXXXX_{t1,t1ce,t2,flair,seg}.nii.gz`` with labels
0 background, 1 NCR (necrotic core), 2 ED (oedema), 4 ET (enhancing tumour); mixpriv trains on the
consecutive classes 0-3 (:data:`CLASS_LABELS`), and a converted folder records each class's BraTS
value (``dataset.json["mixpriv"]["brats_labels"]``) so that it maps back. The modalities are the
caller's, one channel each, in order (T1ce alone by default, as in the paper). Several scans of one
patient are declared in an optional top-level ``patients.csv`` (:mod:`mixpriv.data.brats_patients`;
without it every case is its own patient, as the challenge ships them); splits are by patient, from
a seeded permutation. Conversion to and from the nnU-Net v2 layout is
:mod:`mixpriv.data.brats_convert`.

Example:
    >>> folder = BratsFolder("BraTS2021_Training_Data", modalities=("t1ce", "flair"))  # doctest: +SKIP
    >>> image, label, affine = folder.load("BraTS2021_00000")  # doctest: +SKIP
    >>> image.shape, sorted(np.unique(label))  # doctest: +SKIP
    ((2, 240, 240, 155), [0, 1, 2, 3])
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torchio as tio

from mixpriv.constants import IMAGE, LABEL, TRAIN, TUMOUR_CLASSES
from mixpriv.data.brats_patients import (
    DEFAULT_FRACTIONS,
    read_patients,
    split_cases,
)
from mixpriv.data.folder import Case, validate_case
from mixpriv.validation import InputError, check_label_values

MODALITIES = ("t1", "t1ce", "t2", "flair")
DEFAULT_MODALITIES = ("t1ce",)
#: nnU-Net ``channel_names`` of each modality.
CHANNEL_NAMES = {"t1": "T1", "t1ce": "T1ce", "t2": "T2", "flair": "FLAIR"}
SEG = "seg"
FILE_ENDING = ".nii.gz"
CASE_PATTERN = re.compile(r"BraTS2021_\d{5}")
#: Label values of the challenge's ``_seg`` files.
BRATS_LABELS = {"background": 0, "NCR": 1, "ED": 2, "ET": 4}
#: Consecutive classes mixpriv trains on.
CLASS_LABELS = TUMOUR_CLASSES
LABEL_DESCRIPTIONS = {"background": "background and healthy tissue", "NCR": "necrotic tumour core",
                      "ED": "peritumoural oedema", "ET": "enhancing tumour"}
_LAYOUT = "BraTS2021_XXXXX/BraTS2021_XXXXX_{t1,t1ce,t2,flair,seg}.nii.gz"


def check_modalities(modalities: Sequence[str]) -> tuple[str, ...]:
    """Check a choice of modalities (one channel each, in order): known names, no repeat, at least one.

    Example:
        >>> check_modalities(["t1ce", "flair"])
        ('t1ce', 'flair')
        >>> check_modalities(["t1c"])
        Traceback (most recent call last):
        ...
        mixpriv.validation.InputError: unknown BraTS modality 't1c'; choose among ('t1', 't1ce', 't2', 'flair')
    """
    if isinstance(modalities, str) or not modalities:
        raise InputError(f"modalities must be a non-empty list of names among {MODALITIES}, got {modalities!r}")
    for modality in modalities:
        if modality not in MODALITIES:
            raise InputError(f"unknown BraTS modality {modality!r}; choose among {MODALITIES}")
    if len(set(modalities)) != len(modalities):
        raise InputError(f"modalities {list(modalities)} name a modality twice")
    return tuple(modalities)


def remap_labels(label: np.ndarray, mapping: Mapping[int, int], name: str = "label") -> np.ndarray:
    """Map every value of an integer label map through ``mapping`` (uint8 result).

    Raises:
        InputError: a value of ``label`` is not a key of ``mapping`` (the values and ``name`` are given).

    Example:
        >>> remap_labels(np.array([0, 4, 2, 1]), {0: 0, 1: 1, 2: 2, 4: 3})
        array([0, 3, 2, 1], dtype=uint8)
        >>> remap_labels(np.array([0, 3]), {0: 0, 1: 1, 2: 2, 4: 3}, "x_seg.nii.gz")
        Traceback (most recent call last):
        ...
        mixpriv.validation.InputError: x_seg.nii.gz has values [3] that are not in the label set [0, 1, 2, 4]
    """
    label = np.asanyarray(label)
    check_label_values(label, list(mapping), name)
    table = np.zeros(max(mapping) + 1, dtype=np.uint8)
    for source, target in mapping.items():
        table[source] = target
    return table[label.astype(np.intp)]


BRATS_TO_CLASS = {BRATS_LABELS[name]: CLASS_LABELS[name] for name in CLASS_LABELS}
CLASS_TO_BRATS = {cls: value for value, cls in BRATS_TO_CLASS.items()}


def brats_to_classes(label: np.ndarray, name: str = "label") -> np.ndarray:
    """BraTS values 0/1/2/4 -> consecutive classes 0/1/2/3 (background, NCR, ED, ET).

    Example:
        >>> brats_to_classes(np.array([0, 1, 2, 4]))
        array([0, 1, 2, 3], dtype=uint8)
    """
    return remap_labels(label, BRATS_TO_CLASS, name)


def classes_to_brats(classes: np.ndarray, name: str = "label") -> np.ndarray:
    """Consecutive classes 0/1/2/3 -> BraTS values 0/1/2/4.

    Example:
        >>> classes_to_brats(np.array([0, 1, 2, 3]))
        array([0, 1, 2, 4], dtype=uint8)
    """
    return remap_labels(classes, CLASS_TO_BRATS, name)


def check_case(case: Case, label_values: Sequence[int]) -> None:
    """Check a case's files (:func:`~mixpriv.data.folder.validate_case`); the message names the case."""
    try:
        validate_case(case, list(label_values))
    except InputError as error:
        raise InputError(f"case {case.case_id}: {error}") from error


@dataclass(frozen=True)
class BratsCase:
    """Files of one BraTS case: the chosen modalities (in channel order) and the ``_seg`` label map."""

    case_id: str
    image_paths: tuple[Path, ...]
    label_path: Path


class BratsFolder:
    """A folder in the BraTS 2021 challenge layout, read with the chosen modalities.

    Every sub-folder (hidden ones aside) is a case and must follow the naming; only the chosen
    modalities and ``_seg`` must be present. A top-level ``patients.csv`` (``case_id,patient_id``)
    gives the patient of several scans (:func:`~mixpriv.data.brats_patients.read_patients`); cases it
    does not list, and every case without it, are their own patient. Other top-level files (the
    challenge's CSV files) are ignored.

    Args:
        root: the folder holding the ``BraTS2021_XXXXX`` case folders.
        modalities: modalities, one channel each, in order (T1ce alone by default).

    Raises:
        InputError: no case folder, a name that does not follow the layout, a missing file, a
            malformed ``patients.csv``.

    Example:
        >>> folder = BratsFolder("BraTS2021_Training_Data")  # doctest: +SKIP
        >>> folder.case_ids[:2], folder.modalities  # doctest: +SKIP
        (['BraTS2021_00000', 'BraTS2021_00002'], ('t1ce',))
        >>> folder.patient_id("BraTS2021_00002")  # no patients.csv: the case itself  # doctest: +SKIP
        'BraTS2021_00002'
    """

    def __init__(self, root: str | Path, modalities: Sequence[str] = DEFAULT_MODALITIES) -> None:
        self.root = Path(root).expanduser()
        self.modalities = check_modalities(modalities)
        self.cases = self._discover()
        #: Case id -> patient id (from ``patients.csv``; a case it does not list is its own patient).
        self.patients: dict[str, str] = read_patients(self.root, self.case_ids)

    @property
    def case_ids(self) -> list[str]:
        return [case.case_id for case in self.cases]

    def patient_id(self, case_id: str) -> str:
        """The patient of a case (its own id unless ``patients.csv`` names another)."""
        self.case(case_id)
        return self.patients[case_id]

    def case(self, case_id: str) -> BratsCase:
        for case in self.cases:
            if case.case_id == case_id:
                return case
        raise KeyError(f"no case {case_id!r} in {self.root}")

    def _discover(self) -> list[BratsCase]:
        if not self.root.is_dir():
            raise InputError(f"BraTS folder {self.root} does not exist")
        folders = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not folders:
            one = CASE_PATTERN.fullmatch(self.root.name)
            hint = "; it looks like one case folder, give the folder above it" if one else ""
            raise InputError(f"{self.root} holds no case folder: expected {self.root}/{_LAYOUT}{hint}")
        return [self._case(folder) for folder in folders]

    def _case(self, folder: Path) -> BratsCase:
        case_id = folder.name
        if not CASE_PATTERN.fullmatch(case_id):
            raise InputError(f"case folder {folder} does not follow the BraTS 2021 naming BraTS2021_XXXXX "
                             "(five digits)")
        expected = {f"{case_id}_{kind}{FILE_ENDING}" for kind in (*MODALITIES, SEG)}
        names = {p.name for p in folder.iterdir() if not p.name.startswith(".")}
        unexpected = sorted(names - expected)
        if unexpected:
            raise InputError(f"case {case_id}: file(s) {unexpected} in {folder} do not follow the BraTS 2021 "
                             f"naming {case_id}_{{t1,t1ce,t2,flair,seg}}{FILE_ENDING}")
        for kind in (*self.modalities, SEG):
            name = f"{case_id}_{kind}{FILE_ENDING}"
            if name not in names or not (folder / name).is_file():
                what = "label" if kind == SEG else "modality"
                raise InputError(f"case {case_id}: {what} file {name} ({kind}) is missing in {folder}")
        images = tuple(folder / f"{case_id}_{m}{FILE_ENDING}" for m in self.modalities)
        return BratsCase(case_id, images, folder / f"{case_id}_{SEG}{FILE_ENDING}")

    def validate_case(self, case_id: str) -> None:
        """Read one case and check it: 3D finite images, one shape and affine for all files, labels 0/1/2/4."""
        case = self.case(case_id)
        check_case(Case(case_id, case_id, TRAIN, case.image_paths, case.label_path), BRATS_TO_CLASS)

    def validate(self) -> None:
        """Check every case (:meth:`validate_case`)."""
        for case_id in self.case_ids:
            self.validate_case(case_id)

    def load(self, case_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Image (C, D, H, W) float32 in modality order, label map in classes 0-3 (uint8), affine of the case."""
        self.validate_case(case_id)
        case = self.case(case_id)
        images = [nib.load(str(path)) for path in case.image_paths]
        image = np.stack([np.asarray(img.dataobj, dtype=np.float32) for img in images])
        label = brats_to_classes(np.asarray(nib.load(str(case.label_path)).dataobj), case.label_path.name)
        return image, label, images[0].affine

    def subject(self, case_id: str) -> tio.Subject:
        """One case as a ``tio.Subject`` (``image``, ``label`` in classes 0-3, ``case_id``, ``patient_id``)."""
        image, label, affine = self.load(case_id)
        return tio.Subject(**{IMAGE: tio.ScalarImage(tensor=image, affine=affine),
                              LABEL: tio.LabelMap(tensor=label[None], affine=affine)},
                           case_id=case_id, patient_id=self.patient_id(case_id))

    def splits(self, fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0) -> dict[str, str]:
        """Case id -> ``train``/``val``/``test``, by patient (:func:`~mixpriv.data.brats_patients.split_cases`)."""
        return split_cases(self.case_ids, fractions, seed, patients=self.patients)
