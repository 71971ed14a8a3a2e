"""BraTS 2021 folders: the challenge layout, its labels, and conversion to and from the nnU-Net v2 layout.

The challenge ships ``BraTS2021_XXXXX/BraTS2021_XXXXX_{t1,t1ce,t2,flair,seg}.nii.gz`` with labels
0 background, 1 NCR (necrotic core), 2 ED (oedema), 4 ET (enhancing tumour); mixpriv trains on the
consecutive classes 0-3 (:data:`CLASS_LABELS`), and a converted folder records each class's BraTS
value (``dataset.json["mixpriv"]["brats_labels"]``) so that it maps back. The modalities are the
caller's, one channel each, in order (T1ce alone by default, as in the paper). Several scans of one
patient are declared in an optional top-level ``patients.csv`` (:mod:`mixpriv.data.brats_patients`;
without it every case is its own patient, as the challenge ships them); splits are by patient, from
a seeded permutation, and converted folders record each case's patient. :func:`brats_to_nnunet`
writes ``Dataset{ID:03d}_BraTS2021``, which :class:`~mixpriv.data.folder.DatasetFolder` reads;
:func:`nnunet_to_brats` writes the challenge layout back. Images are copied byte for byte and label maps keep their source header (affines kept
exactly, nothing resampled). Every case is checked before anything is written; each file is
written atomically and never over an input.

Example:
    >>> folder = BratsFolder("BraTS2021_Training_Data", modalities=("t1ce", "flair"))  # doctest: +SKIP
    >>> image, label, affine = folder.load("BraTS2021_00000")  # doctest: +SKIP
    >>> image.shape, sorted(np.unique(label))  # doctest: +SKIP
    ((2, 240, 240, 155), [0, 1, 2, 3])
    >>> brats_to_nnunet("BraTS2021_Training_Data", "nnUNet_raw", dataset_id=137)  # doctest: +SKIP
    PosixPath('nnUNet_raw/Dataset137_BraTS2021')
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torchio as tio

from mixpriv.constants import IMAGE, LABEL, SPLITS, TEST, TRAIN, TUMOUR_CLASSES, VAL
from mixpriv.data.brats_patients import (
    DEFAULT_FRACTIONS,
    read_patients,
    split_cases,
    write_patients,
)
from mixpriv.data.folder import Case, DatasetFolder, validate_case
from mixpriv.files import OutputError, OutputFiles, write_text_atomically
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
        _validate(Case(case_id, case_id, TRAIN, case.image_paths, case.label_path), BRATS_TO_CLASS)

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


def _validate(case: Case, label_values: Sequence[int]) -> None:
    """:func:`~mixpriv.data.folder.validate_case`, its message naming the case."""
    try:
        validate_case(case, list(label_values))
    except InputError as error:
        raise InputError(f"case {case.case_id}: {error}") from error


def _check_output_folder(out: Path, src: Path) -> None:
    """Refuse an output folder that holds files, or lies inside the input: nothing is ever overwritten."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputError(f"{out} already exists and is not an empty folder; give a new or empty folder "
                          "(a conversion never overwrites files)")
    out_resolved, src_resolved = out.resolve(), src.resolve()
    if out_resolved == src_resolved or src_resolved in out_resolved.parents:
        raise OutputError(f"output {out} lies inside the input {src}; write it elsewhere")


def _copy_image(source: Path, target: Path) -> None:
    """Copy a NIfTI image to ``target`` (a temporary with the output's ending): its bytes when the endings agree."""
    if source.name.endswith(FILE_ENDING) == target.name.endswith(FILE_ENDING):
        shutil.copyfile(source, target)
    else:
        nib.save(nib.load(str(source)), str(target))


def _save_label(source: Path, mapping: Mapping[int, int], target: Path) -> None:
    """Write ``source``'s label map mapped through ``mapping``, with ``source``'s header (affine kept exactly)."""
    image = nib.load(str(source))
    label = remap_labels(np.asarray(image.dataobj), mapping, source.name)
    out = nib.Nifti1Image(label, None, header=image.header)
    out.set_data_dtype(np.uint8)
    nib.save(out, str(target))


def _write_case(images: Mapping[Path, Path], label: Path, label_source: Path, mapping: Mapping[int, int]) -> None:
    """Write one case's files, all or none: each output image from its source, and the remapped label map."""
    with OutputFiles({path.name: path for path in (*images, label)}, overwrite=False) as files:
        for path, source in images.items():
            files.write(path, lambda tmp, source=source: _copy_image(source, tmp))
        files.write(label, lambda tmp: _save_label(label_source, mapping, tmp))
        files.commit()


