"""TCP sockets for the clients: optional source address and receive buffer."""

from __future__ import annotations

import asyncio
import contextlib
import socket

from loadtest.clients.stamped import stamp_arrivals

# Linux: bind() to an address with port 0 without reserving a port until connect(), so
# the kernel can reuse a local port towards different destinations (IP_BIND_ADDRESS_NO_PORT).
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


async def open_socket(
    host: str,
    port: int,
    *,
    local_ip: str | None = None,
    rcvbuf: int | None = None,
    stamped: bool = False,
) -> socket.socket:
    """A connected non-blocking TCP socket.

    ``local_ip`` picks the source address (``127.0.0.x``: each loopback source address
    has its own ~28k ephemeral ports, so more than that many connections to one server
    port need several). ``rcvbuf`` shrinks the kernel receive buffer, which is how a
    slow consumer makes the server's queue grow quickly. ``stamped``: the kernel stamps
    what it receives from the first byte (``loadtest.clients.stamped``).
    """
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if stamped:
            stamp_arrivals(sock)
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if local_ip:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((local_ip, 0))
        await loop.sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return sock
