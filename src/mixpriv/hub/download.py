"""Downloads into the model cache: urllib, whole-request deadlines, tqdm progress, sha256-verified atomic writes.

A file is streamed to a ``*.part`` file next to its destination and renamed into place only
after its size and sha256 match, so the cache never holds a partial or unverified file. A
file whose card gives no size is cut off at :data:`MAX_DOWNLOAD_BYTES` (or ``max_bytes``).

``timeout`` is the time the whole request may take (connect, headers and body), not the time
of one read: a :class:`Deadline` shuts the request's sockets down when it expires, so a server
that trickles a byte a second cannot hold a download open (the server client uses it too).

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

import functools
import hashlib
import http.client
import logging
import os
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Self

from mixpriv.files import mixpriv_home
from mixpriv.hub.errors import ChecksumError, DownloadError

log = logging.getLogger(__name__)

ENV_OFFLINE = "MIXPRIV_OFFLINE"
#: Seconds one network request may take, from connecting to its last byte.
DEFAULT_TIMEOUT = 120.0
#: Largest JSON document (card, registry) fetched without a known size.
MAX_JSON_BYTES = 16 << 20
#: Largest file downloaded when its card gives no size (the sha256 is only known at the end).
MAX_DOWNLOAD_BYTES = 1 << 30
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


class Deadline:
    """A whole-request time limit: at expiry, the sockets it watches are shut down.

    Socket timeouts bound one read or write; a peer that sends a byte a second never trips them.
    Shutting the socket down ends a blocked read or write in any thread at once (the caller then
    sees an error or an early end, and asks :attr:`expired` which it was).

    Use it as a context manager around the request; hand it each socket with :meth:`watch` (the
    urllib opener of :func:`deadline_opener` does), or pass :meth:`trace` as httpx's ``trace``
    request extension, which reports every new connection's socket.

    Example:
        >>> with Deadline(5.0) as deadline:
        ...     deadline.expired, 0 < deadline.remaining() <= 5.0
        (False, True)
    """

    def __init__(self, seconds: float) -> None:
        if not seconds > 0:
            raise ValueError(f"a timeout must be positive, got {seconds}")
        self.seconds = float(seconds)
        self._end = time.monotonic() + self.seconds
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._fired = False
        self._timer = threading.Timer(self.seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> Self:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()

    @property
    def expired(self) -> bool:
        """Whether the time is up."""
        return self._fired or time.monotonic() >= self._end

    def remaining(self) -> float:
        """Seconds left (at least a millisecond, so that it can serve as a socket timeout)."""
        return max(self._end - time.monotonic(), 1e-3)

    def watch(self, sock: socket.socket) -> None:
        """Shut ``sock`` down when the time is up (at once if it already is)."""
        with self._lock:
            self._sockets.append(sock)
            if self._fired:
                _shut(sock)

    def trace(self, event: str, info: Mapping[str, Any]) -> None:
        """httpx/httpcore ``trace`` extension: watch the socket of each connection the request opens."""
        if event in ("connection.connect_tcp.complete", "connection.start_tls.complete"):
            self.watch(info["return_value"].get_extra_info("socket"))

    def _expire(self) -> None:
        with self._lock:
            self._fired = True
            for sock in self._sockets:
                _shut(sock)


def _shut(sock: socket.socket) -> None:
    try:  # the plain socket method: SSLSocket.shutdown would also drop its TLS state under a reading thread
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:  # already closed, or detached by a TLS wrap
        pass


class _Watched:
    """An ``http.client`` connection that hands its socket to a :class:`Deadline` once connected."""

    sock: socket.socket

    def __init__(self, *args: Any, deadline: Deadline, **kwargs: Any) -> None:
        self.deadline = deadline
        super().__init__(*args, **kwargs)

    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        self.deadline.watch(self.sock)


class _WatchedHTTPConnection(_Watched, http.client.HTTPConnection):
    pass


class _WatchedHTTPSConnection(_Watched, http.client.HTTPSConnection):
    pass


class _DeadlineHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: Deadline) -> None:
        super().__init__()
        self.deadline = deadline

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(functools.partial(_WatchedHTTPConnection, deadline=self.deadline), req)


class _DeadlineHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: Deadline) -> None:
        super().__init__()
        self.deadline = deadline

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(functools.partial(_WatchedHTTPSConnection, deadline=self.deadline), req,
                            context=self._context)


def deadline_opener(deadline: Deadline) -> urllib.request.OpenerDirector:
    """urllib's default opener (redirects, proxies, ``file:``), its HTTP(S) sockets watched by ``deadline``."""
    return urllib.request.build_opener(_DeadlineHTTPHandler(deadline), _DeadlineHTTPSHandler(deadline))


