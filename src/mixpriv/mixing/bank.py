"""The client's secret key: a bank of reference images with their segmentations.

The bank never leaves the client. It is saved as a safetensors file (no pickle, no code
execution on load) created with owner-only permissions (0600), and its ``repr`` shows only
its size, so printing or logging a bank never leaks a reference image.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from mixpriv.safetensors_metadata import read_format_metadata
from mixpriv.validation import (
    InputError,
    check_finite,
    check_label_values,
    check_spatial_dims,
)

_FORMAT = "mixpriv-reference-bank"
_FORMAT_VERSION = "1"


class ReferenceBank:
    """Reference images ``(N, 1, D, H, W)`` and integer label maps ``(N, D, H, W)``.

    Args:
        images: float tensor (N, 1, D, H, W), intensity-normalised as the model expects.
        labels: integer tensor (N, D, H, W) with values in ``label_names``.
        label_names: name -> integer value, as in ``dataset.json["labels"]``.
        ids: optional identifiers of the references (kept on the client with the key).

    Example:
        >>> bank = ReferenceBank(torch.rand(2, 1, 4, 4, 4), torch.zeros(2, 4, 4, 4, dtype=torch.long),
        ...                      {"background": 0, "fg": 1})
        >>> bank
        ReferenceBank(2 references, spatial shape (4, 4, 4), 2 labels)
        >>> image, one_hot_label = bank.get(1)
        >>> one_hot_label.shape
        torch.Size([2, 4, 4, 4])
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        label_names: Mapping[str, int],
        ids: Sequence[str] | None = None,
    ) -> None:
        if images.ndim != 5 or images.shape[1] != 1:
            raise InputError(f"reference images must have shape (N, 1, D, H, W), got {tuple(images.shape)}")
        check_spatial_dims(labels, "reference labels", channels_first=True)
        if images.shape[0] != labels.shape[0] or images.shape[2:] != labels.shape[1:]:
            raise InputError(
                f"reference images {tuple(images.shape)} and labels {tuple(labels.shape)} do not match"
            )
        if images.shape[0] == 0:
            raise InputError("a reference bank needs at least one reference")
        check_finite(images, "reference images")
        check_label_values(labels, label_names.values(), "reference labels")
        if max(label_names.values()) > 255:
            raise InputError(f"label values up to {max(label_names.values())} do not fit the bank's uint8 labels")
        self.images = images.float().contiguous()
        self.labels = labels.to(torch.uint8).contiguous()
        self.label_names = dict(label_names)
        self.ids = list(ids) if ids is not None else [f"ref{i:03d}" for i in range(len(images))]
        if len(self.ids) != len(images):
            raise InputError(f"{len(self.ids)} ids given for {len(images)} references")

    def __len__(self) -> int:
        return self.images.shape[0]

    def __repr__(self) -> str:  # never print voxels or ids: the bank is a secret
        return (f"ReferenceBank({len(self)} references, spatial shape {tuple(self.spatial_shape)}, "
                f"{self.num_classes} labels)")

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[2:])

    @property
    def num_classes(self) -> int:
        return max(self.label_names.values()) + 1

    def get(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return reference ``index`` as (image (1, D, H, W), one-hot label (C, D, H, W))."""
        one_hot = torch.nn.functional.one_hot(self.labels[index].long(), self.num_classes)
        return self.images[index], one_hot.movedim(-1, 0).float()

    def sample_indices(self, k: int, generator: torch.Generator | None = None) -> list[int]:
        """Draw ``k`` distinct references (with replacement only when ``k`` exceeds the bank)."""
        if k <= len(self):
            return torch.randperm(len(self), generator=generator)[:k].tolist()
        return torch.randint(len(self), (k,), generator=generator).tolist()

    def save(self, path: str | Path, overwrite: bool = False, image_dtype: torch.dtype = torch.float32) -> Path:
        """Write the bank to ``path`` with owner-only permissions (0600), atomically.

        An existing file is never replaced unless ``overwrite`` is set, and a failed write
        leaves any existing file untouched. ``image_dtype=torch.float16`` halves the file
        (images in [0, 1] keep about three decimal digits); loading always gives float32.
        """
        if image_dtype not in (torch.float32, torch.float16):
            raise InputError(f"image_dtype must be torch.float32 or torch.float16, got {image_dtype}")
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace the key")
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {
            "format": _FORMAT,
            "format_version": _FORMAT_VERSION,
            "label_names": json.dumps(self.label_names),
            "ids": json.dumps(self.ids),
        }
        fd, tmp_name = tempfile.mkstemp(prefix=".bank-", dir=path.parent)
        os.close(fd)
        try:
            os.chmod(tmp_name, stat.S_IRUSR | stat.S_IWUSR)
            save_file({"images": self.images.to(image_dtype), "labels": self.labels}, tmp_name, metadata=metadata)
            os.chmod(tmp_name, stat.S_IRUSR | stat.S_IWUSR)
            os.replace(tmp_name, path)
        finally:
            if os.path.exists(tmp_name):
                os.unlink(tmp_name)
        return path

    @classmethod
    def load(cls, path: str | Path) -> ReferenceBank:
        """Load a bank written by :meth:`save` (safetensors: no code runs on load)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"reference bank {path} does not exist")
        metadata = read_format_metadata(path, _FORMAT, "a mixpriv reference bank")
        tensors = load_file(str(path))
        missing = sorted({"images", "labels"} - set(tensors)) + sorted({"label_names", "ids"} - set(metadata))
        if missing:
            raise InputError(f"{path} is an incomplete mixpriv reference bank: it lacks {missing}")
        return cls(tensors["images"].float(), tensors["labels"].long(), json.loads(metadata["label_names"]),
                   json.loads(metadata["ids"]))

    @classmethod
    def from_arrays(
        cls,
        images: Sequence[np.ndarray],
        labels: Sequence[np.ndarray],
        label_names: Mapping[str, int],
        ids: Sequence[str] | None = None,
    ) -> ReferenceBank:
        """Build a bank from lists of 3D numpy volumes (D, H, W) of one shape."""
        image_tensor = torch.stack([torch.as_tensor(np.asarray(i, dtype=np.float32)) for i in images])[:, None]
        label_tensor = torch.stack([torch.as_tensor(np.asarray(lab, dtype=np.int64)) for lab in labels])
        return cls(image_tensor, label_tensor, label_names, ids)
