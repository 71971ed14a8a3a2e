"""The segmentation service: a FastAPI app that hosts only the server half of a private model.

It hosts the segmenter of any of the three private systems, and nothing else of them:

* Mixup-Privacy (kind ``mixpriv``): it is sent mixtures of a scan with secret references; it
  never holds the unmixer or a reference bank, and cannot unmix what it segments.
* Privacy-Net (``privacynet``): it is sent encoded scans ``E(x)``; it never holds the encoder
  or the identity discriminator.
* Deformation-Proxy (``deformproxy``): it is sent scans warped by a secret diffeomorphism; it
  never holds the flow-field generator, the discriminator or a key's inverse.

A baseline (kind ``baseline``) is refused: it segments raw scans, which a privacy-preserving
server must never receive. Endpoints:

* ``GET /health`` - liveness, no authentication: ``{"status": "ok"}``.
* ``GET /v1/model`` - what the model is and expects (kind, labels, spacing, orientation,
  intensity normalisation, patch size; the λ range for Mixup-Privacy) and the request limits,
  from the model card.
* ``POST /v1/segment`` - a ``.npy`` batch of K volumes ``(K, D, H, W)`` in (mixtures, or one
  encoded or deformed view per scan), their class probabilities ``(K, C, D, H, W)`` out (float16
  ``.npy``, ``Content-Encoding: gzip`` when the request's ``Accept-Encoding`` allows it, else as
  they are), whole volumes over the model's overlapping patch grid. See :mod:`mixpriv.server.wire`.

Every ``/v1`` endpoint needs ``Authorization: Bearer <token>`` (compared in constant time);
bodies over the size limit get 413 (``Content-Length`` is checked before reading, the streamed
size while reading), a body not received within the body timeout 408, malformed payloads (or
volumes whose probabilities would not be finite) 422 with a message naming the problem, a full
server (too many pending requests, or their bodies over the memory budget) 503, an inference
over the time limit 504. Connections that do not send their request headers in time are closed
and those over the connection limit refused (:mod:`mixpriv.server.limits`). Inference runs in a
bounded pool of worker threads (``workers``, one by default) so concurrent requests queue
instead of oversubscribing the CPU; a client that goes away cancels its inference. Logs hold
the method, path, status, K, shape and timing of each request, never a body. Each answer of
``/v1/segment`` carries a ``Server-Timing`` header (``decode``, ``infer``, ``encode``, in ms), so a
client can tell the network's share of a request from the server's.

Example:
    >>> from mixpriv.server.app import HostedSegmenter, ServerConfig, create_app
    >>> hosted = HostedSegmenter.from_pretrained("tissue-mixpriv-2mm")  # doctest: +SKIP
    >>> app = create_app(hosted, ServerConfig(token="s3cret"))  # doctest: +SKIP
    >>> import uvicorn; uvicorn.run(app, host="127.0.0.1", port=8000)  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from mixpriv import __version__
from mixpriv.inference.pipeline import segment_mixtures
from mixpriv.server.auth import tokens_match
from mixpriv.server.config import ServerConfig
from mixpriv.server.limits import Admission, read_body
from mixpriv.server.wire import (
    NPY_MEDIA_TYPE,
    REQUEST_DTYPES,
    RESPONSE_ENCODING,
    WireError,
    accepts_gzip,
    decode_mixtures,
    encode_probabilities,
    server_timing_header,
)

log = logging.getLogger("mixpriv.server")

_ACCEPTED_MEDIA_TYPES = (NPY_MEDIA_TYPE, "application/octet-stream")

#: The kinds of model whose segmenter the server hosts, and what of each it never loads.
HOSTED_KINDS = {
    "mixpriv": "no unmixer, no bank",
    "privacynet": "no encoder, no discriminator",
    "deformproxy": "no flow-field generator, no discriminator",
}


class _Cancelled(Exception):
    """Raised inside a worker when its request timed out: the worker stops at the next patch batch."""


class HostedSegmenter:
    """The server half of a private model: the segmenter network and the public card.

    Args:
        segmenter: the segmentation network (views ``(N, 1, p, p, p)`` -> logits ``(N, C, ...)``:
            mixtures, encoded or deformed images).
        card: the model card (``metadata.json``) the model was published with.

    Use :meth:`from_pretrained` to load a published model; it keeps only ``model.segmenter``
    and drops the client half (unmixer and demo bank, encoder, flow-field generator) and the
    discriminator.

    Example:
        >>> import torch
        >>> from mixpriv.lightning.mixup import MixupPrivacyModule
        >>> model = MixupPrivacyModule({"background": 0, "fg": 1}, {"encoder_name": "mixpriv-light-8",
        ...     "encoder_depth": 3, "decoder_channels": [16, 8, 8]}, patch_size=16, input_spacing=2.0)
        >>> card = {"name": "tiny", "labels": {"background": 0, "fg": 1}, "hparams": dict(model.hparams)}
        >>> hosted = HostedSegmenter(model.segmenter, card)
        >>> hosted.segment_mixture(torch.zeros(1, 1, 16, 16, 16)).shape
        torch.Size([1, 2, 16, 16, 16])
    """

    def __init__(self, segmenter: torch.nn.Module, card: Mapping) -> None:
        self.segmenter = segmenter.float().eval()
        self.card = dict(card)
        hparams = self.card.get("hparams", {})
        self.labels: dict[str, int] = dict(self.card.get("labels") or hparams.get("label_names") or {})
        if not self.labels:
            raise ValueError("the model card names no labels")
        self.num_classes = max(self.labels.values()) + 1
        self.patch_size = int(self.card.get("inputs", {}).get("patch_size") or hparams.get("patch_size") or 48)

    @property
    def kind(self) -> str | None:
        """The card's kind of model (``mixpriv``, ``privacynet`` or ``deformproxy`` when loaded from a folder)."""
        return self.card.get("kind")

    @classmethod
    def from_pretrained(cls, name_or_path_or_url: str, *, verify: bool = True, **kwargs) -> HostedSegmenter:
        """Load the segmenter of a published private model, and nothing else.

        The folder is resolved (and downloaded into the cache if needed) by
        :func:`mixpriv.hub.resolve_pretrained`, which takes ``kwargs``; the weights file is
        checked against the card's sha256, and only its ``segmenter.*`` tensors are read
        (safetensors, no pickle): the unmixer, encoder, flow-field generator and discriminator
        weights and the demo bank are never loaded.

        Raises:
            ValueError: the model is not one of :data:`HOSTED_KINDS` (a baseline segments raw
                scans, which a privacy-preserving server must not receive).
            ModelCardError: the card or the weights do not describe a loadable segmenter.
        """
        from safetensors import safe_open

        from mixpriv.hub import read_card, resolve_pretrained
        from mixpriv.hub.errors import ModelCardError
        from mixpriv.hub.export import WEIGHTS_FORMAT
        from mixpriv.hub.integrity import WEIGHTS_FILE, verify_file
        from mixpriv.networks import SegmenterSpec, build_segmenter

        folder = resolve_pretrained(name_or_path_or_url, **kwargs)
        card = read_card(folder)
        kind = card.get("kind")
        if kind not in HOSTED_KINDS:
            raise ValueError(f"{name_or_path_or_url} is a {kind!r} model, which segments raw scans; the server hosts "
                             f"only the segmenter of a private model, which never sees one: Mixup-Privacy ('mixpriv', "
                             f"trained on mixtures), Privacy-Net ('privacynet', on encoded scans) or "
                             f"Deformation-Proxy ('deformproxy', on deformed scans)")
        weights = folder / WEIGHTS_FILE
        if verify:
            verify_file(weights, card["files"][WEIGHTS_FILE])
        hparams = card["hparams"]
        segmenter = build_segmenter(SegmenterSpec.from_dict(hparams["segmenter"]), len(hparams["label_names"]))
        prefix = "segmenter."
        with safe_open(str(weights), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != WEIGHTS_FORMAT or metadata.get("kind") != kind:
                raise ModelCardError(f"{weights} is not the weights of a {kind} model (metadata {metadata})")
            state = {}
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                if name.startswith(prefix):
                    tensor = handle.get_tensor(name)
                    state[name[len(prefix):]] = tensor.float() if tensor.is_floating_point() else tensor
        try:
            segmenter.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise ModelCardError(f"{weights} does not hold the segmenter its card describes: {error}") from error
        log.info("loaded the segmenter of %s model %r from %s (%s)", kind, card.get("name"), folder,
                 HOSTED_KINDS[kind])
        return cls(segmenter, card)

    @torch.no_grad()
    def segment_mixture(self, mixture: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``(N, C, ...)`` of the views ``(N, 1, ...)`` it is sent (mixed, encoded or deformed
        images), as the model's own server half computes them (``softmax(segmenter(x))``)."""
        return torch.softmax(self.segmenter(mixture).float(), dim=1)

    def info(self) -> dict:
        """The public description served at ``/v1/model``; ``mixing`` (the λ range) for Mixup-Privacy only."""
        inputs = self.card.get("inputs", {})
        hparams = self.card.get("hparams", {})
        weights = self.card.get("files", {}).get("model.safetensors", {})
        info = {
            "name": self.card.get("name"),
            "kind": self.kind,
            "version": self.card.get("version"),
            "task": self.card.get("task"),
            "labels": self.labels,
            "num_classes": self.num_classes,
            "inputs": {
                "channels": inputs.get("channels", 1),
                "modality": inputs.get("modality"),
                "spacing_mm": inputs.get("spacing_mm", hparams.get("input_spacing")),
                "orientation": inputs.get("orientation"),
                "intensity_normalisation": inputs.get("intensity_normalisation"),
                "patch_size": self.patch_size,
            },
            "weights_sha256": weights.get("sha256"),
        }
        if self.kind == "mixpriv":
            info["mixing"] = {"lambda_range": (self.card.get("mixing") or {}).get("lambda_range",
                                                                                hparams.get("lambda_range"))}
        return info


class _AccessLog:
    """ASGI middleware: one log line per request with method, path, status, K, shape and time; no body."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": 500}

        async def send_with_status(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            state = scope.get("state") or {}
            shape = state.get("mixpriv_shape")
            extra = f" K={shape[0]} shape={tuple(shape)}" if shape else ""
            outcome = state.get("mixpriv_gone") or status["code"]
            log.info("%s %r %s%s %.3fs", scope.get("method"), scope.get("path"), outcome, extra,
                     time.perf_counter() - started)


def _problem(status: int, detail: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=dict(headers or {}))


async def _until_disconnected(request: Request) -> None:
    """Return when the client goes away (the body was read: the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(hosted: HostedSegmenter, config: ServerConfig | None = None) -> FastAPI:
    """Build the FastAPI app serving ``hosted`` (see the module docstring for the endpoints)."""
    config = config or ServerConfig()
    config.check()
    executor = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="mixpriv-infer")
    admission = Admission(config.max_pending, config.max_pending_bytes)
    info = hosted.info()
    info["limits"] = config.limits.as_dict()
    info["wire"] = {"request": {"media_type": NPY_MEDIA_TYPE, "dtypes": list(REQUEST_DTYPES),
                                "shape": "(K, D, H, W)"},
                    "response": {"media_type": NPY_MEDIA_TYPE, "dtype": "float16", "shape": "(K, C, D, H, W)",
                                 "content_encoding": f"{RESPONSE_ENCODING} if the request accepts it, else identity"}}
    info["server"] = {"mixpriv": __version__, "timeout_s": config.timeout_s, "body_timeout_s": config.body_timeout_s}

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="mixpriv segmentation server", version=__version__, docs_url=None, redoc_url=None,
                  openapi_url=None, lifespan=lifespan)
    app.state.hosted = hosted
    app.state.config = config

    def authorize(request: Request) -> None:
        if not config.token:
            return
        if not tokens_match(request.headers.get("authorization", ""), config.token):
            raise HTTPException(401, "missing or invalid bearer token", headers={"WWW-Authenticate": "Bearer"})

    def run_inference(mixtures: np.ndarray, cancel: threading.Event, compress: bool,
                      timing: dict[str, float]) -> bytes:
        def segment(batch: torch.Tensor) -> torch.Tensor:
            if cancel.is_set():
                raise _Cancelled
            return hosted.segment_mixture(batch)

        started = time.perf_counter()
        probabilities = segment_mixtures(segment, torch.from_numpy(mixtures)[:, None], hosted.patch_size,
                                         config.overlap, config.batch_size)
        timing["infer"] = time.perf_counter() - started
        if cancel.is_set():
            raise _Cancelled
        if not torch.isfinite(probabilities).all():
            raise WireError("the segmenter's probabilities for these volumes are not finite (are their values far "
                            "outside those of intensity-normalised scans?)")
        started = time.perf_counter()
        payload = encode_probabilities(probabilities, config.compresslevel if compress else None)
        timing["encode"] = time.perf_counter() - started
        return payload

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/model")
    async def model_info(request: Request) -> dict:
        authorize(request)
        return info

    @app.post("/v1/segment")
    async def segment(request: Request) -> Response:
        authorize(request)
        media_type = request.headers.get("content-type", NPY_MEDIA_TYPE).split(";")[0].strip().lower()
        if media_type not in _ACCEPTED_MEDIA_TYPES:
            return _problem(415, f"send the volumes as {NPY_MEDIA_TYPE} (numpy.save bytes)")
        if request.headers.get("content-encoding", "identity").strip().lower() not in ("", "identity"):
            return _problem(415, "compressed request bodies are not accepted: send the .npy bytes as they are")
        with admission.ticket() as ticket:
            try:
                body = await read_body(request, config.limits.max_body_bytes, ticket, config.body_timeout_s)
            except ClientDisconnect:
                request.state.mixpriv_gone = "client went away while sending its body"
                return Response(status_code=400)  # nobody reads it
            timing: dict[str, float] = {}
            started = time.perf_counter()
            try:
                mixtures = await asyncio.to_thread(decode_mixtures, body, config.limits)
            except WireError as error:
                return _problem(error.status, str(error))
            del body
            timing["decode"] = time.perf_counter() - started
            request.state.mixpriv_shape = mixtures.shape
            cancel = threading.Event()
            compress = accepts_gzip(request.headers.get("accept-encoding", ""))
            inference = asyncio.wrap_future(executor.submit(run_inference, mixtures, cancel, compress, timing))
            gone = asyncio.ensure_future(_until_disconnected(request))
            try:
                done, _ = await asyncio.wait((inference, gone), timeout=config.timeout_s,
                                             return_when=asyncio.FIRST_COMPLETED)
            finally:
                gone.cancel()
            if inference not in done:
                cancel.set()
                inference.cancel()
                if gone in done:
                    request.state.mixpriv_gone = "client went away: inference cancelled"
                    return Response(status_code=400)  # nobody reads it
                log.warning("inference of K=%d shape=%s timed out after %.0f s", mixtures.shape[0],
                            tuple(mixtures.shape), config.timeout_s)
                return _problem(504, f"the inference did not finish within {config.timeout_s:g} s")
            try:
                payload = inference.result()
            except WireError as error:
                return _problem(error.status, str(error))
        headers = {"Server-Timing": server_timing_header(timing)}
        if compress:
            headers["Content-Encoding"] = RESPONSE_ENCODING
        return Response(payload, media_type=NPY_MEDIA_TYPE, headers=headers)

    app.add_middleware(_AccessLog)
    return app


def set_torch_threads(threads: int | None, workers: int = 1) -> int:
    """Set torch's intra-op threads once for the server process: ``threads`` or ``cpus // workers``."""
    threads = threads or max(1, (os.cpu_count() or 1) // max(1, workers))
    torch.set_num_threads(threads)
    return threads


def serve(model: str, host: str = "127.0.0.1", port: int = 8000, token: str | None = None,
          config: ServerConfig | None = None, threads: int | None = None, ssl_certfile: str | None = None,
          ssl_keyfile: str | None = None) -> None:
    """Load ``model`` (name, folder or URL), keep its segmenter, and serve it with uvicorn until stopped.

    Example:
        >>> serve("tissue-mixpriv-2mm", port=8000, token="s3cret")  # doctest: +SKIP
    """
    import uvicorn

    config = config or ServerConfig()
    config.token = token
    used = set_torch_threads(threads, config.workers)
    hosted = HostedSegmenter.from_pretrained(model)
    app = create_app(hosted, config)
    if host not in ("127.0.0.1", "localhost", "::1") and not ssl_certfile:
        log.warning("serving on %s without TLS: the token and the volumes it segments travel in clear; put a TLS "
                    "proxy in front or pass --ssl-certfile/--ssl-keyfile", host)
    log.info("serving the segmenter of %s model %r on %s:%d with %d worker(s) x %d torch thread(s), auth %s",
             hosted.kind, hosted.card.get("name"), host, port, config.workers, used, "on" if token else "OFF")
    uvicorn.run(app, host=host, port=port, http=config.protocol(), ws="none", access_log=False, log_level="info",
                server_header=False, ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile)
