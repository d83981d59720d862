"""The parts of uvicorn the gateway's own protocols extend (gateway/wsprotocol.py,
gateway/httpprotocol.py) are private API. This says which ones, so that a uvicorn
release that moves them fails here, by name, rather than somewhere in a connection's
life. pyproject.toml's lower bound on uvicorn is the first release that has them all.
"""

from __future__ import annotations

import inspect

import pytest
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from gateway.httpprotocol import DetachableCycle, GatewayHttpToolsProtocol
from gateway.wsprotocol import GatewayWebSocketProtocol

EXTENDED = {
    # What the gateway overrides or calls, and whose uvicorn behaviour it relies on.
    WebSocketsSansIOProtocol: [
        "run_asgi",
        "send",
        "receive",
        "handle_connect",
        "handle_parser_exception",
        "start_keepalive",
        "stop_keepalive",
        "keepalive_timeout",
        "send_500_response",
    ],
    HttpToolsProtocol: ["_start_asgi_task", "on_headers_complete", "connection_lost"],
    RequestResponseCycle: ["run_asgi", "send", "send_500_response"],
}
ATTRIBUTES = {
    # Instance state the subclasses read or replace (set in __init__ / connection_made).
    WebSocketsSansIOProtocol: [
        "queue",
        "writable",
        "close_sent",
        "disconnected",
        "close_timer",
        "handshake_complete",
        "pending_ping_payload",
        "ping_sent_at",
        "ping_interval",
        "ping_timeout",
        "conn",
    ],
}


@pytest.mark.parametrize("base", list(EXTENDED), ids=lambda c: c.__name__)
def test_the_methods_the_gateway_extends_are_there(base: type) -> None:
    missing = [name for name in EXTENDED[base] if not callable(getattr(base, name, None))]
    assert missing == [], f"uvicorn's {base.__name__} lacks {missing}"


def test_the_websocket_state_the_gateway_uses_is_set_up_by_uvicorn() -> None:
    source = inspect.getsource(WebSocketsSansIOProtocol.__init__)
    missing = [
        name for name in ATTRIBUTES[WebSocketsSansIOProtocol] if f"self.{name}" not in source
    ]
    assert missing == [], f"uvicorn's WebSocketsSansIOProtocol no longer sets {missing}"


def test_the_cycle_and_protocols_are_the_gateways_subclasses() -> None:
    assert issubclass(DetachableCycle, RequestResponseCycle)
    assert issubclass(GatewayHttpToolsProtocol, HttpToolsProtocol)
    assert issubclass(GatewayWebSocketProtocol, WebSocketsSansIOProtocol)
    # The cycle's class is swapped in place: it must not add instance layout.
    assert "__slots__" not in vars(DetachableCycle)
    assert not hasattr(RequestResponseCycle, "__slots__")
