"""The client of the segmentation service: mix locally, send only mixtures, unmix locally.

The client holds the secret key (a :class:`~mixpriv.mixing.ReferenceBank`) and the local
Mixup-Privacy model, of which it uses only the unmixer. For each scan it draws K references
and K weights λ (K composites of R references and their weights for a model trained with
K-way mixing), sends the K mixtures ``(K, D, H, W)`` to ``POST /v1/segment`` and unmixes the
K probability maps it gets back (learned by default, naive on request), then averages them
(test-time augmentation, whose variance is an uncertainty map).

What crosses the wire: the ``.npy`` bytes of the mixtures (their dtype and shape in its
header) and the bearer token. Never λ, a reference or its id, the NIfTI header or affine, the
file name or the raw image.

What the server can do to the client is bounded too: each request must end within ``timeout``
seconds from start to last byte (a :class:`~mixpriv.hub.download.Deadline`, not a per-read
timeout, so a server trickling bytes cannot stall it), answers are read with size bounds that
hold through gzip and ``GET /v1/model`` is checked field by field
(:mod:`mixpriv.server.answers`); mixtures the server's limits would refuse (a scan too small
for them, too many references, too many bytes) are refused here, before anything is sent.

Example:
    >>> from mixpriv.server import PrivateClient
    >>> client = PrivateClient("http://127.0.0.1:8000", "key.mpk", "tissue-mixpriv-2mm",
    ...                        token="s3cret", k=8)  # doctest: +SKIP
    >>> written = client.segment_file("scan.nii.gz", "seg.nii.gz", variance="var.nii.gz")  # doctest: +SKIP
    >>> written.labels  # doctest: +SKIP
    PosixPath('seg.nii.gz')
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self
from urllib.parse import urlsplit

import httpx
import numpy as np
import torch

from mixpriv import __version__
from mixpriv.hub.download import Deadline
from mixpriv.inference.mixtures import client_generator
from mixpriv.inference.pipeline import (
    PrivatePipeline,
    PrivateSegmentation,
    check_methods,
)
from mixpriv.inference.scans import check_key_for_model
from mixpriv.mixing.bank import ReferenceBank
from mixpriv.mixing.settings import MixingSettings
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


def _is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class WrittenSegmentation:
    """Files written by :meth:`PrivateClient.segment_file`, and the result on the model's grid."""

    labels: Path
    probabilities: Path | None
    variance: Path | None
    result: PrivateSegmentation


