"""The clients of the segmentation service: the client half of each private system runs here.

* :class:`PrivateClient` (Mixup-Privacy) holds the secret key (a
  :class:`~mixpriv.mixing.ReferenceBank`) and the local Mixup-Privacy model, of which it uses
  only the unmixer. For each scan it draws K references and K weights λ (K composites of R
  references and their weights for a model trained with K-way mixing), sends the K mixtures
  ``(K, D, H, W)`` to ``POST /v1/segment`` and unmixes the K probability maps it gets back
  (learned by default, naive on request), then averages them (test-time augmentation, whose
  variance is an uncertainty map). What crosses the wire: the ``.npy`` bytes of the mixtures
  (their dtype and shape in its header) and the bearer token. Never λ, a reference or its id,
  the NIfTI header or affine, the file name or the raw image.
* :class:`ProxyClient` (the compared systems, Privacy-Net and Deformation-Proxy) makes the
  server's view of a scan with the local model's client half (the encoder; the flow-field
  generator and a fresh secret key), sends that one view and reads the answer back
  (:class:`~mixpriv.inference.proxies.ProxyPipeline`). What crosses the wire: the view and the
  token; never the image, the deformation key or its inverse field.

Both talk to the server through :class:`~mixpriv.server.connection.ServerConnection`: a
deadline per request, answers read with bounds, ``GET /v1/model`` checked against the local
model (same kind, same labels), and what the server's limits would refuse (a scan too small,
too many volumes, too many bytes) refused here, before anything is sent.

Example:
    >>> from mixpriv.server import PrivateClient
    >>> client = PrivateClient("http://127.0.0.1:8000", "key.mpk", "tissue-mixpriv-2mm",
    ...                        token="s3cret", k=8)  # doctest: +SKIP
    >>> written = client.segment_file("scan.nii.gz", "seg.nii.gz", variance="var.nii.gz")  # doctest: +SKIP
    >>> written.labels  # doctest: +SKIP
    PosixPath('seg.nii.gz')
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import torch

from mixpriv.hub.export import model_kind
from mixpriv.inference.mixtures import client_generator
from mixpriv.inference.pipeline import (
    PrivatePipeline,
    PrivateSegmentation,
    check_methods,
)
from mixpriv.inference.proxies import ProxyPipeline, ProxyRun
from mixpriv.inference.scans import check_key_for_model
from mixpriv.mixing.bank import ReferenceBank
from mixpriv.mixing.settings import MixingSettings
from mixpriv.server.answers import ServerError
from mixpriv.server.connection import ServerConnection, load_local_model
from mixpriv.validation import InputError

__all__ = ["PrivateClient", "ProxyClient", "ServerError", "WrittenSegmentation"]

log = logging.getLogger("mixpriv.server.client")


@dataclass
class WrittenSegmentation:
    """Files written by :meth:`PrivateClient.segment_file`, and the result on the model's grid."""

    labels: Path
    probabilities: Path | None
    variance: Path | None
    result: PrivateSegmentation


