"""Check what a safetensors file holds before loading it (its header metadata names mixpriv's format)."""

from __future__ import annotations

from pathlib import Path

from mixpriv.validation import InputError


def read_format_metadata(path: str | Path, expected_format: str, what: str,
                         error: type[Exception] = InputError) -> dict[str, str]:
    """Return the header metadata of ``path``; raise ``error`` unless its ``format`` is ``expected_format``.

    Args:
        path: a safetensors file (only its JSON header is read: no tensor, no code).
        expected_format: the ``format`` value mixpriv wrote into the metadata.
        what: the kind of file with its article, for the error message (e.g. "a mixpriv reference bank").
        error: the exception class raised for an unreadable or foreign file.

    Example:
        >>> import tempfile, os, torch
        >>> from safetensors.torch import save_file
        >>> path = os.path.join(tempfile.mkdtemp(), "x.safetensors")
        >>> save_file({"x": torch.zeros(1)}, path, metadata={"format": "demo"})
        >>> read_format_metadata(path, "demo", "a demo file")["format"]
        'demo'
        >>> read_format_metadata(path, "other", "another file")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        mixpriv.validation.InputError: ... is not another file (format 'demo')
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as failure:  # safetensors raises several types for a corrupt header
        raise error(f"{path} is not readable as {what}: {failure}") from failure
    if metadata.get("format") != expected_format:
        raise error(f"{path} is not {what} (format {metadata.get('format')!r})")
    return metadata
