"""Writing output files so that nothing already written is lost: never over an input, never half a file.

Every output goes to a temporary file in its own folder first and is renamed into place
(``os.replace``, atomic on one file system) only once it is complete. :class:`OutputFiles`
does it for a set of outputs: declaring them checks every path and reserves the temporaries,
so that an input given as an output, a folder, an unwritable folder or a wrong extension
fails before any computation; a failed write (a full disk) leaves every previous output as
it was; :meth:`OutputFiles.commit` renames them all at the end. :func:`write_atomically` and
:func:`write_text_atomically` do it for one file.

Example:
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> with OutputFiles({"--out": folder / "seg.txt", "--report": folder / "report.txt"}) as outputs:
    ...     _ = outputs.write(folder / "seg.txt", lambda tmp: tmp.write_text("labels"))
    ...     _ = outputs.write(folder / "report.txt", lambda tmp: tmp.write_text("report"))
    ...     written = outputs.commit()
    >>> sorted(p.name for p in folder.iterdir())  # no temporary left
    ['report.txt', 'seg.txt']
    >>> OutputFiles({"--out": folder / "seg.txt"}, inputs=[folder / "seg.txt"])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    mixpriv.files.OutputError: --out ... is the input ...seg.txt: refusing to write over an input
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Self

from mixpriv.constants import ENV_HOME

PathLike = str | os.PathLike
#: Writes a file's content to the path it is given (the temporary file).
Writer = Callable[[Path], object]


def mixpriv_home() -> Path:
    """Where mixpriv keeps what it builds or downloads (cohorts, conversions, models): ``$MIXPRIV_HOME``,
    else ``~/.cache/mixpriv``.

    Example:
        >>> mixpriv_home().name in ("mixpriv", os.path.basename(os.environ.get(ENV_HOME, "")))
        True
    """
    return Path(os.environ.get(ENV_HOME) or "~/.cache/mixpriv").expanduser()


class OutputError(ValueError):
    """An output that cannot or must not be written: an input, a folder, a wrong extension, no permission, no space."""


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (links followed), or would once created."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one does not exist (yet)
        return a.resolve() == b.resolve()


def check_output_path(path: PathLike, *, what: str = "output", inputs: Iterable[PathLike | None] = (),
                      suffixes: Sequence[str] | None = None) -> Path:
    """Check that ``path`` may be written: not an input, not a folder, under folders, with an allowed ending.

    Args:
        path: the output file.
        what: how the messages name it (e.g. ``"--out"``).
        inputs: files the output must not replace (``None`` entries are skipped).
        suffixes: allowed endings (e.g. ``(".nii", ".nii.gz")``); any when ``None``.

    Raises:
        OutputError: naming the problem.

    Example:
        >>> check_output_path("seg.txt", what="--out", suffixes=(".nii", ".nii.gz"))
        Traceback (most recent call last):
        ...
        mixpriv.files.OutputError: --out seg.txt must end in .nii or .nii.gz
    """
    path = Path(path)
    if path.is_dir():
        example = path / f"output{suffixes[-1] if suffixes else ''}"
        raise OutputError(f"{what} {path} is a folder; give a file name, e.g. {example}")
    for source in inputs:
        if source is not None and _same_file(path, Path(source)):
            raise OutputError(f"{what} {path} is the input {source}: refusing to write over an input")
    if suffixes and not path.name.endswith(tuple(suffixes)):
        raise OutputError(f"{what} {path} must end in {' or '.join(suffixes)}")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"cannot write {what} {path}: {parent} is a file, not a folder")
            break
    return path


class OutputFiles:
    """Output files written all or none, each through a temporary file in its folder.

    Declaring the outputs checks each path (:func:`check_output_path`; two outputs may not
    share a path) and creates its folder and an empty temporary file next to it, so that an
    unwritable folder fails at once. :meth:`write` fills a temporary; :meth:`commit` renames
    every temporary onto its output. Leaving the ``with`` block without committing (an error)
    removes the temporaries and the folders it created: previous outputs stay as they were.

    Args:
        paths: name for the messages (e.g. ``"--out"``) -> output path; ``None`` paths are skipped.
        inputs: files no output may replace.
        suffixes: allowed endings of the outputs (any when ``None``).
        mode: permissions of the written files.
        overwrite: whether an existing output may be replaced (else :class:`FileExistsError`).

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> with OutputFiles({"key": folder / "key.mpk"}, mode=0o600) as outputs:
        ...     _ = outputs.write(folder / "key.mpk", lambda tmp: tmp.write_bytes(b"secret"))
        ...     outputs.commit()  # doctest: +ELLIPSIS
        {'key': PosixPath('.../key.mpk')}
        >>> oct((folder / "key.mpk").stat().st_mode & 0o777)
        '0o600'
    """

    def __init__(self, paths: Mapping[str, PathLike | None], *, inputs: Iterable[PathLike | None] = (),
                 suffixes: Sequence[str] | None = None, mode: int = 0o644, overwrite: bool = True) -> None:
        inputs = list(inputs)
        self.mode = mode
        self.overwrite = overwrite
        self._names: dict[Path, str] = {}
        self._temporaries: dict[Path, Path] = {}
        self._written: set[Path] = set()
        self._created_folders: list[Path] = []
        try:
            for name, path in paths.items():
                if path is not None:
                    self._declare(name, Path(path), inputs, suffixes)
        except BaseException:
            self.discard()
            raise

    def _declare(self, name: str, path: Path, inputs: list, suffixes: Sequence[str] | None) -> None:
        check_output_path(path, what=name, inputs=inputs, suffixes=suffixes)
        for other, other_name in self._names.items():
            if _same_file(path, other):
                raise OutputError(f"{name} and {other_name} are the same file {path}")
        self._check_overwrite(path)
        self._created_folders += [folder for folder in (path.parent, *path.parent.parents) if not folder.exists()]
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise OutputError(f"cannot write {name} {path}: cannot create folder {path.parent} "
                              f"({error.strerror or error})") from error
        try:
            fd, temporary = tempfile.mkstemp(prefix=".tmp-", suffix=f"-{path.name}", dir=path.parent)
        except OSError as error:
            raise OutputError(f"cannot write {name} {path}: folder {path.parent} is not writable "
                              f"({error.strerror or error})") from error
        os.close(fd)
        self._names[path] = name
        self._temporaries[path] = Path(temporary)

    def _check_overwrite(self, path: Path) -> None:
        if path.exists() and not self.overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.discard()

    @property
    def paths(self) -> dict[str, Path]:
        """Name -> path of the declared outputs, in declaration order."""
        return {name: path for path, name in self._names.items()}

    def write(self, path: PathLike, write: Writer) -> Path:
        """Write output ``path``'s content with ``write(temporary)``; it appears at ``path`` on :meth:`commit`.

        The temporary keeps ``path``'s name as its ending, so writers that pick a format by
        extension (``nib.save``) write the right one. Returns ``path``.

        Raises:
            OutputError: the write failed (e.g. no space left): no output is committed.
        """
        path = Path(path)
        if path not in self._temporaries:
            raise KeyError(f"{path} is not one of the declared outputs {[str(p) for p in self._names]}")
        temporary = self._temporaries[path]
        try:
            write(temporary)
            with open(temporary, "rb") as handle:  # on disk before the rename makes it visible
                os.fsync(handle.fileno())
            os.chmod(temporary, self.mode)
        except OSError as error:
            self.discard()
            raise OutputError(f"cannot write {self._names[path]} {path}: {error.strerror or error}; "
                              "no output was changed") from error
        self._written.add(path)
        return path

    def commit(self) -> dict[str, Path]:
        """Rename every temporary onto its output; return name -> path of the outputs written.

        Raises:
            RuntimeError: an output was declared but not written (nothing is renamed).
        """
        unwritten = [str(path) for path in self._temporaries if path not in self._written]
        if unwritten:
            raise RuntimeError(f"outputs {unwritten} were declared but never written")
        for path in self._temporaries:
            self._check_overwrite(path)
        written = {}
        for path, temporary in list(self._temporaries.items()):
            os.replace(temporary, path)
            del self._temporaries[path]
            written[self._names[path]] = path
        self._created_folders.clear()
        return written

    def discard(self) -> None:
        """Remove the temporaries not committed and the folders created for them (when left empty)."""
        for temporary in self._temporaries.values():
            temporary.unlink(missing_ok=True)
        self._temporaries.clear()
        for folder in sorted(set(self._created_folders), key=lambda f: len(f.parts), reverse=True):
            try:
                folder.rmdir()
            except OSError:  # not empty (another file appeared in it) or never created: keep it
                pass
        self._created_folders.clear()


def write_atomically(path: PathLike, write: Writer, *, inputs: Iterable[PathLike | None] = (),
                     suffixes: Sequence[str] | None = None, mode: int = 0o644, overwrite: bool = True,
                     what: str = "output") -> Path:
    """Write one file through a temporary file in its folder and an atomic rename (see :class:`OutputFiles`).

    Example:
        >>> import tempfile
        >>> path = write_atomically(Path(tempfile.mkdtemp()) / "data.bin", lambda tmp: tmp.write_bytes(b"\\x00\\x01"))
        >>> path.read_bytes()
        b'\\x00\\x01'
    """
    with OutputFiles({what: path}, inputs=inputs, suffixes=suffixes, mode=mode, overwrite=overwrite) as outputs:
        outputs.write(path, write)
        return outputs.commit()[what]


def write_text_atomically(path: PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file and an atomic rename.

    An interrupted write leaves the previous file (or none) in place, never a truncated one.

    Example:
        >>> import tempfile
        >>> path = write_text_atomically(Path(tempfile.mkdtemp()) / "card.json", '{"a": 1}\\n')
        >>> path.read_text()
        '{"a": 1}\\n'
    """
    return write_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))
