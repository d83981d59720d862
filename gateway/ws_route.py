"""``GET /ws`` as an ASGI route: what uvicorn's stock protocols (``GATEWAY_RAW_WRITES=false``)
and any other ASGI server call for an upgrade. Under the gateway's own protocol the
opener (``gateway.ws.opener``) answers ``/ws`` below ASGI and this route is not called.

Apart from ``gateway.ws``, which is compiled (setup.py): FastAPI reads this endpoint's
signature for its dependencies, which a compiled function does not show.
"""

from __future__ import annotations

from fastapi import APIRouter, WebSocket

from auth import AuthError
from channels.session import Ending
from gateway.admission import ask_backend, refusal
from gateway.deps import MaybeClaimsDep
from gateway.errors import Close
from gateway.query import hooked
from gateway.runtime import Gateway
from gateway.server.ports import websocket_port
from gateway.ws import Connection

router = APIRouter()


async def _refuse(websocket: WebSocket, close: Close) -> None:
    """Accept, then close with ``close``: browsers can only read the code after a handshake."""
    await websocket.accept()
    await websocket.close(close.code, close.reason)


@router.websocket("/ws")
async def websocket_endpoint(websocket: WebSocket, claims: MaybeClaimsDep) -> None:
    gateway: Gateway = websocket.app.state.gateway
    by_hook = hooked(gateway, claims)
    refused = refusal(gateway, websocket.headers.get("origin"), claims, by_hook)
    if refused is not None:
        return await _refuse(websocket, refused)
    grant = client_id = None
    if by_hook:
        answer = await ask_backend(gateway, claims, websocket.cookies, websocket.headers)
        if isinstance(answer, Close):
            return await _refuse(websocket, answer)
        claims, grant, client_id = answer.claims, answer.grant, answer.client_id
    assert not isinstance(claims, AuthError)
    await websocket.accept()
    raw = gateway.settings.raw_writes
    port = websocket_port(websocket.scope, websocket.receive, websocket.send, raw=raw)
    connection = Connection(gateway, claims, port, grant, client_id)
    connection.start()
    try:
        await port.hold()  # the gateway's protocol: at once, and the connection lives on
    except BaseException:  # the server cancelled the call: end the connection
        connection.session.close(Ending.CLIENT_GONE)
        raise
    return None
