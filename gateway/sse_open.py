"""``GET /sse`` opened in front of the framework (``GatewayApp``) under any server other
than the gateway's own, when every check of the endpoint passes: ``Shortcut``, with only
the app's CORS around it. (Under the gateway's own HTTP protocol the stream is opened
below ASGI instead: ``gateway.sse_opener``.) It answers exactly what the endpoint would
(tests/test_sse_shortcut.py); what it declines goes on to the framework's route
(``gateway.sse``), which answers it, errors included.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.errors import GatewayError, JSONBody, refusal_name
from gateway.runtime import Gateway
from gateway.sse import open_stream
from gateway.sse_opener import Checked, passing
from gateway.sse_route import EventStream


class Shortcut:
    """A ``GET /sse`` that passes every check is opened here, in front of the framework
    (``GatewayApp``): no middleware stack, routing, dependency solving or exception
    handling (two thirds of an SSE connect's CPU went there), only the app's own CORS
    around the response. The checks are the endpoint's (``checked_request``, the token
    through the same verifier); a request that fails one goes on to the framework and
    its endpoint, which answers it as before: the shortcut only takes what the
    endpoint would accept, and answers it with the same bytes
    (tests/test_sse_shortcut.py)."""

    def __init__(self, gateway: Gateway, cors: Callable[[ASGIApp], ASGIApp]) -> None:
        self.gateway = gateway
        self._opening = cors(lambda scope, receive, send: self._open(scope, receive, send))

    def take(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None] | None:
        """The request's answer, if it is a stream to open here; else None."""
        if scope["type"] != "http" or scope["path"] != "/sse" or scope["method"] != "GET":
            return None
        checked = self._checked(scope)
        if checked is None:
            return None
        scope[CHECKED] = checked
        return self._opening(scope, receive, send)

    def _checked(self, scope: Scope) -> Checked | None:
        authorization = last_event_id = origin = None
        for name, value in scope["headers"]:  # the first of each, as starlette's Headers
            if name == b"authorization" and authorization is None:
                authorization = value.decode("latin-1")
            elif name == b"last-event-id" and last_event_id is None:
                last_event_id = value.decode("latin-1")
            elif name == b"origin" and origin is None:
                origin = value.decode("latin-1")
        query = scope["query_string"]
        return passing(self.gateway, query, authorization, last_event_id, origin)

    async def _open(self, scope: Scope, receive: Receive, send: Send) -> None:
        claims, channels, positions = scope.pop(CHECKED)
        try:
            stream = await open_stream(self.gateway, claims, channels, positions)
        except GatewayError as exc:  # the broker, while subscribing: as the app answers it
            self.gateway.connections.refuse("sse", refusal_name(exc))
            await JSONBody(exc.body(), status_code=exc.status)(scope, receive, send)
            return
        await EventStream(stream)(scope, receive, send)


CHECKED = "gateway.sse.checked"  # the scope's key for what Shortcut._checked found