def brats_to_nnunet(src: str | Path, out: str | Path, *, modalities: Sequence[str] = DEFAULT_MODALITIES,
                    dataset_id: int = 1, fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0) -> Path:
    """Convert a BraTS 2021 folder to the nnU-Net v2 folder ``out/Dataset{dataset_id:03d}_BraTS2021``.

    Channel ``c`` (``<case>_{c:04d}.nii.gz``) is ``modalities[c]``; labels become classes 0-3. Splits
    are by patient (``patients.csv``, see :class:`BratsFolder`): all scans of a patient go to one split.
    Test cases go to ``imagesTs``/``labelsTs``; each case's patient and split are recorded in
    ``dataset.json["mixpriv"]["cases"]`` (``{"patient": ..., "split": ...}``, as
    :class:`~mixpriv.data.folder.DatasetFolder` reads them; train/val also in ``splits_final.json``,
    fold 0). ``dataset.json`` is written last.

    Args:
        src: the BraTS folder (``BraTS2021_XXXXX`` case folders).
        out: the folder that receives the dataset folder (nnU-Net's ``nnUNet_raw``).
        modalities: one channel each, in order.
        dataset_id: nnU-Net dataset id, 1 to 999.
        fractions: train, val, test fractions of the patients (of the cases when each is its own patient).
        seed: seed of the split.

    Returns:
        The dataset folder.

    Raises:
        InputError: a malformed BraTS folder, case or ``patients.csv`` (see :class:`BratsFolder`), bad arguments.
        OutputError: the dataset folder already holds files, or lies inside ``src``.

    Example:
        >>> dataset = brats_to_nnunet("BraTS2021_Training_Data", "nnUNet_raw", dataset_id=7)  # doctest: +SKIP
        >>> DatasetFolder(dataset).case("BraTS2021_00001").patient_id  # from patients.csv  # doctest: +SKIP
        'P000'
    """
    if isinstance(dataset_id, bool) or not isinstance(dataset_id, int) or not 1 <= dataset_id <= 999:
        raise InputError(f"dataset id must be an integer from 1 to 999, got {dataset_id!r}")
    brats = BratsFolder(src, modalities)
    splits = brats.splits(fractions, seed)
    target = Path(out).expanduser() / f"Dataset{dataset_id:03d}_BraTS2021"
    _check_output_folder(target, brats.root)
    brats.validate()
    for case in brats.cases:
        kind = "Ts" if splits[case.case_id] == TEST else "Tr"
        images = {target / f"images{kind}" / f"{case.case_id}_{c:04d}{FILE_ENDING}": path
                  for c, path in enumerate(case.image_paths)}
        label = target / f"labels{kind}" / f"{case.case_id}{FILE_ENDING}"
        _write_case(images, label, case.label_path, BRATS_TO_CLASS)
    by_split = {name: sorted(c for c, s in splits.items() if s == name) for name in SPLITS}
    meta = {
        "name": "BraTS2021",
        "description": "BraTS 2021 brain tumour segmentation, converted from the challenge layout by mixpriv "
                       f"(modalities {', '.join(brats.modalities)}; BraTS labels 1 NCR, 2 ED, 4 ET -> classes 1, 2, 3)",
        "reference": "RSNA-ASNR-MICCAI BraTS 2021 challenge",
        "channel_names": {str(c): CHANNEL_NAMES[m] for c, m in enumerate(brats.modalities)},
        "labels": dict(CLASS_LABELS),
        "numTraining": len(by_split[TRAIN]) + len(by_split[VAL]),
        "file_ending": FILE_ENDING,
        "mixpriv": {"converter": __name__, "modalities": list(brats.modalities), "brats_labels": dict(BRATS_LABELS),
                    "label_descriptions": dict(LABEL_DESCRIPTIONS),
                    "seed": int(seed), "split_fractions": [float(f) for f in fractions],
                    "n_patients": len(set(brats.patients.values())),
                    "cases": {cid: {"patient": brats.patients[cid], "split": splits[cid]} for cid in sorted(splits)}},
    }
    write_text_atomically(target / "splits_final.json",
                          json.dumps([{"train": by_split[TRAIN], "val": by_split[VAL]}], indent=1))
    write_text_atomically(target / "dataset.json", json.dumps(meta, indent=1))
    return target


