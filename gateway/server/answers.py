"""WebSocket upgrades answered in the HTTP protocol that parsed them, and handed over.

When the app's opener (``OPEN_WEBSOCKET``) takes an upgrade whose handshake websockets
would accept as it is, the HTTP protocol answers it: the request was parsed once, there,
so the 101 is written and the connection handed to the gateway's lean WebSocket
protocol (``gateway.server.upgraded``), without uvicorn's rebuilding the request for a
WebSocket protocol to parse again. Anything else (another path, a handshake websockets
would refuse or answer differently, over its header limits) takes uvicorn's path and
gets its answer.

The HTTP protocol stays the transport's protocol and hands the socket's events on, its
own state dropped: uvloop's ``transport.set_protocol`` stops and starts reading the
socket to switch protocols, an epoll change each way for every connection
(docs/benchmarks.md, "Connection cost", seventh round).
"""

from __future__ import annotations

import asyncio
import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.server.handover import HttpUpgrade, hand_over, websocket_key
from gateway.server.ports import OPEN_WEBSOCKET, Accept, Deferred, Opener, Refuse
from gateway.server.upgraded import UpgradedWebSocket

logger = logging.getLogger("uvicorn.error")


class AnswersUpgrades(HttpToolsProtocol):
    """uvicorn's HTTP protocol answering the upgrades the app's opener takes."""

    upgraded: UpgradedWebSocket | None = None  # the protocol this one hands everything to
    # The opener's answer, when it was asked before this protocol parsed the request
    # (``gateway.server.front``): not asked again.
    decided: Deferred | None = None
    upgrade_waits = False  # behind a request read before it, still being answered

    def handle_websocket_upgrade(self) -> None:
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            # Pipelined behind a request still being answered (in the same read, say):
            # responses go out in order, so the 101 waits for that one's; nothing is
            # read meanwhile. (It was written first, the other's bytes then in the
            # WebSocket stream.)
            self.upgrade_waits = True
            self.flow.pause_reading()
            return
        opener: Opener | None = self.app_state.get(OPEN_WEBSOCKET)
        # With the gateway's WebSocket protocol configured, the config's limits are the
        # gateway's (the 1009 limit, pings): upgrades may skip it for the lean one.
        ours = getattr(self.ws_protocol_class, "lends_upgrades", False)
        key = self._websocket_key() if opener is not None and ours else None
        decision: Accept | Refuse | Deferred | None = self.decided
        self.decided = None
        if decision is None and opener and key:
            decision = opener(HttpUpgrade(self.url, self.headers))
        if decision is None:
            super().handle_websocket_upgrade()  # uvicorn: the WebSocket protocol parses it again
            self._retire()
            return
        assert key is not None
        if isinstance(decision, Deferred):
            # The app answers later (a backend's say): read nothing meanwhile.
            self.transport.pause_reading()
            task = asyncio.get_running_loop().create_task(decision.decide())
            task.add_done_callback(lambda done: self._decided(key, self.url, done))
            return
        self._switch(key, self.url, decision)

    def _decided(self, key: str, url: bytes, task: asyncio.Future[Accept | Refuse]) -> None:
        """A deferred decision is in: switch, unless the client left (or the server
        closed the connection, stopping) meanwhile."""
        if task.cancelled() or self.transport.is_closing():
            return
        error = task.exception()
        if error is not None:
            logger.error("deciding a WebSocket upgrade failed", exc_info=error)
            self.transport.close()
            return
        self.transport.resume_reading()
        self._switch(key, url, task.result())

    def _switch(self, key: str, url: bytes, decision: Accept | Refuse) -> None:
        """Write the 101 and hand the connection to the gateway's WebSocket protocol.
        Not ``transport.set_protocol``: uvloop's stops and starts reading the socket
        again to switch it (an epoll change each way, about 5 µs of a connect's CPU)."""
        transport, config, state = self.transport, self.config, self.server_state
        hand_over(self, transport, config, state, self.client, key, url, decision, self.loop)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.upgrade_waits and not self.transport.is_closing():
            self.upgrade_waits = False
            self._unset_keepalive_if_required()  # (armed by the response just ended)
            self.handle_websocket_upgrade()

    # -- after an upgrade answered here: the WebSocket protocol's (``_switch``) ---------

    def data_received(self, data: bytes) -> None:
        upgraded = self.upgraded
        if upgraded is not None:
            upgraded.data_received(data)
        else:
            super().data_received(data)

    def eof_received(self) -> None:
        upgraded = self.upgraded
        if upgraded is not None:
            upgraded.eof_received()

    def pause_writing(self) -> None:
        upgraded = self.upgraded
        if upgraded is not None:
            upgraded.pause_writing()
        else:
            super().pause_writing()

    def resume_writing(self) -> None:
        upgraded = self.upgraded
        if upgraded is not None:
            upgraded.resume_writing()
        else:
            super().resume_writing()

    def _retire(self) -> None:
        """The connection is another protocol's now. Drop the parser, which holds this
        protocol's callbacks (as uvicorn does in ``connection_lost``, which this protocol
        no longer gets): otherwise each upgraded connection leaves a reference cycle that
        only a full collection frees, and a reconnect storm leaves thousands of them."""
        self.parser = None  # type: ignore[assignment]

    def _websocket_key(self) -> str | None:
        """The ``Sec-WebSocket-Key`` of a handshake that websockets would accept as it is;
        None for anything else, which then takes uvicorn's path and gets its answer."""
        if self.scope.get("method") != "GET" or self.parser.get_http_version() != "1.1":
            return None
        return websocket_key(self.url, self.headers)
