"""Scans in and label maps out: NIfTI I/O that keeps the input's grid, affine and header.

Outputs are written atomically and never over an input (:mod:`mixpriv.files`): a command
declares them all with :func:`nifti_outputs` before computing, then :func:`save_like` fills
each and :meth:`~mixpriv.files.OutputFiles.commit` makes them appear together.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torchio as tio

from mixpriv.constants import IMAGE
from mixpriv.data.preprocessing import preprocessing
from mixpriv.files import OutputFiles, write_atomically
from mixpriv.geometry import GridSpace, resample_into
from mixpriv.inference.grid import sliding_window
from mixpriv.validation import (
    InputError,
    check_finite,
    check_not_blank,
    check_spatial_dims,
)

#: The file endings of the outputs written (NIfTI-1, plain or gzipped).
NIFTI_SUFFIXES = (".nii", ".nii.gz")


def read_scan(path: str | Path) -> tio.ScalarImage:
    """Read a scan (NIfTI or any format SimpleITK reads) and check it: one channel, 3D, finite, not blank.

    Raises:
        InputError: naming the file and the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"scan {path} does not exist")
    try:
        original = tio.ScalarImage(path)
        original.load()
        # nibabel reads the voxels too: SimpleITK's NIfTI reader silently turns NaN into 0.
        voxels = np.asanyarray(nib.load(str(path)).dataobj) if path.name.endswith(NIFTI_SUFFIXES) else None
    except Exception as error:  # nibabel / SimpleITK raise many types for unreadable files
        raise InputError(f"cannot read {path} as a medical image: {error}") from error
    if voxels is not None:
        check_finite(voxels, f"scan {path.name}")
    return check_scan(original, f"scan {path.name}")


def check_scan(image: tio.ScalarImage, name: str = "the scan") -> tio.ScalarImage:
    """``image`` if it is one 3D channel of finite, not all equal values; else ``InputError`` naming ``name``."""
    check_spatial_dims(image.data, name)
    if 1 in image.spatial_shape:  # TorchIO reads a 2D image as a volume one voxel thick
        raise InputError(f"{name} is 2D (spatial shape {image.spatial_shape}); a 3D volume is expected")
    if image.data.shape[0] != 1:
        raise InputError(f"{name} has {image.data.shape[0]} channels; one T1 channel is expected")
    check_finite(image.data, name)
    check_not_blank(image.data, name)
    return image


def load_scan(path: str | Path, spacing: float | None = None) -> tuple[tio.Subject, tio.ScalarImage]:
    """Read and check a scan (:func:`read_scan`), and preprocess it as the models expect.

    Returns the preprocessed subject (image key ``image``: canonical orientation, ``spacing``,
    intensities in [0, 1]) and the original image, whose grid the outputs are written back on.
    To segment privately, :func:`mixpriv.inference.scans.prepare_scan` also places the scan in
    the key's space (and can register it).
    """
    original = read_scan(path)
    return preprocess_scan(original, spacing), original


def preprocess_scan(image: tio.ScalarImage, spacing: float | None = None) -> tio.Subject:
    """A copy of ``image`` preprocessed as the models expect (:func:`mixpriv.data.preprocessing.preprocessing`),
    as a subject with the key ``image``."""
    return preprocessing(spacing)(tio.Subject({IMAGE: tio.ScalarImage(tensor=image.data, affine=image.affine)}))


def to_original_grid(volume: torch.Tensor, affine: np.ndarray, original: tio.ScalarImage, label: bool) -> torch.Tensor:
    """Resample a (C, D, H, W) volume on ``affine`` back to the original image's grid (by world coordinates).

    For class probabilities use :func:`mixpriv.geometry.probabilities_onto` and take the argmax
    afterwards: a label map resampled by nearest neighbour is blocky on a finer grid.
    """
    source = GridSpace(volume.shape[1:], affine)
    return resample_into(volume, source, GridSpace.of(original), label=label)


def nifti_outputs(paths: Mapping[str, str | os.PathLike | None],
                  inputs: Iterable[str | os.PathLike | None] = ()) -> OutputFiles:
    """Declare NIfTI outputs (name -> path; ``None`` skipped) before computing them.

    Each path must end in ``.nii`` or ``.nii.gz``, name no input, folder or other output, and
    lie in a writable folder, else :class:`~mixpriv.files.OutputError` says which; nothing is
    written until ``commit()``.

    Example:
        >>> nifti_outputs({"--out": "scan.nii.gz"}, inputs=["scan.nii.gz"])
        Traceback (most recent call last):
        ...
        mixpriv.files.OutputError: --out scan.nii.gz is the input scan.nii.gz: refusing to write over an input
    """
    return OutputFiles(paths, inputs=inputs, suffixes=NIFTI_SUFFIXES)


def nifti_like(volume: torch.Tensor | np.ndarray, original_path: str | Path, dtype=np.uint8) -> nib.Nifti1Image:
    """A 3D or 4D volume as a NIfTI image on the grid of ``original_path``, with its affine and header."""
    reference = nib.load(str(original_path))
    data = np.asarray(volume.detach().cpu() if isinstance(volume, torch.Tensor) else volume)
    if data.ndim == 4 and data.shape[0] == 1:
        data = data[0]
    elif data.ndim == 4:
        data = np.moveaxis(data, 0, -1)  # channels last, as NIfTI stores them
    if data.shape[:3] != reference.shape[:3]:
        raise InputError(f"volume shape {data.shape[:3]} does not match {original_path} shape {reference.shape[:3]}")
    header = reference.header.copy()
    header.set_data_dtype(dtype)
    image = nib.Nifti1Image(data.astype(dtype), reference.affine, header)
    image.set_qform(reference.get_qform(), code=int(reference.header["qform_code"]))
    image.set_sform(reference.get_sform(), code=int(reference.header["sform_code"]))
    return image


def save_like(volume: torch.Tensor | np.ndarray, original_path: str | Path, out_path: str | Path,
              dtype=np.uint8, outputs: OutputFiles | None = None) -> Path:
    """Write a 3D or 4D volume on the grid of ``original_path`` with its affine and header.

    Without ``outputs`` the file is written at once, atomically, and never over
    ``original_path``. With ``outputs`` (from :func:`nifti_outputs`, declaring ``out_path``)
    it goes to its temporary and appears with the other outputs on ``outputs.commit()``.
    """
    image = nifti_like(volume, original_path, dtype)
    if outputs is None:
        return write_atomically(out_path, lambda temporary: nib.save(image, str(temporary)),
                                inputs=[original_path], suffixes=NIFTI_SUFFIXES)
    return outputs.write(out_path, lambda temporary: nib.save(image, str(temporary)))


def baseline_probabilities(model: torch.nn.Module, image: torch.Tensor) -> torch.Tensor:
    """Class probabilities (C, D, H, W) of a non-private :class:`~mixpriv.lightning.BaselineSegmenter`
    on an image (1, D, H, W), patch by patch at the model's patch size."""
    return segment_volume(lambda x: torch.softmax(model(x).float(), 1), image, model.hparams.patch_size,
                          device=model.device)


def segment_volume(
    segment: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    patch_size: int,
    overlap: int | None = None,
    batch_size: int = 2,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> torch.Tensor:
    """Class probabilities (C, D, H, W) of a non-private segmenter on an image (1, D, H, W).

    ``batch_size`` patches go through ``segment`` at once (2: the fastest per patch on a 2-core CPU).
    """
    return sliding_window(lambda patches: segment(patches[IMAGE]), {IMAGE: image}, patch_size, overlap,
                          batch_size, device, progress)
