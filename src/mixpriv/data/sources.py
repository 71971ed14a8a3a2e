"""Where a recipe's or a command's data come from: a dataset folder, a BraTS folder, or an embedded cohort.

``data_dir`` in a recipe (``data.data_dir``) and ``--data`` on the command line accept:

* ``None`` or ``embedded:tissue``: the embedded tissue cohort (:mod:`mixpriv.data.cohort`), built on first use;
* ``embedded:tumour``: the embedded tumour cohort (:mod:`mixpriv.data.tumour`), built on first use
  and converted to the nnU-Net layout (T1ce);
* a folder in the BraTS 2021 challenge layout (``BraTS2021_XXXXX/`` case folders, no
  ``dataset.json``): converted once (T1ce, :func:`~mixpriv.data.brats_convert.brats_to_nnunet`) into
  ``$MIXPRIV_HOME/converted/`` (default ``~/.cache/mixpriv``), never next to the input, and
  converted again when one of its files is newer than the conversion;
* any other folder: an nnU-Net v2 dataset (:class:`~mixpriv.data.folder.DatasetFolder`).

Example:
    >>> resolve_data_dir("~/nnUNet_raw/Dataset001_Brains").name
    'Dataset001_Brains'
    >>> resolve_data_dir("embedded:tumour").name  # doctest: +SKIP
    'Dataset501_BraTS2021'
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

from mixpriv.data.brats import CASE_PATTERN
from mixpriv.data.brats_convert import brats_to_nnunet
from mixpriv.files import mixpriv_home

__all__ = ["EMBEDDED_TISSUE", "EMBEDDED_TUMOUR", "TUMOUR_DATASET_ID", "is_brats_folder", "nnunet_copy_of_brats",
           "resolve_data_dir"]

EMBEDDED_TISSUE, EMBEDDED_TUMOUR = "embedded:tissue", "embedded:tumour"
#: nnU-Net dataset id of converted BraTS folders (the id nnU-Net's own BraTS 2021 example uses is 137;
#: 501 keeps a user's own conversions apart).
TUMOUR_DATASET_ID = 501


def resolve_data_dir(data_dir: str | Path | None, embedded_spacing: float = 2.0) -> Path:
    """The nnU-Net folder that ``data_dir`` names (see the module docstring), building or converting it if needed.

    Args:
        data_dir: a folder, ``embedded:tissue`` / ``embedded:tumour``, or ``None`` (the tissue cohort).
        embedded_spacing: voxel size (mm) of an embedded cohort.
    """
    if data_dir is None or str(data_dir) == EMBEDDED_TISSUE:
        from mixpriv.data.cohort import build_cohort, default_cohort_dir

        return build_cohort(default_cohort_dir(spacing=embedded_spacing), spacing=embedded_spacing)
    if str(data_dir) == EMBEDDED_TUMOUR:
        from mixpriv.data.tumour import build_tumour_cohort

        return nnunet_copy_of_brats(build_tumour_cohort(spacing=embedded_spacing))
    path = Path(data_dir).expanduser()
    return nnunet_copy_of_brats(path) if is_brats_folder(path) else path


def is_brats_folder(path: Path) -> bool:
    """Whether ``path`` is in the BraTS challenge layout: case folders ``BraTS2021_XXXXX`` and no ``dataset.json``.

    Example:
        >>> is_brats_folder(Path("/nonexistent"))
        False
    """
    return (path.is_dir() and not (path / "dataset.json").exists()
            and any(child.is_dir() and CASE_PATTERN.fullmatch(child.name) for child in path.iterdir()))


def nnunet_copy_of_brats(src: Path) -> Path:
    """The nnU-Net (T1ce) conversion of the BraTS folder ``src`` in the cache, made when missing or older than ``src``.

    The cache folder is named after ``src`` and a hash of its absolute path; a conversion is
    written in a temporary sibling and moved into place when complete, so an interrupted one is
    never used.
    """
    src = src.expanduser().resolve()
    key = hashlib.sha1(str(src).encode()).hexdigest()[:12]
    folder = mixpriv_home() / "converted" / f"{src.name}-{key}"
    dataset = folder / f"Dataset{TUMOUR_DATASET_ID:03d}_BraTS2021"
    marker = dataset / "dataset.json"
    if marker.is_file() and marker.stat().st_mtime >= _newest_mtime(src):
        return dataset
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        brats_to_nnunet(src, staging, dataset_id=TUMOUR_DATASET_ID)
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dataset


def _newest_mtime(root: Path) -> float:
    return max((path.stat().st_mtime for path in root.rglob("*") if path.is_file()), default=0.0)
