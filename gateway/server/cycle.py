"""A request's response under the gateway's HTTP protocol (``gateway.server.http``):
``RawBody``, its ``StreamPort``, and ``DetachableCycle``, uvicorn's cycle that may be
detached from its ASGI call or answered without one (``start_stream``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from uvicorn._types import ASGI3Application
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle
from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string

from gateway.logs import REDACTED_ALREADY, redact
from gateway.server.ports import RAW_BODY, OpenLater, Respond, Started
from gateway.server.response_head import stream_head, valid_headers
from gateway.server.waiting import close_transport

logger = logging.getLogger("uvicorn.error")

# What was copied from uvicorn and the sha256 (first 16 hex digits) of the original's
# dedented source when it was copied; tests/test_server_adapter.py compares.
COPIED_FROM_UVICORN = {
    "uvicorn.protocols.http.httptools_impl:RequestResponseCycle.run_asgi": "c3a6430de81255c9",
    # the head and access log of a response start (``DetachableCycle.start_stream``)
    "uvicorn.protocols.http.httptools_impl:RequestResponseCycle.send": "cfc84491029529db",
}


class RawBody:
    """Synchronous writes of already framed chunks to one response's socket.

    ``on_lost``'s callback is called once the connection is lost: a stream that
    writes nothing for a while still learns at once that its client left.
    """

    __slots__ = ("_cycle", "_flow", "_on_lost", "_transport")

    def __init__(self, cycle: RequestResponseCycle) -> None:
        self._cycle = cycle
        self._transport = cycle.transport  # the cycle's, for its life: read on every write
        self._flow = cycle.flow
        self._on_lost: Callable[[], object] | None = None

    @property
    def chunked(self) -> bool:
        """The response started with chunked encoding and is still going."""
        cycle = self._cycle
        return (
            cycle.response_started
            and cycle.chunked_encoding is True
            and not cycle.response_complete
            and not cycle.disconnected
        )

    # -- the port (gateway.server.ports.StreamPort) ------------------------------

    def on_lost(self, callback: Callable[[], object] | None) -> None:
        self._on_lost = callback
        if callback is not None and self._cycle.disconnected:
            callback()

    def lost(self) -> None:
        """The protocol's ``connection_lost``: tell the owner, once."""
        callback, self._on_lost = self._on_lost, None
        if callback is not None:
            callback()

    def try_write(self, chunk: bytes) -> bool:
        cycle, transport = self._cycle, self._transport
        if cycle.disconnected or cycle.response_complete or transport.is_closing():
            raise ConnectionError("response closed")
        if not cycle.response_started or cycle.chunked_encoding is not True:
            return False
        if self._flow.write_paused:
            return False
        transport.write(chunk)
        return True

    async def write(self, chunk: bytes) -> None:
        while not self.try_write(chunk):
            if not self.chunked:
                raise ConnectionError("not a started chunked response")
            await self._cycle.flow.drain()  # also returns when the client leaves

    async def finish(self) -> None:
        await self._cycle.send({"type": "http.response.body", "body": b"", "more_body": False})

    def abort(self) -> None:
        """Close the connection without finishing the response (what uvicorn does when an
        app returns from an unfinished one): the client sees the stream end."""
        close_transport(self._cycle.transport)  # (a client that does not read: bounded)

    async def hold(self) -> None:
        """Detach: the ASGI call may return, the response stays open."""
        cycle = self._cycle
        if not isinstance(cycle, DetachableCycle):
            raise RuntimeError("this response cannot be detached")
        cycle.detached = True

    def release(self) -> None:
        """Nothing to do: a detached response has no ASGI call waiting."""


