"""How the segmentation service runs: :class:`ServerConfig` (``mixpriv serve``'s options).

Example:
    >>> config = ServerConfig(token="s3cret", max_pending=8)
    >>> config.check()
    >>> ServerConfig(max_pending_bytes=1).check()
    Traceback (most recent call last):
    ...
    ValueError: the pending-bytes budget (1) is smaller than one request body may be (134217728): no such request could be admitted
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from mixpriv.server.limits import GuardedH11Protocol
from mixpriv.server.wire import MixtureLimits


@dataclass
class ServerConfig:
    """How the service runs.

    Attributes:
        token: bearer token the ``/v1`` endpoints require; ``None`` disables authentication.
        limits: what one request may carry.
        timeout_s: most seconds a request may wait for and run its inference (then 504).
        workers: inferences run at once (threads of the bounded pool).
        max_pending: requests admitted at once (reading, queued or running); more get 503.
        max_pending_bytes: request-body bytes those may hold together (declared sizes count
            from the start); a request over the budget gets 503. At least ``limits.max_body_bytes``.
        body_timeout_s: most seconds to receive a request body (then 408 and the connection closed).
        header_timeout_s: most seconds a connection may take to send its request headers, from
            its opening or its previous answer (then it is closed).
        max_connections: open connections at once; more are answered 503 and closed.
        batch_size: patches (of any of the K mixtures) per forward pass.
        overlap: least patch-grid overlap in voxels (default a quarter of a patch).
        compresslevel: gzip level of the responses to clients that accept gzip (1: fast).
    """

    token: str | None = None
    limits: MixtureLimits = field(default_factory=MixtureLimits)
    timeout_s: float = 300.0
    workers: int = 1
    max_pending: int = 64
    max_pending_bytes: int = 1024 * 2**20
    body_timeout_s: float = 120.0
    header_timeout_s: float = 10.0
    max_connections: int = 256
    batch_size: int = 2
    overlap: int | None = None
    compresslevel: int = 1

    def check(self) -> None:
        """Raise ``ValueError`` naming the first setting that cannot work."""
        for name in ("workers", "max_pending", "max_connections", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("timeout_s", "body_timeout_s", "header_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_pending_bytes < self.limits.max_body_bytes:
            raise ValueError(f"the pending-bytes budget ({self.max_pending_bytes}) is smaller than one request body "
                             f"may be ({self.limits.max_body_bytes}): no such request could be admitted")

    def protocol(self) -> functools.partial:
        """The uvicorn ``http`` protocol enforcing the header timeout and the connection limit."""
        return functools.partial(GuardedH11Protocol, header_timeout_s=self.header_timeout_s,
                                 max_connections=self.max_connections)
