"""The HTTP half the clients share: one checked connection to a ``mixpriv serve``.

:class:`ServerConnection` holds the base URL, the bearer token and the ``httpx`` client; it
warns when the URL is neither https nor the loopback, bounds each request by a deadline from
connecting to its answer's last byte (a :class:`~mixpriv.hub.download.Deadline`, not a
per-read timeout, so a server trickling bytes cannot stall it), reads answers with size bounds
that hold through gzip (:mod:`mixpriv.server.answers`), checks ``GET /v1/model`` against the
local model (the kind of model and its labels must be the server's) and refuses here what the
server's limits would refuse, before anything is sent. Its one call that sends image data is
:meth:`ServerConnection.segment_volumes`, and it sends only the volumes it is given.

:class:`~mixpriv.server.client.PrivateClient` (Mixup-Privacy: mixtures) and
:class:`~mixpriv.server.client.ProxyClient` (Privacy-Net, Deformation-Proxy: one view per scan)
build on it.

Example:
    >>> from mixpriv.hub import from_pretrained
    >>> model = from_pretrained("tissue-mixpriv-2mm")  # doctest: +SKIP
    >>> with ServerConnection("http://127.0.0.1:8000", model, "mixpriv", token="s3cret") as server:  # doctest: +SKIP
    ...     server.segment_volumes(mixtures).shape  # mixtures: (K, 1, D, H, W)
    torch.Size([8, 4, 88, 104, 88])
"""

from __future__ import annotations

import ipaddress
import logging
import os
from typing import Self
from urllib.parse import urlsplit

import httpx
import torch

from mixpriv import __version__
from mixpriv.hub.download import Deadline
from mixpriv.server.answers import (
    MAX_INFO_BYTES,
    ServerError,
    check_model_info,
    error_detail,
    read_bounded,
)
from mixpriv.server.auth import read_token
from mixpriv.server.wire import (
    NPY_MEDIA_TYPE,
    REQUEST_DTYPES,
    WireError,
    decode_probabilities,
    encode_mixtures,
    parse_server_timing,
    response_size_limit,
)
from mixpriv.validation import InputError

log = logging.getLogger("mixpriv.server.client")

#: What the client of each kind of model keeps, which was trained with the server's segmenter.
CLIENT_HALVES = {"mixpriv": "unmixer", "privacynet": "encoder", "deformproxy": "flow-field generator"}


def is_loopback(url: str) -> bool:
    """Whether ``url`` names this machine (``localhost`` or a loopback address).

    Example:
        >>> is_loopback("http://127.0.0.1:8000"), is_loopback("https://seg.example.org")
        (True, False)
    """
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_local_model(model: torch.nn.Module | str | os.PathLike) -> torch.nn.Module:
    """``model`` itself, or the model :func:`mixpriv.hub.from_pretrained` loads from a name, folder or URL."""
    if isinstance(model, (str, os.PathLike)):
        from mixpriv.hub import from_pretrained

        return from_pretrained(model)
    return model


