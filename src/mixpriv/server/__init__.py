"""Client-server private segmentation: a segmentation service that never sees a readable scan.

* :mod:`mixpriv.server.app` - the FastAPI service hosting only the segmenter of a private model
  (Mixup-Privacy, Privacy-Net or Deformation-Proxy; ``mixpriv serve``): ``create_app``, ``serve``,
  ``HostedSegmenter``; its settings (:mod:`mixpriv.server.config`, ``ServerConfig``) and what
  bounds a client's hold on it (:mod:`mixpriv.server.limits`: header and body timeouts,
  connection limit, memory budget).
* :mod:`mixpriv.server.client` - ``PrivateClient`` (Mixup-Privacy, ``mixpriv segment``): mixes,
  sends only the mixtures, unmixes and averages locally; ``ProxyClient`` (Privacy-Net,
  Deformation-Proxy): makes the view locally, sends only it, reads the answer back locally.
* :mod:`mixpriv.server.connection` - ``ServerConnection``, the HTTP half both clients share.
* :mod:`mixpriv.server.wire` - the ``.npy`` wire format both share (no pickle).
* :mod:`mixpriv.server.auth` - bearer tokens (``$MIXPRIV_SERVER_TOKEN`` or a token file).

Names are imported on first use, so that the client does not import FastAPI and the server
does not import httpx.

Example:
    >>> from mixpriv.server import PrivateClient, ProxyClient, MixtureLimits
    >>> MixtureLimits().max_k
    16
"""

from __future__ import annotations

_LAZY = {
    "create_app": "mixpriv.server.app", "serve": "mixpriv.server.app", "HostedSegmenter": "mixpriv.server.app",
    "ServerConfig": "mixpriv.server.config",
    "PrivateClient": "mixpriv.server.client", "ProxyClient": "mixpriv.server.client",
    "ServerError": "mixpriv.server.client", "WrittenSegmentation": "mixpriv.server.client",
    "ServerConnection": "mixpriv.server.connection",
    "MixtureLimits": "mixpriv.server.wire", "WireError": "mixpriv.server.wire",
    "decode_mixtures": "mixpriv.server.wire", "encode_mixtures": "mixpriv.server.wire",
    "ENV_TOKEN": "mixpriv.server.auth", "read_token": "mixpriv.server.auth",
}

__all__ = ["ENV_TOKEN", "HostedSegmenter", "MixtureLimits", "PrivateClient", "ProxyClient", "ServerConfig",
           "ServerConnection", "ServerError", "WireError", "WrittenSegmentation", "create_app", "decode_mixtures",
           "encode_mixtures", "read_token", "serve"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mixpriv.server' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
