"""Conversion between the BraTS 2021 challenge layout (:mod:`mixpriv.data.brats`) and the nnU-Net v2 layout.

:func:`brats_to_nnunet` writes ``Dataset{ID:03d}_BraTS2021``, which
:class:`~mixpriv.data.folder.DatasetFolder` reads, with the BraTS labels remapped to consecutive
classes and each case's patient and split recorded; :func:`nnunet_to_brats` writes the challenge
layout back from the values the dataset records. Images are copied byte for byte and label maps keep
their source header (affines kept exactly, nothing resampled). Every case is checked before anything
is written; each file is written atomically and never over an input.

Example:
    >>> brats_to_nnunet("BraTS2021_Training_Data", "nnUNet_raw", dataset_id=137)  # doctest: +SKIP
    PosixPath('nnUNet_raw/Dataset137_BraTS2021')
    >>> nnunet_to_brats("nnUNet_raw/Dataset137_BraTS2021", "BraTS2021_back")  # doctest: +SKIP
    PosixPath('BraTS2021_back')
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from mixpriv.constants import SPLITS, TEST, TRAIN, VAL
from mixpriv.data.brats import (
    BRATS_LABELS,
    BRATS_TO_CLASS,
    CASE_PATTERN,
    CHANNEL_NAMES,
    CLASS_LABELS,
    CLASS_TO_BRATS,
    DEFAULT_MODALITIES,
    FILE_ENDING,
    LABEL_DESCRIPTIONS,
    SEG,
    BratsFolder,
    check_case,
    check_modalities,
    remap_labels,
)
from mixpriv.data.brats_patients import DEFAULT_FRACTIONS, write_patients
from mixpriv.data.folder import DatasetFolder
from mixpriv.files import OutputError, OutputFiles, write_text_atomically
from mixpriv.validation import InputError


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
        check_case(case, mapping)
    for case in sorted(cases, key=lambda c: c.case_id):
        base = target / case.case_id / case.case_id
        images = {Path(f"{base}_{m}{FILE_ENDING}"): path for m, path in zip(modalities, case.image_paths, strict=True)}
        _write_case(images, Path(f"{base}_{SEG}{FILE_ENDING}"), case.label_path, mapping)
    if any(case.patient_id != case.case_id for case in cases):
        write_patients(target, {case.case_id: case.patient_id for case in cases})
    return target