class ServerConnection:
    """A connection to a segmentation server hosting the segmenter of the local model's kind.

    Args:
        server_url: base URL of the server, e.g. ``http://127.0.0.1:8000``.
        model: the local model (its client half stays here; its labels and weights are checked
            against the server's).
        kind: the kind of model the server must host (``mixpriv``, ``privacynet`` or ``deformproxy``).
        token: bearer token (default ``$MIXPRIV_SERVER_TOKEN``).
        wire_dtype: dtype of the volumes sent (``float32``, or ``float16`` for half the bytes).
        timeout: seconds a request may take, from connecting to its answer's last byte.
        transport: an ``httpx`` transport (tests, proxies).
        compress_answers: ask for gzip-compressed answers (about 10x smaller, but compressing them
            costs the server seconds); default: yes, except on the loopback, where bytes cost nothing.

    Raises:
        InputError: an unknown wire dtype or a timeout that is not positive.
    """

    #: What the volumes sent are, in messages.
    sends = "volumes"

    def __init__(
        self,
        server_url: str,
        model: torch.nn.Module,
        kind: str,
        token: str | None = None,
        *,
        wire_dtype: str = "float32",
        timeout: float = 600.0,
        transport: httpx.BaseTransport | None = None,
        compress_answers: bool | None = None,
    ) -> None:
        if wire_dtype not in REQUEST_DTYPES:
            raise InputError(f"wire dtype must be one of {REQUEST_DTYPES}, got {wire_dtype!r}")
        if not timeout > 0:
            raise InputError(f"the timeout must be positive, got {timeout}")
        self.server_url = server_url.rstrip("/")
        self.model = model.eval()
        self.kind = kind
        self.wire_dtype = wire_dtype
        self.compress_answers = not is_loopback(self.server_url) if compress_answers is None else compress_answers
        token = token if token is not None else read_token()
        if urlsplit(self.server_url).scheme != "https" and not is_loopback(self.server_url):
            log.warning("%s is not https: the token and the %s travel unencrypted", self.server_url, self.sends)
        headers = {"User-Agent": f"mixpriv/{__version__}",
                   "Accept-Encoding": "gzip" if self.compress_answers else "identity"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.timeout = float(timeout)
        # A fresh connection per request: the deadline watches the sockets a request opens.
        self._http = httpx.Client(base_url=self.server_url, headers=headers, transport=transport,
                                  limits=httpx.Limits(max_keepalive_connections=0))
        self._info: dict | None = None
        #: Seconds of the server's work on the latest answer, by step (its ``Server-Timing`` header).
        self.last_server_timing: dict[str, float] = {}

    def close(self) -> None:
        """Close the HTTP connections."""
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method: str, path: str, limit: int, **kwargs) -> bytes:
        """One request, whole within ``self.timeout`` s; the body of its 200 answer (at most ``limit`` bytes).

        Raises:
            ServerError: unreachable, timed out, an error status (with the server's detail), a
                broken or oversized answer.
        """
        what = f"{method} {path}"
        response = None
        with Deadline(self.timeout) as deadline:
            left = deadline.remaining()
            request = self._http.build_request(method, path, timeout=httpx.Timeout(left, connect=min(left, 30.0)),
                                               extensions={"trace": deadline.trace}, **kwargs)
            try:
                response = self._http.send(request, stream=True)
                if response.status_code != 200:
                    raise ServerError(f"{what}: the server answered {response.status_code}: {error_detail(response)}",
                                      response.status_code)
                body = read_bounded(response, limit, what)
                self.last_server_timing = parse_server_timing(response.headers.get("server-timing", ""))
            except httpx.HTTPError as error:
                if deadline.expired:
                    raise self._timed_out(what) from error
                if response is None:
                    raise ServerError(f"cannot reach the segmentation server at {self.server_url}: {error}") from error
                raise ServerError(f"{what}: the segmentation server at {self.server_url} failed mid-answer: "
                                  f"{error}") from error
            finally:
                if response is not None:
                    response.close()
            if deadline.expired:  # the deadline cut a close-delimited answer short
                raise self._timed_out(what)
        return body

    def _timed_out(self, what: str) -> ServerError:
        return ServerError(f"{what}: the segmentation server at {self.server_url} did not answer within "
                           f"{self.timeout:g} s")

    def _check_request(self, shape: tuple[int, ...], body_bytes: int) -> None:
        """Refuse here what the server's limits would refuse: K, the sides of the volumes, the body size."""
        limits = self.server_info()["limits"]
        k, *spatial = shape
        if k > limits["max_k"]:
            raise InputError(f"K = {k} is more than the server accepts per request ({limits['max_k']})")
        if min(spatial) < limits["min_side"] or max(spatial) > limits["max_side"]:
            raise InputError(f"the scan, resampled to the model's voxel size, is {' x '.join(map(str, spatial))} "
                             f"voxels; the server takes sides of {limits['min_side']} to {limits['max_side']} voxels")
        if body_bytes > limits["max_body_bytes"]:
            raise InputError(f"{k} {self.sends} of {' x '.join(map(str, spatial))} voxels take {body_bytes} bytes, "
                             f"more than the {limits['max_body_bytes']} the server accepts: send fewer at once or "
                             f"use the float16 wire dtype (--wire-dtype float16)")

    def server_info(self) -> dict:
        """``GET /v1/model`` (cached): kind, labels, spacing, patch size, limits; checked against the local model.

        Raises:
            ServerError: the server is unreachable or its answer is broken.
            InputError: the server hosts another kind of model, or one with other labels.
        """
        if self._info is None:
            info = check_model_info(self._call("GET", "/v1/model", MAX_INFO_BYTES))
            if info.get("kind") != self.kind:
                raise InputError(f"the server hosts the segmenter of a {info.get('kind')!r} model but the local "
                                 f"model is a {self.kind!r} model: its segmenter reads other images than this "
                                 f"client sends")
            labels = info["labels"]
            local = dict(self.model.hparams.label_names)
            if labels != local:
                raise InputError(f"the server's model has labels {labels} but the local model {local}")
            card = getattr(self.model, "model_card", None) or {}
            local_sha = card.get("files", {}).get("model.safetensors", {}).get("sha256")
            if local_sha and info.get("weights_sha256") and local_sha != info["weights_sha256"]:
                log.warning("the server hosts other weights (%s) than the local model (%s): its %s was trained "
                            "with another segmenter", info.get("name"), card.get("name"), CLIENT_HALVES[self.kind])
            self._info = info
        return self._info

    def segment_volumes(self, volumes: torch.Tensor) -> torch.Tensor:
        """Send volumes ``(K, 1, D, H, W)``; return the server's probabilities ``(K, C, D, H, W)`` (float32).

        This is the only call that sends image data, and it sends only ``volumes``.

        Raises:
            InputError: the server's limits would refuse them (checked before sending).
            ServerError: the server failed, refused them or answered something malformed.
        """
        info = self.server_info()
        k, _, *spatial = volumes.shape
        expected = (k, info["num_classes"], *spatial)
        body = encode_mixtures(volumes, self.wire_dtype)
        self._check_request((k, *spatial), len(body))
        raw = self._call("POST", "/v1/segment", response_size_limit(expected), content=body,
                         headers={"Content-Type": NPY_MEDIA_TYPE})
        try:
            probabilities = decode_probabilities(raw, expected)
        except WireError as error:
            raise ServerError(f"the server's answer is malformed: {error}") from error
        return torch.from_numpy(probabilities).float()
