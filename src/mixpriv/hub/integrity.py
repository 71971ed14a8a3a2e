"""File names of a model folder, sha256 tables and their checks.

A model folder holds ``model.safetensors``, ``metadata.json`` (the machine-readable card),
``README.md`` (the human card) and, for Mixup-Privacy models, ``bank.mpk`` (a demo reference
bank). ``metadata.json`` records the sha256 and size of every file but itself and the README;
a registry records them for every file, ``metadata.json`` included.

Example:
    >>> import tempfile, pathlib
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = pathlib.Path(tmp) / "model.safetensors"
    ...     _ = path.write_bytes(b"abc")
    ...     file_record(path)
    {'sha256': 'ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad', 'size': 3}
    >>> check_file_name("../etc/passwd")
    Traceback (most recent call last):
    ...
    mixpriv.hub.errors.ModelCardError: unsafe file name '../etc/passwd' in a model card or registry: a plain file name is expected
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from pathlib import Path

from mixpriv.hub.errors import ChecksumError, ModelCardError

WEIGHTS_FILE = "model.safetensors"
METADATA_FILE = "metadata.json"
README_FILE = "README.md"
BANK_FILE = "bank.mpk"
#: Files that describe the others and are therefore not listed in ``metadata.json``.
UNHASHED_IN_CARD = (METADATA_FILE, README_FILE)

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_CHUNK = 1 << 20


def check_file_name(name: str) -> str:
    """Return ``name`` if it is a plain file name (no folder, no ``..``), else raise."""
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or ".." in name:
        raise ModelCardError(f"unsafe file name {name!r} in a model card or registry: a plain file name is expected")
    return name


def check_model_name(name: str) -> str:
    """Return ``name`` if it can name a model (and its cache folder), else raise.

    Example:
        >>> check_model_name("tissue-mixpriv-2mm")
        'tissue-mixpriv-2mm'
    """
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or ".." in name:
        raise ModelCardError(f"invalid model name {name!r}: use letters, digits, '.', '_' and '-' (no '/')")
    return name


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_record(path: str | Path) -> dict:
    """``{"sha256": ..., "size": ...}`` of a file."""
    path = Path(path)
    return {"sha256": sha256_file(path), "size": path.stat().st_size}


def matches(path: str | Path, record: Mapping) -> bool:
    """Whether ``path`` exists with the size (checked first, cheaply) and sha256 of ``record``."""
    path = Path(path)
    if not path.is_file():
        return False
    if record.get("size") is not None and path.stat().st_size != int(record["size"]):
        return False
    return sha256_file(path) == record["sha256"]


def verify_file(path: str | Path, record: Mapping, what: str = "") -> None:
    """Raise :class:`ChecksumError` (naming the file, expected and actual values) on a mismatch."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what or path.name} is missing: {path} does not exist")
    size = path.stat().st_size
    if record.get("size") is not None and size != int(record["size"]):
        raise ChecksumError(f"{path} has {size} bytes, expected {record['size']} (truncated or wrong file)")
    actual = sha256_file(path)
    if actual != record["sha256"]:
        raise ChecksumError(f"sha256 mismatch for {path}: expected {record['sha256']}, got {actual} "
                            "(the file is corrupted or was modified)")