class PrivateClient:
    """Private segmentation through a remote ``mixpriv serve``.

    Args:
        server_url: base URL of the server, e.g. ``http://127.0.0.1:8000``.
        key: the client's secret reference bank, or the path of one (``mixpriv keygen``).
        model: the local Mixup-Privacy model (its unmixer is used), or what
            :func:`mixpriv.hub.from_pretrained` takes (name, folder, URL).
        token: bearer token (default ``$MIXPRIV_SERVER_TOKEN``).
        k: references (mixtures) per scan.
        method: ``learned`` (the model's unmixer) or ``naive`` (Eq. 4).
        mixing: how to mix (λ range, references per mixture, Dirichlet α); default the model's
            training settings.
        overlap: least patch-grid overlap of the local unmixing.
        seed: seed of the draws of references and λ (``None``: fresh randomness; a fixed seed
            only reproduces a run, and is warned about: see :func:`~mixpriv.inference.mixtures.client_generator`).
        wire_dtype: dtype of the mixtures sent (``float32``, or ``float16`` for half the bytes).
        timeout: seconds a request may take, from connecting to its answer's last byte.
        transport: an ``httpx`` transport (tests, proxies).
        compress_answers: ask for gzip-compressed answers (about 10x smaller, but compressing 8 mixed
            probability maps of 88 x 104 x 88 costs the server seconds); default: yes, except on the
            loopback, where bytes cost nothing.

    Example:
        >>> client = PrivateClient("http://127.0.0.1:8000", bank, model, token="s3cret")  # doctest: +SKIP
        >>> result = client.segment(image)  # image: preprocessed (1, D, H, W)  # doctest: +SKIP
        >>> result.labels.shape, result.variance.shape  # doctest: +SKIP
    """

    def __init__(
        self,
        server_url: str,
        key: ReferenceBank | str | os.PathLike,
        model,
        token: str | None = None,
        k: int = 8,
        method: str = "learned",
        *,
        mixing: MixingSettings | None = None,
        overlap: int | None = None,
        seed: int | None = None,
        wire_dtype: str = "float32",
        timeout: float = 600.0,
        transport: httpx.BaseTransport | None = None,
        compress_answers: bool | None = None,
    ) -> None:
        (method,) = check_methods((method,))
        if wire_dtype not in REQUEST_DTYPES:
            raise InputError(f"wire dtype must be one of {REQUEST_DTYPES}, got {wire_dtype!r}")
        if k < 1:
            raise InputError(f"the number of references K must be at least 1, got {k}")
        if not timeout > 0:
            raise InputError(f"the timeout must be positive, got {timeout}")
        if not isinstance(key, ReferenceBank):
            key = ReferenceBank.load(key)
        if isinstance(model, (str, os.PathLike)):
            from mixpriv.hub import from_pretrained

            model = from_pretrained(model)
        if not hasattr(model, "unmix"):
            raise InputError(f"the local model must be a Mixup-Privacy model with an unmixer, got "
                             f"{type(model).__name__}")
        check_key_for_model(key, model.num_classes, model.hparams.get("input_spacing"))
        self.server_url = server_url.rstrip("/")
        self.key = key
        self.model = model.eval()
        self.k = k
        self.method = method
        self.pipeline = PrivatePipeline.of_model(
            model, segment_volumes=self.segment_mixtures,
            mixing=(mixing or MixingSettings.of_model(model.hparams)).check_bank(len(key)), overlap=overlap)
        self.wire_dtype = wire_dtype
        self.compress_answers = not _is_loopback(self.server_url) if compress_answers is None else compress_answers
        self.generator = client_generator(seed)
        token = token if token is not None else read_token()
        if urlsplit(self.server_url).scheme != "https" and not _is_loopback(self.server_url):
            log.warning("%s is not https: the token and the mixtures travel unencrypted", self.server_url)
        headers = {"User-Agent": f"mixpriv/{__version__}",
                   "Accept-Encoding": "gzip" if self.compress_answers else "identity"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.timeout = float(timeout)
        # A fresh connection per request (two per scan): the deadline watches the sockets a request opens.
        self._http = httpx.Client(base_url=self.server_url, headers=headers, transport=transport,
                                  limits=httpx.Limits(max_keepalive_connections=0))
        self._info: dict | None = None
        #: Seconds of the server's work on the latest answer, by step (its ``Server-Timing`` header).
        self.last_server_timing: dict[str, float] = {}

    def __repr__(self) -> str:  # never show the key's content or the token
        return f"PrivateClient({self.server_url!r}, {self.key!r}, k={self.k}, method={self.method!r})"

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
        """Refuse here what the server's limits would refuse: K, the sides of the mixtures, the body size."""
        limits = self.server_info()["limits"]
        k, *spatial = shape
        if k > limits["max_k"]:
            raise InputError(f"K = {k} is more than the server accepts per request ({limits['max_k']})")
        if min(spatial) < limits["min_side"] or max(spatial) > limits["max_side"]:
            raise InputError(f"the scan, resampled to the model's voxel size, is {' x '.join(map(str, spatial))} "
                             f"voxels; the server takes sides of {limits['min_side']} to {limits['max_side']} voxels")
        if body_bytes > limits["max_body_bytes"]:
            raise InputError(f"{k} mixtures of {' x '.join(map(str, spatial))} voxels take {body_bytes} bytes, more "
                             f"than the {limits['max_body_bytes']} the server accepts: use a smaller K or "
                             f"--wire-dtype float16")

    def server_info(self) -> dict:
        """``GET /v1/model`` (cached): labels, spacing, patch size, λ range, limits; checked against the local model."""
        if self._info is None:
            info = check_model_info(self._call("GET", "/v1/model", MAX_INFO_BYTES))
            labels = info["labels"]
            local = dict(self.model.hparams.label_names)
            if labels != local:
                raise InputError(f"the server's model has labels {labels} but the local model {local}")
            local_sha = (getattr(self.model, "model_card", None) or {}).get("files", {}).get(
                "model.safetensors", {}).get("sha256")
            if local_sha and info.get("weights_sha256") and local_sha != info["weights_sha256"]:
                log.warning("the server hosts other weights (%s) than the local model (%s): its unmixer was trained "
                            "with another segmenter", info.get("name"), (self.model.model_card or {}).get("name"))
            self._info = info
        return self._info

    def segment_mixtures(self, mixtures: torch.Tensor) -> torch.Tensor:
        """Send mixtures ``(K, 1, D, H, W)``; return the server's probabilities ``(K, C, D, H, W)`` (float32).

        This is the only call that sends image data, and it sends only ``mixtures``.
        """
        info = self.server_info()
        k, _, *spatial = mixtures.shape
        expected = (k, info["num_classes"], *spatial)
        body = encode_mixtures(mixtures, self.wire_dtype)
        self._check_request((k, *spatial), len(body))
        raw = self._call("POST", "/v1/segment", response_size_limit(expected), content=body,
                         headers={"Content-Type": NPY_MEDIA_TYPE})
        try:
            probabilities = decode_probabilities(raw, expected)
        except WireError as error:
            raise ServerError(f"the server's answer is malformed: {error}") from error
        return torch.from_numpy(probabilities).float()

    def segment(self, image: torch.Tensor) -> PrivateSegmentation:
        """Privately segment an image ``(1, D, H, W)`` on the key's grid, normalised as the card says
        (:func:`mixpriv.inference.scans.prepare_scan` places a scan there).

        Returns the unmixed per-reference probabilities with their average and variance.
        """
        info = self.server_info()
        lambda_range = self.pipeline.mixing.lambda_range
        server_range = (info.get("mixing") or {}).get("lambda_range")
        if server_range and tuple(server_range) != tuple(lambda_range):
            log.warning("mixing with λ in %s, not the range %s the server's model was trained on", lambda_range,
                        tuple(server_range))
        return self.pipeline(image.float(), self.key, self.k, (self.method,), self.generator)[self.method]

    def segment_batch(self, images: Sequence[torch.Tensor], request_size: int | None = None) -> list[PrivateSegmentation]:
        """Privately segment several images (1, D, H, W), their mixtures sent shuffled together.

        The ``shuffled`` request design: the K mixtures of every image are pooled, put in a random
        order (the client's secret, like λ) and sent ``request_size`` at a time (default K), so no
        request holds the K mixtures of one scan and their mean is not there for the taking. A
        server can still try to regroup them by content: ``mixpriv audit --request-designs
        shuffled`` measures how well it does, and what that leaves of privacy.

        Raises:
            InputError: fewer than two images (nothing to shuffle with), or a ``request_size`` below 1.
        """
        if len(images) < 2:
            raise InputError("the shuffled design needs at least two scans to shuffle together; "
                             "use segment() for one")
        size = request_size or self.k
        if size < 1:
            raise InputError(f"request_size must be at least 1, got {size}")
        mixed_runs = [self.pipeline.mix(image.float(), self.key, self.k, self.generator) for image in images]
        mixtures = torch.cat([run.mixtures for run in mixed_runs])
        order = torch.randperm(len(mixtures), generator=self.generator)
        answers = torch.cat([self.segment_mixtures(mixtures[order[i:i + size]]) for i in range(0, len(order), size)])
        mixed = torch.empty_like(answers)
        mixed[order] = answers
        return [self.pipeline.unmix_answer(run, mixed[i * self.k:(i + 1) * self.k], (self.method,))[self.method]
                for i, run in enumerate(mixed_runs)]

    def segment_file(
        self,
        path: str | os.PathLike,
        out: str | os.PathLike,
        probabilities: str | os.PathLike | None = None,
        variance: str | os.PathLike | None = None,
        inputs: Sequence[str | os.PathLike | None] = (),
        register: bool = False,
    ) -> WrittenSegmentation:
        """Segment a NIfTI scan and write the label map on its grid, affine and header.

        Every output is checked (a NIfTI name in a writable folder, never ``path`` nor another of
        ``inputs``) before anything is sent, and they all appear together at the end: a failure
        leaves every earlier output as it was.

        Args:
            path: the scan, read and placed locally in the key's space
                (:func:`mixpriv.inference.scans.prepare_scan`).
            out: label map to write (uint8): the argmax of the probabilities resampled onto the scan's grid.
            probabilities: also write the averaged class probabilities (float32, channels last).
            variance: also write the TTA variance summed over classes (float32).
            inputs: other input files no output may replace (the key, the model).
            register: register the scan to the key's template first (scans in scanner space).
        """
        from mixpriv.inference.scans import TemplateSpace, prepare_scan
        from mixpriv.inference.volume import nifti_outputs, save_like

        with nifti_outputs({"--out": out, "--probabilities": probabilities, "--variance": variance},
                           inputs=(path, *inputs)) as outputs:
            info = self.server_info()
            spacing = info.get("inputs", {}).get("spacing_mm")
            local_spacing = self.model.hparams.get("input_spacing")
            if spacing != local_spacing:
                raise InputError(f"the server's model expects {spacing} mm voxels but the local model "
                                 f"{local_spacing} mm")
            scan = prepare_scan(path, TemplateSpace.of_key(self.key), spacing=spacing, register=register)
            result = self.segment(scan.image)
            native = scan.probabilities_to_native(result.probabilities)
            maps = {"--out": (native.argmax(0, keepdim=True).to(torch.uint8), np.uint8),
                    "--probabilities": (native, np.float32),
                    "--variance": (scan.to_native(result.variance.sum(0, keepdim=True)), np.float32)}
            for name, target in outputs.paths.items():
                volume, dtype = maps[name]
                save_like(volume, path, target, dtype=dtype, outputs=outputs)
            written = outputs.commit()
        return WrittenSegmentation(written["--out"], written.get("--probabilities"), written.get("--variance"),
                                   result)