class DetachableCycle(RequestResponseCycle):
    """uvicorn's cycle, except that a detached response stays open when the app returns."""

    detached = False

    async def run_asgi(self, app: ASGI3Application) -> None:
        # uvicorn's (COPIED_FROM_UVICORN), except for the ``detached`` branch.
        try:
            result = await app(  # type: ignore[func-returns-value]
                self.scope, self.receive, self.send
            )
        except BaseException as exc:
            msg = "Exception in ASGI application\n"
            self.logger.error(msg, exc_info=exc)
            if not self.response_started:
                await self.send_500_response()
            else:
                self.transport.close()
        else:
            if result is not None:
                msg = "ASGI callable should return None, but returned '%s'."  # type: ignore[unreachable]
                self.logger.error(msg, result)
                self.transport.close()
            elif self.detached:
                self._forget_request()
                return  # the app finishes the response (RawBody.finish)
            elif not self.response_started and not self.disconnected:
                msg = "ASGI callable returned without starting response."
                self.logger.error(msg)
                await self.send_500_response()
            elif not self.response_complete and not self.disconnected:
                msg = "ASGI callable returned without completing response."
                self.logger.error(msg)
                self.transport.close()
        finally:
            if not self.detached:
                self.on_response = lambda: None
                # The scope holds the body port, which holds this cycle: not a cycle
                # left for the collector once the call is over.
                self.scope.get("extensions", {}).pop(RAW_BODY, None)

    def start_stream(self, started: Started) -> None:
        """Answer with ``started``: the head as ``send`` writes a chunked 200 (uvicorn's
        default headers, then the app's) and the opening as its first chunk, in one write;
        then the app writes on the response's port, as after ``hold``."""
        scope: dict[str, Any] = self.scope  # type: ignore[assignment]
        headers = [*self.default_headers, *started.headers]
        if not valid_headers(headers):
            # What uvicorn's send raises on: the app's error, the connection closed.
            self.logger.error("Exception in ASGI application: invalid HTTP header")
            self.transport.close()
            task = asyncio.ensure_future(started.abandon())
            _ABANDONING.add(task)  # held until done: asyncio keeps a weak reference only
            task.add_done_callback(_ABANDONING.discard)
            task.add_done_callback(log_failure)
            return
        self.response_started, self.waiting_for_100_continue = True, False
        self.chunked_encoding = True
        if self.access_log and self.access_logger.isEnabledFor(logging.INFO):
            target = redact(get_path_with_query_string(self.scope))  # once, not per filter
            self.access_logger.info(
                '%s - "%s %s HTTP/%s" %d',
                get_client_addr(self.scope),
                scope["method"],
                target,
                scope["http_version"],
                200,
                extra={REDACTED_ALREADY: True},
            )
        self.transport.write(stream_head(headers, self.keep_alive, started.opening))
        port = scope["extensions"][RAW_BODY]
        self.detached = True
        self._forget_request()
        started.start(port)

    async def open_later(self, later: OpenLater) -> None:
        """``start_stream`` once the app's ``open`` is done; its error response, or
        nothing when the client left meanwhile; a 500 when it failed, as uvicorn's."""
        try:
            answer = await later.open()
        except Exception as exc:
            self.logger.error("Exception in ASGI application\n", exc_info=exc)
            if not self.disconnected and not self.transport.is_closing():
                await self.send_500_response()
            return
        if self.disconnected or self.transport.is_closing():
            if not isinstance(answer, Respond):
                await answer.abandon()
            return
        if isinstance(answer, Respond):
            status, headers = answer.status, answer.headers
            await self.send({"type": "http.response.start", "status": status, "headers": headers})
            await self.send({"type": "http.response.body", "body": answer.body})
            return
        self.start_stream(answer)

    def _forget_request(self) -> None:
        """Drop what only the ASGI call needed, once it returned: all of the scope (what
        the framework stored in it included) but what ``send`` still reads."""
        scope: dict[str, Any] = self.scope  # type: ignore[assignment]
        kept: dict[str, Any] = {
            key: scope[key] for key in ("type", "method", "http_version") if key in scope
        }
        scope.clear()
        scope.update(kept)


_ABANDONING: set[asyncio.Future[None]] = set()


def log_failure(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("opening a stream failed", exc_info=task.exception())
