"""A WebSocket upgrade whose head the front door read (``gateway.server.front``): the
app's opener asked, the 101 written and the connection handed over when it takes the
upgrade at once, as ``AnswersUpgrades`` does; else uvicorn's protocol answers it.

Compiled (setup.py): every WebSocket connect runs it. The front door, a uvicorn
protocol made per server, cannot be; its attributes are read here as any object's.
"""

from __future__ import annotations

from typing import Any

import httptools

from gateway.server.handover import HttpUpgrade, hand_over
from gateway.server.head import Head
from gateway.server.headwait import HeadDeadlines
from gateway.server.ports import OPEN_WEBSOCKET, Deferred, Opener
from gateway.server.upgraded import UpgradedWebSocket


def answer_upgrade(
    door: Any, head: Head, parser: httptools.HttpRequestParser, received: bytes, after: bytes
) -> UpgradedWebSocket | None:
    """The WebSocket protocol ``door`` handed the connection to, its 101 written and
    given ``after`` (what the client sent behind the head in the same read: frames it
    did not wait for the 101 to send, which RFC 6455 asks it to; uvicorn's protocol
    drops them), when the upgrade is one uvicorn would hand to its WebSocket protocol,
    whose handshake websockets would accept as it is, and the app's opener answers it
    at once. Otherwise None: ``door`` is uvicorn's from here (``_to_http``), told the
    opener's answer if it was asked, so that it does not ask again."""
    opener: Opener | None = door.app_state.get(OPEN_WEBSOCKET)
    key = None
    if (
        opener is not None
        and getattr(door.ws_protocol_class, "lends_upgrades", False)
        and parser.get_method() == b"GET"
        and head.http11(received, parser)
    ):
        key = head.websocket_key()
    decision = opener(HttpUpgrade(head.url, head.headers)) if opener and key else None
    if decision is None or isinstance(decision, Deferred) or key is None:
        door._to_http(decision)  # not the app's, or answered later (a backend's say)
        return None
    transport = door.transport
    deadlines: HeadDeadlines | None = door.head_deadlines
    loop = None
    if deadlines is not None:
        deadlines.done(door)
        loop = deadlines.loop  # the server's, which runs this
    # The peer's address: made by the WebSocket protocol if its access log line is
    # written (uvloop formats it from the socket's, a thousand instructions or more).
    config, server_state = door.config, door.server_state
    upgraded = hand_over(door, transport, config, server_state, None, key, head.url, decision, loop)
    if after:
        upgraded.data_received(after)
    return upgraded