class PrivateClient(ServerConnection):
    """Private segmentation through a remote ``mixpriv serve`` hosting a Mixup-Privacy segmenter.

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

    sends = "mixtures"

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
        if k < 1:
            raise InputError(f"the number of references K must be at least 1, got {k}")
        if not isinstance(key, ReferenceBank):
            key = ReferenceBank.load(key)
        model = load_local_model(model)
        if not hasattr(model, "unmix"):
            raise InputError(f"the local model must be a Mixup-Privacy model with an unmixer, got "
                             f"{type(model).__name__}")
        check_key_for_model(key, model.num_classes, model.hparams.get("input_spacing"))
        self.key = key
        self.k = k
        self.method = method
        self.pipeline = PrivatePipeline.of_model(
            model, segment_volumes=self.segment_mixtures,
            mixing=(mixing or MixingSettings.of_model(model.hparams)).check_bank(len(key)), overlap=overlap)
        self.generator = client_generator(seed)
        super().__init__(server_url, model, "mixpriv", token, wire_dtype=wire_dtype, timeout=timeout,
                         transport=transport, compress_answers=compress_answers)

    def __repr__(self) -> str:  # never show the key's content or the token
        return f"PrivateClient({self.server_url!r}, {self.key!r}, k={self.k}, method={self.method!r})"

    def segment_mixtures(self, mixtures: torch.Tensor) -> torch.Tensor:
        """Send mixtures ``(K, 1, D, H, W)``; return the server's probabilities ``(K, C, D, H, W)`` (float32).

        This is the only call that sends image data, and it sends only ``mixtures``
        (:meth:`~mixpriv.server.connection.ServerConnection.segment_volumes`).
        """
        return self.segment_volumes(mixtures)

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


class ProxyClient(ServerConnection):
    """A compared system through a remote ``mixpriv serve``: the view is made and read back here.

    The local model is a Privacy-Net model (its encoder makes the view ``E(x)``; the server's
    answer is the segmentation) or a Deformation-Proxy model (its flow-field generator warps the
    scan with a fresh secret key; the client warps the answer back with the key's inverse). Only
    the view is sent, one per scan; the image and the inverse field stay here.

    Args:
        server_url: base URL of the server, e.g. ``http://127.0.0.1:8000``; it must host the
            segmenter of the same kind of model.
        model: the local :class:`~mixpriv.lightning.privacy_net.PrivacyNetModule` or
            :class:`~mixpriv.lightning.deformation_proxy.DeformationProxyModule`, or what
            :func:`mixpriv.hub.from_pretrained` takes (name, folder, URL).
        token: bearer token (default ``$MIXPRIV_SERVER_TOKEN``).
        seed: seed of the deformation keys (``None``: fresh randomness; a fixed seed only
            reproduces a run, see :func:`~mixpriv.inference.mixtures.client_generator`).
        wire_dtype, timeout, transport, compress_answers: as for :class:`PrivateClient`.

    Raises:
        InputError: the local model is not a compared system (or the settings are wrong).

    Example:
        >>> client = ProxyClient("http://127.0.0.1:8000", "tissue-deformproxy-2mm", token="s3cret")  # doctest: +SKIP
        >>> run = client.segment(image)  # image: preprocessed (1, D, H, W)  # doctest: +SKIP
        >>> run.labels.shape, run.view.shape  # doctest: +SKIP
    """

    sends = "views"

    def __init__(
        self,
        server_url: str,
        model,
        token: str | None = None,
        *,
        seed: int | None = None,
        wire_dtype: str = "float32",
        timeout: float = 600.0,
        transport: httpx.BaseTransport | None = None,
        compress_answers: bool | None = None,
    ) -> None:
        model = load_local_model(model)
        self.pipeline = ProxyPipeline(model, segment_views=self.segment_view)  # refuses other models
        self.generator = client_generator(seed)
        super().__init__(server_url, model, model_kind(model), token, wire_dtype=wire_dtype, timeout=timeout,
                         transport=transport, compress_answers=compress_answers)

    def __repr__(self) -> str:  # never show the token
        return f"ProxyClient({self.server_url!r}, kind={self.kind!r})"

    def segment_view(self, view: torch.Tensor) -> torch.Tensor:
        """Send one view ``(1, D, H, W)``; return the server's probabilities ``(C, D, H, W)`` (float32)."""
        return self.segment_volumes(view[None])[0]

    def segment(self, image: torch.Tensor) -> ProxyRun:
        """Segment an image ``(1, D, H, W)``, normalised and on the model's grid as its card says.

        Returns the view that was sent, the server's answer and the client's probabilities on the
        image's grid (``run.labels`` the label map); ``run.secret`` is what never left the client.
        """
        return self.pipeline(image.float(), self.generator)
