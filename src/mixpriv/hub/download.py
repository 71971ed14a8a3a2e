"""Downloads into the model cache: urllib, timeouts, tqdm progress, sha256-verified atomic writes.

A file is streamed to a ``*.part`` file next to its destination and renamed into place only
after its size and sha256 match, so the cache never holds a partial or unverified file.

Example:
    >>> import hashlib, pathlib, tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> src = pathlib.Path(tmp.name) / "weights.bin"
    >>> _ = src.write_bytes(b"0123456789")
    >>> dest = pathlib.Path(tmp.name) / "cache" / "copy.bin"
    >>> _ = download_file(src.as_uri(), dest, sha256=hashlib.sha256(b"0123456789").hexdigest(), progress=False)
    >>> dest.read_bytes()
    b'0123456789'
    >>> tmp.cleanup()
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from mixpriv.constants import ENV_HOME
from mixpriv.hub.errors import ChecksumError, DownloadError

log = logging.getLogger(__name__)

ENV_OFFLINE = "MIXPRIV_OFFLINE"
#: Seconds a network call may block (connect, or wait for the next chunk).
DEFAULT_TIMEOUT = 30.0
#: Largest JSON document (card, registry) fetched without a known size.
MAX_JSON_BYTES = 16 << 20
URL_SCHEMES = ("http", "https", "file")
_CHUNK = 1 << 16
_STALE_PART_SECONDS = 24 * 3600


def is_url(value: str | os.PathLike) -> bool:
    """Whether ``value`` is an ``http``, ``https`` or ``file`` URL.

    Example:
        >>> is_url("https://example.org/models/tissue/"), is_url("checkpoints/tissue")
        (True, False)
    """
    return isinstance(value, str) and urllib.parse.urlsplit(value).scheme in URL_SCHEMES


def join_url(base: str, name: str) -> str:
    """``name`` (a file name, or a full URL) resolved against the folder URL ``base``.

    Example:
        >>> join_url("https://example.org/models/tissue", "model.safetensors")
        'https://example.org/models/tissue/model.safetensors'
    """
    if is_url(name):
        return name
    return urllib.parse.urljoin(base if base.endswith("/") else base + "/", urllib.parse.quote(name))


def mixpriv_home() -> Path:
    """``$MIXPRIV_HOME``, else ``~/.cache/mixpriv``."""
    return Path(os.environ.get(ENV_HOME) or "~/.cache/mixpriv").expanduser()


def models_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Root of the model cache: ``cache_dir`` if given, else ``$MIXPRIV_HOME/models``."""
    return Path(cache_dir).expanduser() if cache_dir is not None else mixpriv_home() / "models"


def offline_mode(offline: bool | None = None) -> bool:
    """``offline`` if given, else whether ``$MIXPRIV_OFFLINE`` is set to 1/true/yes/on."""
    if offline is not None:
        return bool(offline)
    return os.environ.get(ENV_OFFLINE, "").strip().lower() in ("1", "true", "yes", "on")


def _user_agent() -> str:
    from mixpriv import __version__

    return f"mixpriv/{__version__} (+urllib)"


def _open(url: str, timeout: float):
    if not is_url(url):
        raise DownloadError(f"{url!r} is not an http(s) or file URL")
    request = urllib.request.Request(url, headers={"User-Agent": _user_agent()})
    try:
        return urllib.request.urlopen(request, timeout=timeout)  # the scheme is checked above
    except urllib.error.HTTPError as error:
        raise DownloadError(f"fetching {url} failed: HTTP {error.code} {error.reason}") from error
    except urllib.error.URLError as error:
        reason = error.reason
        if isinstance(reason, TimeoutError):
            raise DownloadError(f"fetching {url} timed out after {timeout:g} s") from error
        raise DownloadError(f"fetching {url} failed: {reason}") from error
    except TimeoutError as error:
        raise DownloadError(f"fetching {url} timed out after {timeout:g} s") from error
    except OSError as error:
        raise DownloadError(f"fetching {url} failed: {error}") from error


def fetch_bytes(url: str, *, timeout: float = DEFAULT_TIMEOUT, max_bytes: int = MAX_JSON_BYTES) -> bytes:
    """Fetch a small document (a card, a registry) into memory, at most ``max_bytes``."""
    with _open(url, timeout) as response:
        try:
            data = response.read(max_bytes + 1)
        except TimeoutError as error:
            raise DownloadError(f"fetching {url} timed out after {timeout:g} s") from error
        except OSError as error:
            raise DownloadError(f"fetching {url} failed: {error}") from error
    if len(data) > max_bytes:
        raise DownloadError(f"{url} is larger than {max_bytes} bytes; is it really a JSON card or registry?")
    return data


def _remove_stale_parts(dest: Path) -> None:
    """Delete ``*.part`` files of ``dest`` left by a killed download more than a day ago."""
    now = time.time()
    for part in dest.parent.glob(f"{dest.name}.*.part"):
        try:
            if now - part.stat().st_mtime > _STALE_PART_SECONDS:
                part.unlink()
        except OSError:
            pass


def download_file(
    url: str,
    dest: str | os.PathLike,
    *,
    sha256: str,
    size: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    progress: bool = True,
) -> Path:
    """Download ``url`` to ``dest``, verified against ``sha256`` (and ``size``), atomically.

    Raises:
        DownloadError: HTTP error, unreachable host or timeout (the message names the URL).
        ChecksumError: the bytes received do not have the expected size or sha256 (the message
            names the file, the expected and the actual value); nothing is left at ``dest``.
    """
    from tqdm.auto import tqdm

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_parts(dest)
    fd, part_name = tempfile.mkstemp(prefix=f"{dest.name}.", suffix=".part", dir=dest.parent)
    part = Path(part_name)
    digest = hashlib.sha256()
    received = 0
    try:
        with os.fdopen(fd, "wb") as out, _open(url, timeout) as response:
            announced = response.headers.get("Content-Length")
            announced = int(announced) if announced and announced.isdigit() else None
            if size is not None and announced is not None and announced != size:
                raise ChecksumError(f"{url} has {announced} bytes, expected {size} for {dest.name}")
            total = size if size is not None else announced
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name,
                      disable=not progress, leave=False) as bar:
                while True:
                    try:
                        chunk = response.read(_CHUNK)
                    except TimeoutError as error:
                        raise DownloadError(f"downloading {url} timed out after {timeout:g} s "
                                            f"({received} bytes received)") from error
                    except OSError as error:
                        raise DownloadError(f"downloading {url} failed after {received} bytes: {error}") from error
                    if not chunk:
                        break
                    received += len(chunk)
                    if size is not None and received > size:
                        raise ChecksumError(f"{url} sent more than the expected {size} bytes for {dest.name}")
                    digest.update(chunk)
                    out.write(chunk)
                    bar.update(len(chunk))
        if size is not None and received != size:
            raise ChecksumError(f"{url} ended after {received} of {size} bytes for {dest.name} (truncated)")
        actual = digest.hexdigest()
        if actual != sha256:
            raise ChecksumError(f"sha256 mismatch for {dest.name} downloaded from {url}: expected {sha256}, "
                                f"got {actual}; the file was not kept")
        os.replace(part, dest)
    finally:
        if part.exists():
            part.unlink()
    log.info("downloaded %s (%d bytes) to %s", url, received, dest)
    return dest
