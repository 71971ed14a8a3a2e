"""Patients of a BraTS-layout folder: the optional top-level ``patients.csv``, and splits by patient.

The challenge ships one scan per patient, so a case is its own patient. A folder holding several
scans of one patient (the embedded tumour cohort, :mod:`mixpriv.data.tumour`, or longitudinal
data) says so in a top-level ``patients.csv``::

    case_id,patient_id
    BraTS2021_00000,P000
    BraTS2021_00001,P000
    BraTS2021_00002,P001

Every listed case must be a case folder, listed once; a case that is not listed is its own patient
(its patient id is its case id). Splits are by patient: every scan of a patient goes to the same
split, so that no patient straddles training and test (the privacy audit's test-retest pairs need it).

Example:
    >>> split_cases(["BraTS2021_00000", "BraTS2021_00001", "BraTS2021_00002"], (0.5, 0.5, 0.0), seed=0,
    ...             patients={"BraTS2021_00000": "P0", "BraTS2021_00001": "P0", "BraTS2021_00002": "P1"})
    {'BraTS2021_00000': 'train', 'BraTS2021_00001': 'train', 'BraTS2021_00002': 'val'}
"""

from __future__ import annotations

import csv
import io
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

from mixpriv.data.cohort import split_patients
from mixpriv.files import write_text_atomically
from mixpriv.validation import InputError

PATIENTS_FILE = "patients.csv"
PATIENTS_HEADER = ("case_id", "patient_id")
DEFAULT_FRACTIONS = (0.6, 0.2, 0.2)


def read_patients(root: str | Path, case_ids: Collection[str]) -> dict[str, str]:
    """Case id -> patient id of the cases ``case_ids`` of the BraTS folder ``root``, from ``root/patients.csv``.

    Without the file every case is its own patient. The file's first row is the header
    ``case_id,patient_id``; blank lines are skipped, spaces around fields are ignored.

    Raises:
        InputError: a wrong header, a row without exactly two non-empty fields, a case that is no
            case folder of ``root``, a case listed twice (each message names the file and line).

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> _ = (root / "patients.csv").write_text("case_id,patient_id\\nBraTS2021_00001,P7\\n")
        >>> read_patients(root, ["BraTS2021_00000", "BraTS2021_00001"])
        {'BraTS2021_00000': 'BraTS2021_00000', 'BraTS2021_00001': 'P7'}
        >>> _ = (root / "patients.csv").write_text("case_id,patient_id\\nBraTS2021_00009,P7\\n")
        >>> read_patients(root, ["BraTS2021_00000"])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        mixpriv.validation.InputError: .../patients.csv line 2: case BraTS2021_00009 is not a case folder of ...
    """
    path = Path(root) / PATIENTS_FILE
    patients = {cid: cid for cid in sorted(case_ids)}
    if not path.exists():
        return patients
    if not path.is_file():
        raise InputError(f"{path} is not a file; it must be a CSV file {','.join(PATIENTS_HEADER)}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"{path} cannot be read as UTF-8 text: {error}") from error
    rows = [(number, [field.strip() for field in row])
            for number, row in enumerate(csv.reader(io.StringIO(text)), start=1) if any(f.strip() for f in row)]
    if not rows or tuple(rows[0][1]) != PATIENTS_HEADER:
        found = ",".join(rows[0][1]) if rows else "an empty file"
        raise InputError(f"{path} must start with the header {','.join(PATIENTS_HEADER)}, got {found!r}")
    listed: dict[str, int] = {}
    for number, row in rows[1:]:
        if len(row) != 2 or not all(row):
            raise InputError(f"{path} line {number}: expected two non-empty fields case_id,patient_id, got "
                             f"{','.join(row)!r}")
        case, patient = row
        if case not in patients:
            raise InputError(f"{path} line {number}: case {case} is not a case folder of {path.parent}")
        if case in listed:
            raise InputError(f"{path} line {number}: case {case} is listed twice (first on line {listed[case]}); "
                             "a case belongs to one patient")
        listed[case] = number
        patients[case] = patient
    return patients


def patients_csv(patients: Mapping[str, str]) -> str:
    """The text of a ``patients.csv`` listing every case of ``patients`` (case id -> patient id), by case id.

    Example:
        >>> print(patients_csv({"BraTS2021_00001": "P0", "BraTS2021_00000": "P0"}), end="")
        case_id,patient_id
        BraTS2021_00000,P0
        BraTS2021_00001,P0
    """
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(PATIENTS_HEADER)
    writer.writerows(sorted(patients.items()))
    return out.getvalue()


def write_patients(root: str | Path, patients: Mapping[str, str]) -> Path:
    """Write ``root/patients.csv`` (atomically) listing every case of ``patients``; returns its path.

    Example:
        >>> import tempfile
        >>> path = write_patients(tempfile.mkdtemp(), {"BraTS2021_00000": "P0"})
        >>> path.read_text().splitlines()
        ['case_id,patient_id', 'BraTS2021_00000,P0']
    """
    return write_text_atomically(Path(root) / PATIENTS_FILE, patients_csv(patients))


def split_cases(case_ids: Sequence[str], fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0,
                patients: Mapping[str, str] | None = None) -> dict[str, str]:
    """Split cases into train/val/test by patient, from a seeded permutation of the patients.

    ``round(fraction * n)`` patients go to val and to test, the rest (at least one) to train, each
    with all its cases, as the embedded tissue cohort splits its patients; the result depends only
    on the case -> patient mapping, the fractions and the seed. Without ``patients`` every case is
    its own patient (the challenge's folders), which splits the cases themselves.

    Args:
        case_ids: the cases.
        fractions: train, val, test fractions of the patients.
        seed: seed of the permutation.
        patients: case id -> patient id, for every case (default: each case its own patient).

    Example:
        >>> split_cases(["BraTS2021_00002", "BraTS2021_00000", "BraTS2021_00001"], (0.34, 0.33, 0.33), seed=0)
        {'BraTS2021_00000': 'test', 'BraTS2021_00001': 'val', 'BraTS2021_00002': 'train'}
    """
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise InputError(f"split fractions must be 3 non-negative numbers (train, val, test) summing to 1, "
                         f"got {list(fractions)}")
    ids = sorted(case_ids)
    patient_of = {cid: cid for cid in ids} if patients is None else dict(patients)
    missing = [cid for cid in ids if cid not in patient_of]
    if missing:
        raise InputError(f"no patient given for case(s) {missing[:10]}")
    groups = sorted({patient_of[cid] for cid in ids})
    unit = "case" if all(patient_of[cid] == cid for cid in ids) else "patient"
    try:
        names = split_patients(len(groups), fractions, seed)
    except ValueError as error:
        raise InputError(str(error).replace("patient", unit)) from error
    split_of = dict(zip(groups, names, strict=True))
    return {cid: split_of[patient_of[cid]] for cid in ids}
