"""A client socket read with ``recvmsg``: the kernel's receive time of every read.

A subscriber's latency as the client process sees it is the time until the process
*reads* a message; when one process reads thousands of sockets, that is mostly its place
in its own queue (docs/benchmarks.md, "What the light steps measure"). With
``SO_TIMESTAMPNS`` the kernel stamps each packet as it arrives (on loopback: as the
server's ``send()`` hands it over), and ``recvmsg`` returns the stamp of the last packet
a read took, so a message's arrival is known however late it is read (never earlier
than it arrived: a read that takes several packets reports the last one's time).

``StampedTransport`` is the part of an asyncio transport the clients use, over
``loop.add_reader``; it feeds an ``asyncio.Protocol`` (``data_received``) or a
``BufferedProtocol`` (picows': ``get_buffer``/``buffer_updated``, no copy), and
``arrived`` is the current read's stamp (``time.time()`` scale) while it is fed.

The kernel stamps only what arrives after the option is set: ``stamp_arrivals`` on the
socket before it connects; a read that has no stamp all the same is given the time it
was read (later than it arrived: never a latency too low).
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from typing import Any

# Linux: SO_TIMESTAMPNS (the "old" option, whose timespec is two longs: 64-bit here).
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
_ANCILLARY = socket.CMSG_SPACE(16)
_TIMESPEC = struct.Struct("@qq")
_READ_SIZE = 65536


def stamp_arrivals(sock: socket.socket) -> None:
    """Have the kernel stamp every packet ``sock`` receives from now on."""
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)


class StampedTransport(asyncio.Transport):
    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, protocol: Any):
        super().__init__()
        stamp_arrivals(sock)
        self.loop = loop
        self.sock = sock
        self.fd = sock.fileno()
        self.protocol = protocol
        self.buffered = hasattr(protocol, "buffer_updated")
        self.arrived = 0.0
        self.pending = bytearray()  # what a write could not send at once
        self.reading = False
        self.closing = False
        self.lost = False
        self.extra = {
            "socket": sock,
            "peername": sock.getpeername(),
            "sockname": sock.getsockname(),
        }
        protocol.connection_made(self)
        if not self.closing:
            self.resume_reading()

    # -- reading -----------------------------------------------------------------------

    def _readable(self) -> None:
        try:
            if self.buffered:
                buffer = self.protocol.get_buffer(-1)
                size, ancillary, _, _ = self.sock.recvmsg_into([buffer], _ANCILLARY)
                data = b""
            else:
                data, ancillary, _, _ = self.sock.recvmsg(_READ_SIZE, _ANCILLARY)
                size = len(data)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lose(exc)
            return
        if not size:
            self._eof()
            return
        for level, kind, value in ancillary:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                seconds, nanoseconds = _TIMESPEC.unpack_from(value)
                self.arrived = seconds + nanoseconds * 1e-9
                break
        else:
            self.arrived = time.time()
        if self.buffered:
            self.protocol.buffer_updated(size)
        else:
            self.protocol.data_received(data)

    def _eof(self) -> None:
        self.pause_reading()
        keep_open = self.protocol.eof_received()
        if not keep_open:
            self.close()

    def pause_reading(self) -> None:
        if self.reading:
            self.reading = False
            self.loop.remove_reader(self.fd)

    def resume_reading(self) -> None:
        if not self.reading and not self.lost:
            self.reading = True
            self.loop.add_reader(self.fd, self._readable)

    def is_reading(self) -> bool:
        return self.reading

    # -- writing -----------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.closing or self.lost:
            return
        if self.pending:
            self.pending += data
            return
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._lose(exc)
            return
        if sent < len(data):
            self.pending += memoryview(data)[sent:]
            self.loop.add_writer(self.fd, self._writable)

    def writelines(self, chunks: Any) -> None:
        self.write(b"".join(chunks))

    def _writable(self) -> None:
        try:
            sent = self.sock.send(self.pending)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lose(exc)
            return
        del self.pending[:sent]
        if not self.pending:
            self.loop.remove_writer(self.fd)
            if self.closing:
                self._lose(None)

    def get_write_buffer_size(self) -> int:
        return len(self.pending)

    def can_write_eof(self) -> bool:
        return False

    # -- ending ------------------------------------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.extra.get(name, default)

    def is_closing(self) -> bool:
        return self.closing or self.lost

    def close(self) -> None:
        if self.closing or self.lost:
            return
        self.closing = True
        self.pause_reading()
        if not self.pending:
            self.loop.call_soon(self._lose, None)

    def abort(self) -> None:
        self.closing = True
        self._lose(None)

    def _lose(self, exc: Exception | None) -> None:
        if self.lost:
            return
        self.pause_reading()
        self.lost = True
        self.closing = True
        if self.pending:
            self.loop.remove_writer(self.fd)
            self.pending.clear()
        self.sock.close()
        self.protocol.connection_lost(exc)
