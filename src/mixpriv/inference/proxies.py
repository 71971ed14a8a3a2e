"""The compared systems on whole volumes: the client makes the server's view, the server segments it, the client
reads the answer back.

* Privacy-Net: the view is the encoded image ``E(x)`` (the encoder is fully convolutional and runs patch by
  patch like the segmenter); the server's probabilities ``S(E(x))`` are already the answer (nothing to decode).
* Deformation-Proxy: the view is the scan warped by a fresh secret key's diffeomorphism (the whole volume at
  once: the deformation is defined on the scan's grid); the client warps the server's probabilities back with
  the key's exact inverse.

Both go through :class:`ProxyPipeline`, whose ``segment_views`` is either the local segmenter (patch by patch at
the model's patch size) or a remote server, as for :class:`~mixpriv.inference.pipeline.PrivatePipeline`. Keys
are drawn from :func:`~mixpriv.inference.mixtures.client_generator`: fresh operating-system entropy unless a
seed is given to reproduce a run.

Example:
    >>> from mixpriv.lightning.privacy_net import PrivacyNetModule
    >>> tiny = {"encoder_name": "mixpriv-light-8", "encoder_depth": 3, "decoder_channels": [16, 8, 8]}
    >>> model = PrivacyNetModule({"background": 0, "fg": 1}, tiny, tiny, {"channels": [4, 8]}, patch_size=16).eval()
    >>> pipeline = ProxyPipeline.of_model(model)
    >>> run = pipeline(torch.rand(1, 20, 24, 18))
    >>> run.view.shape, run.probabilities.shape, run.labels.shape
    (torch.Size([1, 20, 24, 18]), torch.Size([2, 20, 24, 18]), torch.Size([20, 24, 18]))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from mixpriv.constants import IMAGE
from mixpriv.inference.grid import sliding_window
from mixpriv.inference.mixtures import client_generator
from mixpriv.lightning.deformation_proxy import DeformationProxyModule
from mixpriv.lightning.privacy_net import PrivacyNetModule
from mixpriv.validation import InputError

ViewSegmenter = Callable[[torch.Tensor], torch.Tensor]
"""Class probabilities (C, D, H, W) of a whole view (1, D, H, W): the local segmenter or the remote server."""


@dataclass
class ProxyRun:
    """One scan through a compared system: the server's view, its answer and the client's segmentation.

    ``secret`` is what the client keeps (Deformation-Proxy: the inverse displacement; Privacy-Net: none).
    """

    view: torch.Tensor
    answer: torch.Tensor
    probabilities: torch.Tensor
    secret: torch.Tensor | None = None

    @property
    def labels(self) -> torch.Tensor:
        """The client's label map (D, H, W)."""
        return self.probabilities.argmax(0)


class ProxyPipeline:
    """Client view -> server segmentation -> client read-back, for a Privacy-Net or Deformation-Proxy model.

    Args:
        model: a :class:`~mixpriv.lightning.privacy_net.PrivacyNetModule` or
            :class:`~mixpriv.lightning.deformation_proxy.DeformationProxyModule` (its client half is used
            here; its server half too unless ``segment_views`` is given).
        segment_views: the server: class probabilities (C, D, H, W) of a view (1, D, H, W); default the
            model's own segmenter, patch by patch.
        batch_size: patches per segmenter call on the local path.
    """

    def __init__(self, model: PrivacyNetModule | DeformationProxyModule,
                 segment_views: ViewSegmenter | None = None, batch_size: int = 2) -> None:
        if not isinstance(model, (PrivacyNetModule, DeformationProxyModule)):
            raise InputError(f"a {type(model).__name__} is not a compared system; ProxyPipeline runs Privacy-Net "
                             "and Deformation-Proxy models")
        self.model = model
        self.batch_size = batch_size
        self.segment_views = segment_views or self.segment_locally

    @classmethod
    def of_model(cls, model, *, segment_views: ViewSegmenter | None = None) -> ProxyPipeline:
        """The pipeline of a loaded compared-system model (the local segmenter unless ``segment_views``)."""
        return cls(model, segment_views)

    @property
    def patch_size(self) -> int:
        return int(self.model.hparams.patch_size)

    def _patchwise(self, fn: Callable[[torch.Tensor], torch.Tensor], volume: torch.Tensor) -> torch.Tensor:
        return sliding_window(lambda patches: fn(patches[IMAGE]), {IMAGE: volume}, self.patch_size,
                              batch_size=self.batch_size, device=self.model.device)

    def make_view(self, image: torch.Tensor, generator: torch.Generator | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Client: the server's view (1, D, H, W) of an image (1, D, H, W) and what the client keeps secret."""
        if image.ndim != 4 or image.shape[0] != 1:
            raise InputError(f"the image must be (1, D, H, W), got shape {tuple(image.shape)}")
        image = image.float().to(self.model.device)
        with torch.no_grad():
            if isinstance(self.model, PrivacyNetModule):
                return self._patchwise(self.model.encode, image), None
            generator = generator or client_generator()
            seed = int(torch.randint(0, 2 ** 63 - 1, (1,), generator=generator))
            key = self.model.deformation_spec.key(seed)
            deformed, inverse = self.model.deform(image[None], key)
            return deformed[0], inverse

    def segment_locally(self, view: torch.Tensor) -> torch.Tensor:
        """Server, in process: class probabilities (C, D, H, W) of a view (1, D, H, W)."""
        server = (self.model.segment_encoded if isinstance(self.model, PrivacyNetModule)
                  else self.model.segment_deformed)
        with torch.no_grad():
            return self._patchwise(server, view.float().to(self.model.device))

    def read_back(self, answer: torch.Tensor, secret: torch.Tensor | None) -> torch.Tensor:
        """Client: the segmentation's probabilities on the scan's grid from the server's answer."""
        if secret is None:
            return answer
        with torch.no_grad():
            return self.model.restore(answer[None].to(secret.device), secret)[0]

    def __call__(self, image: torch.Tensor, generator: torch.Generator | None = None) -> ProxyRun:
        """One scan (1, D, H, W) through client, server and client."""
        view, secret = self.make_view(image, generator)
        answer = self.segment_views(view)
        return ProxyRun(view, answer, self.read_back(answer, secret), secret)
