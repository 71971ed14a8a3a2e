"""Writing files so that a reader never sees half of one: temp file in the same folder, then rename."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_text_atomically(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file and an atomic rename.

    An interrupted write leaves the previous file (or none) in place, never a truncated one.

    Example:
        >>> import tempfile
        >>> path = write_text_atomically(Path(tempfile.mkdtemp()) / "card.json", '{"a": 1}\\n')
        >>> path.read_text()
        '{"a": 1}\\n'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
