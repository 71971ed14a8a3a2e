"""The scans an audit works on: one split of a dataset folder, preprocessed as the model expects."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from mixpriv.constants import IMAGE, LABEL, TEST
from mixpriv.data.folder import DatasetFolder
from mixpriv.data.preprocessing import preprocessing
from mixpriv.geometry import GridSpace, subject_into
from mixpriv.validation import InputError


@dataclass
class AuditScans:
    """Preprocessed scans of one split with their identities.

    Attributes:
        images: intensity-normalised images (1, D, H, W) on the model's grid.
        labels: label maps (D, H, W), or ``None`` for an unlabelled case.
        case_ids: one id per scan.
        patient_ids: the patient of each scan (re-identification's ground truth).
    """

    images: list[torch.Tensor]
    labels: list[torch.Tensor | None]
    case_ids: list[str]
    patient_ids: list[str]

    def __len__(self) -> int:
        return len(self.images)


def load_scans(
    folder: DatasetFolder,
    spacing: float | Sequence[float] | None,
    split: str = TEST,
    max_cases: int | None = None,
    progress: bool = True,
    space: GridSpace | None = None,
) -> AuditScans:
    """Load and preprocess the scans of ``split`` (at most ``max_cases``, in the folder's order),
    resampled onto ``space`` (the key's grid) when given.

    Example:
        >>> from mixpriv.data.cohort import build_cohort  # doctest: +SKIP
        >>> scans = load_scans(DatasetFolder(build_cohort()), spacing=2.0, max_cases=4)  # doctest: +SKIP
        >>> len(scans), tuple(scans.images[0].shape)  # doctest: +SKIP
        (4, (1, 88, 104, 88))
    """
    cases = folder.cases(split)[:max_cases]
    if not cases:
        raise InputError(f"{folder.root} has no case in the {split!r} split")
    transform = preprocessing(spacing)
    scans = AuditScans([], [], [], [])
    for case in tqdm(cases, desc=f"loading {split} scans", disable=not progress):
        subject = subject_into(transform(case.to_subject()), space)
        scans.images.append(subject[IMAGE].data.float())
        scans.labels.append(subject[LABEL].data[0] if LABEL in subject else None)
        scans.case_ids.append(case.case_id)
        scans.patient_ids.append(case.patient_id)
    return scans
