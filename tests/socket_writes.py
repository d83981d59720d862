"""What the gateway's protocols write to their sockets, watched from the transport.

Tests that count writes (one chunk per event, a resume's reply and replay in one write)
watch the transport each connection is given, not the methods that call it: those are
compiled (setup.py), and a compiled caller never sees a method patched on its class.
``FrontDoor`` (the gateway's HTTP protocol, interpreted) is where every connection
starts; its transport is wrapped there, so everything written on the connection after
(the SSE stream's head and chunks, the 101 and the frames of an upgrade handed over) is
recorded, one entry per ``write`` call.
"""

from __future__ import annotations

from typing import Any

import pytest

from gateway.server.front import FrontDoor

SSE_HEAD = b"content-type: text/event-stream"
TERMINATOR = b"0\r\n\r\n"


class CountedWrites:
    """A transport whose writes are kept, one entry per call; the rest is the real one's."""

    def __init__(self, transport: Any) -> None:
        self._transport = transport
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        # The object itself when it is bytes: a test may ask whether it is one it knows.
        self.writes.append(data if type(data) is bytes else bytes(data))
        self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class SocketWrites:
    """Every connection's writes, in the order the connections were made, and how many
    times a transport asked its protocol to stop writing (``pause_writing``)."""

    def __init__(self) -> None:
        self.connections: list[CountedWrites] = []
        self.paused = 0

    def stream_chunks(self) -> list[bytes]:
        """The body writes of every SSE response: after its head (which carries the
        stream's opening block), up to the chunked terminator."""
        chunks: list[bytes] = []
        for connection in self.connections:
            writes = connection.writes
            if not writes or SSE_HEAD not in writes[0].lower():
                continue
            for data in writes[1:]:
                if data == TERMINATOR:
                    break
                chunks.append(data)
        return chunks

    @property
    def written(self) -> int:
        return len(self.stream_chunks())


def watch_socket_writes(monkeypatch: pytest.MonkeyPatch) -> SocketWrites:
    """Wrap the transport of every connection the gateway's protocol is given from now on
    (until the test ends)."""
    watched = SocketWrites()
    made, pause = FrontDoor.connection_made, FrontDoor.pause_writing

    def connection_made(self: FrontDoor, transport: Any) -> None:
        counted = CountedWrites(transport)
        watched.connections.append(counted)
        made(self, counted)  # type: ignore[arg-type]  # a stand-in

    def pause_writing(self: FrontDoor) -> None:
        watched.paused += 1
        pause(self)

    monkeypatch.setattr(FrontDoor, "connection_made", connection_made)
    monkeypatch.setattr(FrontDoor, "pause_writing", pause_writing)
    return watched
