"""What keeps a client from holding the segmentation server: connection, header, body and memory limits.

* :class:`GuardedH11Protocol` - uvicorn's h11 protocol with two guards uvicorn lacks: a
  connection must deliver its request headers within ``header_timeout_s`` of opening (or of
  its previous answer), else it is closed; connections beyond ``max_connections`` get a 503
  and are closed at once. (uvicorn's ``timeout_keep_alive`` only runs between requests and any
  byte cancels it; its ``limit_concurrency`` only answers requests whose headers arrived, so
  half-sent requests were never refused and never timed out.)
* :class:`Admission` - the requests admitted at once (reading, queued or running) and the
  request-body bytes they hold, both bounded: a full server answers 503.
* :func:`read_body` - a request body within ``timeout_s`` (else 408, and the connection is
  closed), its bytes counted against the size limit (413) and the admission budget (503).

Example:
    >>> admission = Admission(max_requests=2, max_bytes=100)
    >>> with admission.ticket() as ticket:
    ...     ticket.reserve(60), ticket.reserve(60), admission.held_bytes
    (True, False, 60)
    >>> admission.held_bytes, admission.requests
    (0, 0)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from fastapi import HTTPException, Request
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("mixpriv.server")

#: Answer to a connection over the limit (sent before its request is read, then closed).
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\nRetry-After: 5\r\n"
         b"Connection: close\r\nContent-Length: 33\r\n\r\ntoo many connections; retry later")
#: Retry-After of the 503 answers of a full server.
RETRY_AFTER_S = 5


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, with a header read timeout and a connection limit.

    Pass it to uvicorn with its two settings bound, e.g.
    ``uvicorn.run(app, http=functools.partial(GuardedH11Protocol, header_timeout_s=10, max_connections=256))``.
    """

    def __init__(self, *args: Any, header_timeout_s: float, max_connections: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout_s = header_timeout_s
        self.max_connections = max_connections
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            log.warning("refused a connection: %d are open, the limit is %d", len(self.connections) - 1,
                        self.max_connections)
            transport.write(_BUSY)
            transport.close()
            return
        self._await_headers()

    def data_received(self, data: bytes) -> None:
        cycle = self.cycle
        super().data_received(data)
        if self.cycle is not cycle:  # the headers of a new request arrived
            self._stop_header_timer()

    def on_response_complete(self) -> None:
        cycle = self.cycle
        super().on_response_complete()
        if self.cycle is cycle and not self.transport.is_closing():  # no pipelined request started
            self._await_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        super().connection_lost(exc)

    def _await_headers(self) -> None:
        self._stop_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_timed_out)

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_timed_out(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            log.info("closed a connection that sent no complete request headers within %g s", self.header_timeout_s)
            self.transport.close()


def busy(reason: str) -> HTTPException:
    """The 503 of a full server."""
    return HTTPException(503, f"the server is busy ({reason}); retry later",
                         headers={"Retry-After": str(RETRY_AFTER_S)})


class Ticket:
    """One admitted request: it holds its place and the body bytes it reserved until released."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission
        self.bytes = 0

    def reserve(self, n: int) -> bool:
        """Hold ``n`` more body bytes if the budget allows it; whether it did."""
        if self.admission.held_bytes + n > self.admission.max_bytes:
            return False
        self.admission.held_bytes += n
        self.bytes += n
        return True


class Admission:
    """The requests admitted at once and the body bytes they hold (touched only on the event loop: no lock)."""

    def __init__(self, max_requests: int, max_bytes: int) -> None:
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        self.requests = 0
        self.held_bytes = 0

    @contextlib.contextmanager
    def ticket(self) -> Iterator[Ticket]:
        """Admit a request for the ``with`` block, or raise the 503 of a full server."""
        if self.requests >= self.max_requests:
            raise busy(f"{self.requests} requests are pending")
        self.requests += 1
        ticket = Ticket(self)
        try:
            yield ticket
        finally:
            self.requests -= 1
            self.held_bytes -= ticket.bytes


async def read_body(request: Request, max_bytes: int, ticket: Ticket, timeout_s: float) -> bytes:
    """The request body, read within ``timeout_s`` and held against ``max_bytes`` and ``ticket``'s budget.

    A declared ``Content-Length`` is checked and reserved before anything is read; a body
    without one reserves its bytes as they arrive.

    Raises:
        HTTPException: 400 (invalid ``Content-Length``), 413 (over ``max_bytes``), 503 (over the
            server's pending-bytes budget), 408 (not received in time; the connection is closed).
        starlette.requests.ClientDisconnect: the client went away while sending it.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise HTTPException(400, "invalid Content-Length")
        if int(declared) > max_bytes:
            raise HTTPException(413, f"the body has {int(declared)} bytes, over the limit of {max_bytes}")
        if not ticket.reserve(int(declared)):
            raise busy("its memory budget for request bodies is in use")

    async def collect() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise HTTPException(413, f"the body is over the limit of {max_bytes} bytes")
            if declared is None and not ticket.reserve(len(chunk)):
                raise busy("its memory budget for request bodies is in use")
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(collect(), timeout_s)
    except TimeoutError:
        raise HTTPException(408, f"the request body did not arrive within {timeout_s:g} s",
                            headers={"Connection": "close"}) from None
