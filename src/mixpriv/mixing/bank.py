"""The client's secret key: a bank of reference images with their segmentations.

The bank never leaves the client. It is saved as a safetensors file (no pickle, no code
execution on load) created with owner-only permissions (0600), and its ``repr`` shows only
its size, so printing or logging a bank never leaks a reference image. The file records the
sha256 of its content, so a changed byte (a damaged disk, an incomplete copy) is detected on
load; a key that other users can read loads with a warning.

A bank records its *space*: the grid (shape and affine, :class:`~mixpriv.geometry.GridSpace`)
all its references lie on, so that a scan can be resampled into it by world coordinates before
it is mixed; and the patient of each reference, so that training never mixes a scan with
another scan of the same patient. A bank saved before format 3 has neither: it loads with a
warning, and scans are then mixed with it by array index, as mixpriv did before.
"""

from __future__ import annotations

import hashlib
import json
import logging
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from mixpriv.files import write_atomically
from mixpriv.geometry import GridSpace
from mixpriv.safetensors_metadata import read_format_metadata
from mixpriv.validation import (
    InputError,
    check_finite,
    check_label_names,
    check_label_values,
    check_spatial_dims,
)

log = logging.getLogger(__name__)

_FORMAT = "mixpriv-reference-bank"
#: 3: the metadata records the references' grid and patients; 2: the sha256 of the content (1: no checksum).
_FORMAT_VERSION = "3"
#: Metadata every bank holds, and those of format 3; all of them count in the sha256.
_METADATA = ("label_names", "ids")
_SPACE_METADATA = ("space", "patients")