def recorded_modalities(meta: Mapping) -> tuple[str, ...]:
    """The BraTS modality of each channel of an nnU-Net ``dataset.json``: as recorded, else from channel_names.

    Example:
        >>> recorded_modalities({"channel_names": {"0": "T1ce", "1": "Flair"}})
        ('t1ce', 'flair')
    """
    n_channels, recorded = len(meta["channel_names"]), meta.get("mixpriv", {}).get("modalities")
    if recorded is not None:
        if len(check_modalities(list(recorded))) != n_channels:
            raise InputError(f"dataset.json records modalities {list(recorded)} for {n_channels} channels")
        return tuple(recorded)
    by_name = {name.lower(): modality for modality, name in CHANNEL_NAMES.items()}
    names = [str(meta["channel_names"][key]) for key in sorted(meta["channel_names"], key=int)]
    unknown = [name for name in names if name.lower() not in by_name]
    if unknown:
        raise InputError(f"dataset.json channel names {unknown} are not among {list(CHANNEL_NAMES.values())}")
    return check_modalities([by_name[name.lower()] for name in names])


def recorded_label_mapping(meta: Mapping) -> dict[int, int]:
    """Class -> BraTS value of an nnU-Net ``dataset.json``: from ``mixpriv.brats_labels``, else the default one.

    Example:
        >>> recorded_label_mapping({"labels": {"background": 0, "NCR": 1, "ED": 2, "ET": 3}})
        {0: 0, 1: 1, 2: 2, 3: 4}
    """
    labels = dict(meta["labels"])
    brats = meta.get("mixpriv", {}).get("brats_labels")
    if brats is None:
        if labels != CLASS_LABELS:
            raise InputError(f"dataset.json labels {labels} record no BraTS values (mixpriv.brats_labels) and are "
                             f"not the default {CLASS_LABELS}")
        return dict(CLASS_TO_BRATS)
    if not isinstance(brats, Mapping) or set(brats) != set(labels):
        raise InputError(f"dataset.json mixpriv.brats_labels {brats} must map the label names {sorted(labels)} to "
                         "BraTS values")
    values = sorted(brats.values())
    if len(set(values)) != len(values) or not set(values) <= set(BRATS_LABELS.values()):
        raise InputError(f"dataset.json mixpriv.brats_labels values {values} must be distinct values of "
                         f"{sorted(BRATS_LABELS.values())}")
    return {int(labels[name]): int(brats[name]) for name in labels}


def nnunet_to_brats(src: str | Path, out: str | Path) -> Path:
    """Convert an nnU-Net v2 folder (as :func:`brats_to_nnunet` writes it) to the BraTS 2021 layout in ``out``.

    Every case (train, val and test) becomes ``out/<case>/<case>_<modality>.nii.gz`` and
    ``<case>_seg.nii.gz`` with the BraTS values (0/1/2/4), modalities and values as the dataset
    records them; when some case's patient is not the case itself, ``out/patients.csv`` lists every
    case's patient (so that the folder converts back with the same patients). Every case is checked
    before anything is written.

    Args:
        src: the nnU-Net dataset folder (holding ``dataset.json``).
        out: the BraTS folder to write (new or empty).

    Returns:
        ``out``.

    Raises:
        InputError: a malformed dataset, a case id that is no BraTS name, a case without a label map.
        OutputError: ``out`` already holds files, or lies inside ``src``.

    Example:
        >>> nnunet_to_brats("nnUNet_raw/Dataset007_BraTS2021", "BraTS2021_back")  # doctest: +SKIP
        PosixPath('BraTS2021_back')
    """
    folder = DatasetFolder(src)
    modalities, mapping = recorded_modalities(folder.meta), recorded_label_mapping(folder.meta)
    target = Path(out).expanduser()
    _check_output_folder(target, folder.root)
    cases = [case for split in SPLITS for case in folder.cases(split)]
    for case in cases:
        if not CASE_PATTERN.fullmatch(case.case_id):
            raise InputError(f"case {case.case_id} of {folder.root} is not a BraTS 2021 name (BraTS2021_XXXXX)")
        if case.label_path is None:
            raise InputError(f"case {case.case_id} of {folder.root} has no label map; the BraTS layout needs "
                             f"{case.case_id}_{SEG}{FILE_ENDING}")
        _validate(case, mapping)
    for case in sorted(cases, key=lambda c: c.case_id):
        base = target / case.case_id / case.case_id
        images = {Path(f"{base}_{m}{FILE_ENDING}"): path for m, path in zip(modalities, case.image_paths, strict=True)}
        _write_case(images, Path(f"{base}_{SEG}{FILE_ENDING}"), case.label_path, mapping)
    if any(case.patient_id != case.case_id for case in cases):
        write_patients(target, {case.case_id: case.patient_id for case in cases})
    return target
