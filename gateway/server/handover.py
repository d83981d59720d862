"""A WebSocket upgrade answered where its request was parsed: the handshake's checks,
the 101 written and the connection handed to the gateway's lean WebSocket protocol
(``gateway.server.upgraded``). Its callers are the HTTP protocols that parse requests
(``gateway.server.answers``, ``gateway.server.front``); compiled with the connection
path (setup.py), so no class here is subclassed per server.
"""

from __future__ import annotations

import asyncio
import binascii
from typing import Any, Final
from urllib.parse import unquote

from uvicorn.config import Config
from uvicorn.server import ServerState
from websockets.http11 import MAX_LINE_LENGTH, MAX_NUM_HEADERS

from gateway.server.frames import switching_head
from gateway.server.ports import Accept, Refuse
from gateway.server.upgraded import UpgradedWebSocket


def hand_over(
    http: Any,
    transport: asyncio.Transport,
    config: Config,
    server_state: ServerState,
    client: tuple[str, int] | None,
    key: str,
    url: bytes,
    decision: Accept | Refuse,
    loop: asyncio.AbstractEventLoop | None = None,
) -> UpgradedWebSocket:
    """Write the 101 for a handshake with ``key`` and give the connection to the gateway's
    WebSocket protocol; the opener's ``decision`` opens or refuses it. The HTTP protocol
    that parsed the upgrade (``http``) stays the transport's protocol and hands the
    socket's events on (``AnswersUpgrades``): out of the server's connections (the
    WebSocket protocol is in them now), all of its own state dropped (the parser with
    it, whose callbacks hold it), so none of its methods may run but the hand-over's
    (``connection_lost`` included). ``loop``: the running one, if the caller has it."""
    server_state.connections.discard(http)
    protocol = UpgradedWebSocket(
        connections=server_state.connections,
        max_size=config.ws_max_size,
        ping_interval=config.ws_ping_interval,
        ping_timeout=config.ws_ping_timeout,
        client=client,
        access_log=config.access_log,
        loop=loop,
    )
    protocol.connection_made(transport)
    protocol.open(switching_head(key, server_state.default_headers), url)
    if isinstance(decision, Refuse):
        protocol.refuse(decision.code, decision.reason)
    else:
        decision(protocol)
    http.__dict__.clear()
    http.upgraded = protocol
    return protocol


def websocket_key(url: bytes, headers: list[tuple[bytes, bytes]]) -> str | None:
    """The ``Sec-WebSocket-Key`` of a GET over HTTP/1.1 (the caller checks both) whose
    handshake websockets would accept as it is; None for anything else."""
    # websockets' own limits on the request it parses (431 / 414 when over)
    if len(headers) > MAX_NUM_HEADERS or len(url) + 16 > MAX_LINE_LENGTH:
        return None
    keys, versions, upgrades = [], [], []
    origins = 0
    for name, value in headers:
        if len(name) + len(value) + 4 > MAX_LINE_LENGTH:
            return None
        if name == b"sec-websocket-key":
            keys.append(value)
        elif name == b"sec-websocket-version":
            versions.append(value)
        elif name == b"upgrade":
            upgrades.append(value.lower())
        elif name == b"origin":
            origins += 1
        elif name == b"content-length" or name == b"transfer-encoding":
            return None  # a body: websockets refuses it (400), never read as frames
    if len(keys) != 1 or versions != [b"13"] or upgrades != [b"websocket"] or origins > 1:
        return None  # (two Origins: websockets' 400, not the first one's check alone)
    return key_of(keys[0])


def key_of(value: bytes) -> str | None:
    """A ``Sec-WebSocket-Key`` header's value, if it is one websockets accepts: 16 bytes
    in base64."""
    try:  # base64.b64decode(value, validate=True), without its two Python calls
        if len(binascii.a2b_base64(value, strict_mode=True)) != 16:
            return None
    except (binascii.Error, ValueError):
        return None
    return value.decode("ascii")


class HttpUpgrade:
    """What an ``Opener`` sees of an upgrade parsed by the HTTP protocol (``RequestHead``):
    its path and query read once, as attributes (the opener reads each once, through the
    protocol's type: a property would be a call more)."""

    def __init__(self, url: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        self._headers = headers
        at = url.find(b"?")
        path = (url if at < 0 else url[:at]).decode("latin-1")
        self.path = unquote(path) if "%" in path else path
        self.query_string = b"" if at < 0 else url[at + 1 :]

    def header(self, name: str) -> str | None:
        wanted = _HEADER_NAMES.get(name)
        if wanted is None:
            wanted = name.lower().encode("latin-1")
            if len(_HEADER_NAMES) < 64:  # the few names the openers ask for
                _HEADER_NAMES[name] = wanted
        for key, value in self._headers:
            if key == wanted:
                return value.decode("latin-1")
        return None


_HEADER_NAMES: Final[dict[str, bytes]] = {}  # a name as asked -> as uvicorn keeps it
