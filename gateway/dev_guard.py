"""What the pages and the unauthenticated dev-mode routes answer, against other sites.

Dev mode mints tokens for anyone who asks (``/dev/token``) and opens the admin API with
no admin token: fine on a developer's machine, as long as only the developer can ask.
A page of another site, open in the same browser, can send requests to
``http://127.0.0.1:8000`` too; what stops it:

* no CORS on these routes (``gateway.cors.cors_path``: the contract's ``/sse`` and HTTP
  API, and the client script a page may load as a module), so it cannot read answers;
* a JSON body required for the admin API's POSTs, which a cross-site form or a
  ``text/plain`` fetch (sent without a preflight) cannot have;
* for the routes that are open only in dev mode, a ``Host`` that is a loopback name or
  an IP address: DNS rebinding (a domain of the attacker's that resolves to 127.0.0.1,
  making the attacker's page same-origin) names a domain of its own.

And every page is sent with headers that keep it out of other sites' frames, stop
content sniffing, and keep a URL's token out of the ``Referer`` of the links it has.
"""

from __future__ import annotations

import ipaddress
from typing import Final
from urllib.parse import urlsplit

from fastapi import Request
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from gateway.deps import GatewayDep
from gateway.errors import ErrorCode, GatewayError

PAGE_HEADERS: Final = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
}


def local_host(host: str) -> bool:
    """A ``Host`` header naming this machine as its developer would: ``localhost`` (or a
    name under it) or an IP address, never a domain."""
    name = urlsplit("//" + host).hostname or ""
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


async def dev_request(request: Request, gateway: GatewayDep) -> None:
    """A route open without a credential in dev mode: only at a local ``Host``."""
    if gateway.dev_secret is not None and not local_host(request.headers.get("host", "")):
        raise GatewayError(
            ErrorCode.FORBIDDEN,
            "in dev mode this is answered at localhost or an IP address only",
        )


def json_request(request: Request) -> None:
    """A POST whose body says it is JSON: no cross-site form or simple fetch sends one."""
    kind = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if kind != "application/json":
        raise GatewayError(ErrorCode.BAD_REQUEST, "the body must be application/json")


class PageFiles(StaticFiles):
    """``StaticFiles`` whose answers carry ``PAGE_HEADERS``."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(PAGE_HEADERS)
        return response
