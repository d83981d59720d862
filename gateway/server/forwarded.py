"""The client address that uvicorn's proxy headers middleware puts in a request's scope.

Requests that the gateway's HTTP protocol answers below ASGI (``OPEN_STREAM``) never
reach the middleware, yet their access log line names the same client: behind a trusted
proxy, the address in ``X-Forwarded-For`` rather than the proxy's.
"""

from __future__ import annotations

from typing import Any

from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware


def forwarded_client(app: Any, scope: dict[str, Any]) -> None:
    """Set ``scope["client"]`` as ``ProxyHeadersMiddleware.__call__`` does (copied: see
    ``gateway.server.http.COPIED_FROM_UVICORN``) when ``app`` is that middleware, which
    uvicorn puts in front of the app unless ``--no-proxy-headers``."""
    if not isinstance(app, ProxyHeadersMiddleware):
        return
    client_addr = scope.get("client")
    client_host = client_addr[0] if client_addr else None
    if client_host not in app.trusted_hosts:
        return
    headers = scope["headers"]
    x_forwarded_for_values = [value for name, value in headers if name == b"x-forwarded-for"]
    if x_forwarded_for_values:
        x_forwarded_for = b", ".join(x_forwarded_for_values).decode("latin1")
        host, port = app.trusted_hosts.get_trusted_client_address(x_forwarded_for)
        if host:
            scope["client"] = (host, port)
