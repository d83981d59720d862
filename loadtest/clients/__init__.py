"""Subscriber clients: picows WebSockets and a raw-socket SSE reader, both on uvloop.

Both are written as protocol callbacks (no task per connection, no per-message awaits)
so that one client core can keep up with a server core: a delivery costs the client a
frame parse, an ``orjson.loads`` and a few counter updates.
"""

from loadtest.clients.net import open_socket
from loadtest.clients.sse import SseClient, connect_sse
from loadtest.clients.ws import WsClient, connect_ws

__all__ = ["SseClient", "WsClient", "connect_sse", "connect_ws", "open_socket"]