def _timed_out(url: str, deadline: Deadline, received: int | None = None) -> DownloadError:
    after = "" if received is None else f" ({received} bytes received)"
    return DownloadError(f"fetching {url} timed out after {deadline.seconds:g} s{after}")


def _open(url: str, deadline: Deadline):
    if not is_url(url):
        raise DownloadError(f"{url!r} is not an http(s) or file URL")
    request = urllib.request.Request(url, headers={"User-Agent": _user_agent()})
    try:  # the scheme is checked above
        return deadline_opener(deadline).open(request, timeout=deadline.remaining())
    except urllib.error.HTTPError as error:
        raise DownloadError(f"fetching {url} failed: HTTP {error.code} {error.reason}") from error
    except (OSError, http.client.HTTPException) as error:  # URLError, timeouts, a cut or garbled answer
        reason = error.reason if isinstance(error, urllib.error.URLError) else error
        if deadline.expired or isinstance(reason, TimeoutError):
            raise _timed_out(url, deadline) from error
        raise DownloadError(f"fetching {url} failed: {reason}") from error


def _chunks(response, url: str, deadline: Deadline) -> Iterator[bytes]:
    """The body of ``response`` as it arrives (``read1``: no waiting for a full buffer), until the deadline."""
    received = 0
    while True:
        try:
            chunk = response.read1(_CHUNK)
        except (OSError, http.client.HTTPException) as error:
            if deadline.expired or isinstance(error, TimeoutError):
                raise _timed_out(url, deadline, received) from error
            raise DownloadError(f"fetching {url} failed after {received} bytes: {error}") from error
        if deadline.expired:  # a shut-down socket reads as the end of the body
            raise _timed_out(url, deadline, received)
        if not chunk:
            return
        received += len(chunk)
        yield chunk


def fetch_bytes(url: str, *, timeout: float = DEFAULT_TIMEOUT, max_bytes: int = MAX_JSON_BYTES) -> bytes:
    """Fetch a small document (a card, a registry) into memory, at most ``max_bytes``, within ``timeout`` s."""
    data = bytearray()
    with Deadline(timeout) as deadline, _open(url, deadline) as response:
        for chunk in _chunks(response, url, deadline):
            data += chunk
            if len(data) > max_bytes:
                raise DownloadError(f"{url} is larger than {max_bytes} bytes; is it really a JSON card or registry?")
    return bytes(data)


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
    max_bytes: int = MAX_DOWNLOAD_BYTES,
) -> Path:
    """Download ``url`` to ``dest``, verified against ``sha256`` (and ``size``), atomically.

    Args:
        timeout: seconds the whole download may take.
        max_bytes: most bytes accepted when ``size`` is not known (with a size, exactly ``size``).

    Raises:
        DownloadError: HTTP error, unreachable host, timeout, or (without ``size``) more than
            ``max_bytes`` bytes (the message names the URL).
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
        with os.fdopen(fd, "wb") as out, Deadline(timeout) as deadline, _open(url, deadline) as response:
            announced = response.headers.get("Content-Length")
            announced = int(announced) if announced and announced.isdigit() else None
            if size is not None and announced is not None and announced != size:
                raise ChecksumError(f"{url} has {announced} bytes, expected {size} for {dest.name}")
            if size is None and announced is not None and announced > max_bytes:
                raise DownloadError(f"{url} has {announced} bytes, over the {max_bytes} accepted for {dest.name}, "
                                    f"whose card gives no size")
            total = size if size is not None else announced
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name,
                      disable=not progress, leave=False) as bar:
                for chunk in _chunks(response, url, deadline):
                    received += len(chunk)
                    if size is not None and received > size:
                        raise ChecksumError(f"{url} sent more than the expected {size} bytes for {dest.name}")
                    if received > max_bytes:
                        raise DownloadError(f"{url} sent more than the {max_bytes} bytes accepted for {dest.name}, "
                                            f"whose card gives no size; nothing was kept")
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