def content_sha256(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str:
    """The sha256 a bank file records: its tensors (name, dtype, shape, bytes), label names and ids,
    and (format 3) its space and patients.

    Example:
        >>> tensors = {"images": torch.zeros(1, 1, 2, 2, 2), "labels": torch.zeros(1, 2, 2, 2, dtype=torch.uint8)}
        >>> metadata = {"label_names": '{"background": 0}', "ids": '["ref000"]'}
        >>> content_sha256(tensors, metadata) == content_sha256(tensors, {**metadata, "ids": '["ref001"]'})
        False
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    for key in _METADATA:
        digest.update(f"\n{key} {metadata.get(key, '')}".encode())
    for key in _SPACE_METADATA:
        if key in metadata:
            digest.update(f"\n{key} {metadata[key]}".encode())
    return digest.hexdigest()


def _warn_if_readable_by_others(path: Path) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("key %s is readable by other users (mode %o); chmod 600 it", path, mode)


class ReferenceBank:
    """Reference images ``(N, 1, D, H, W)`` and integer label maps ``(N, D, H, W)``.

    Args:
        images: float tensor (N, 1, D, H, W), intensity-normalised as the model expects.
        labels: integer tensor (N, D, H, W) with values in ``label_names``.
        label_names: name -> integer value, as in ``dataset.json["labels"]``.
        ids: optional identifiers of the references (kept on the client with the key).
        space: the grid the references lie on (shape and affine); ``None`` for a bank that does
            not know it (then scans are mixed with it by array index).
        patient_ids: the patient of each reference (default: each reference its own patient).

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
        space: GridSpace | None = None,
        patient_ids: Sequence[str] | None = None,
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
        label_names = check_label_names(label_names, "reference label names")
        check_label_values(labels, label_names.values(), "reference labels")
        if max(label_names.values()) > 255:
            raise InputError(f"label values up to {max(label_names.values())} do not fit the bank's uint8 labels")
        self.images = images.float().contiguous()
        self.labels = labels.to(torch.uint8).contiguous()
        self.label_names = label_names
        if ids is not None and (isinstance(ids, str) or not all(isinstance(i, str) for i in ids)):
            raise InputError(f"reference ids must be a list of strings, got {type(ids).__name__}")
        self.ids = list(ids) if ids is not None else [f"ref{i:03d}" for i in range(len(images))]
        if len(self.ids) != len(images):
            raise InputError(f"{len(self.ids)} ids given for {len(images)} references")
        self.patient_ids = list(patient_ids) if patient_ids is not None else list(self.ids)
        if len(self.patient_ids) != len(images) or not all(isinstance(p, str) for p in self.patient_ids):
            raise InputError(f"{len(images)} references need {len(images)} patient ids (strings)")
        if space is not None and space.shape != self.spatial_shape:
            raise InputError(f"the references are {self.spatial_shape} voxels but their space is {space}")
        self.space = space
        self._brain_region: torch.Tensor | None = None

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

    @property
    def brain_region(self) -> torch.Tensor:
        """Where any reference has a non-background label: a (D, H, W) bool map on the bank's grid."""
        if self._brain_region is None:
            self._brain_region = (self.labels > 0).any(0)
        return self._brain_region

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
        """Write the bank to ``path`` with owner-only permissions (0600), atomically, with its sha256.

        An existing file is never replaced unless ``overwrite`` is set, and a failed write
        leaves any existing file untouched. ``image_dtype=torch.float16`` halves the file
        (images in [0, 1] keep about three decimal digits); loading always gives float32.
        """
        if image_dtype not in (torch.float32, torch.float16):
            raise InputError(f"image_dtype must be torch.float32 or torch.float16, got {image_dtype}")
        tensors = {"images": self.images.to(image_dtype), "labels": self.labels}
        metadata = {
            "format": _FORMAT,
            "format_version": _FORMAT_VERSION,
            "label_names": json.dumps(self.label_names),
            "ids": json.dumps(self.ids),
            "patients": json.dumps(self.patient_ids),
        }
        if self.space is not None:
            metadata["space"] = json.dumps(self.space.to_dict())
        metadata["sha256"] = content_sha256(tensors, metadata)
        return write_atomically(path, lambda temporary: save_file(tensors, str(temporary), metadata=metadata),
                                mode=0o600, overwrite=overwrite, what="key")

    @classmethod
    def load(cls, path: str | Path, *, published: bool = False) -> ReferenceBank:
        """Load a bank written by :meth:`save` (safetensors: no code runs on load), checking its sha256.

        Args:
            path: the bank file.
            published: the bank is a model's published demo bank (public by design, checked
                against its model card's sha256): no warning about its permissions, nor about a
                bank saved before banks recorded their checksum.

        Raises:
            InputError: not a bank, an incomplete one, or one whose content differs from its
                recorded sha256 (a changed byte).

        Example:
            >>> import tempfile
            >>> bank = ReferenceBank(torch.rand(1, 1, 4, 4, 4), torch.zeros(1, 4, 4, 4, dtype=torch.long),
            ...                      {"background": 0})
            >>> ReferenceBank.load(bank.save(Path(tempfile.mkdtemp()) / "key.mpk"))
            ReferenceBank(1 references, spatial shape (4, 4, 4), 1 labels)
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"reference bank {path} does not exist")
        if not published:
            _warn_if_readable_by_others(path)
        metadata = read_format_metadata(path, _FORMAT, "a mixpriv reference bank")
        tensors = load_file(str(path))
        missing = sorted({"images", "labels"} - set(tensors)) + sorted({"label_names", "ids"} - set(metadata))
        if metadata.get("format_version", "1") != "1" and "sha256" not in metadata:
            missing.append("sha256")
        if missing:
            raise InputError(f"{path} is an incomplete mixpriv reference bank: it lacks {missing}")
        if "sha256" in metadata:
            if content_sha256(tensors, metadata) != metadata["sha256"]:
                raise InputError(f"reference bank {path} is corrupted: its content differs from the sha256 recorded "
                                 "when it was saved (a changed byte: a damaged disk or an incomplete copy); restore it "
                                 "from a backup or make a new key with `mixpriv keygen`")
        elif not published:
            log.warning("reference bank %s records no checksum (saved by an older mixpriv), so a damaged copy would "
                        "go unnoticed; save it again to add one", path)
        try:
            label_names, ids = json.loads(metadata["label_names"]), json.loads(metadata["ids"])
            patients = json.loads(metadata["patients"]) if "patients" in metadata else None
            space = GridSpace.from_dict(json.loads(metadata["space"])) if "space" in metadata else None
        except ValueError as error:
            raise InputError(f"reference bank {path} has unreadable metadata: {error}") from error
        if space is None and not published:
            log.warning("reference bank %s does not record the grid of its references (saved by an older mixpriv): "
                        "scans are mixed with it by array index, not in space; make a new key with `mixpriv keygen`",
                        path)
        return cls(tensors["images"].float(), tensors["labels"].long(), label_names, ids, space, patients)

    @classmethod
    def from_arrays(
        cls,
        images: Sequence[np.ndarray],
        labels: Sequence[np.ndarray],
        label_names: Mapping[str, int],
        ids: Sequence[str] | None = None,
        space: GridSpace | None = None,
    ) -> ReferenceBank:
        """Build a bank from lists of 3D numpy volumes (D, H, W) of one shape, lying on ``space``."""
        image_tensor = torch.stack([torch.as_tensor(np.asarray(i, dtype=np.float32)) for i in images])[:, None]
        label_tensor = torch.stack([torch.as_tensor(np.asarray(lab, dtype=np.int64)) for lab in labels])
        return cls(image_tensor, label_tensor, label_names, ids, space)
