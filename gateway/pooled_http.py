"""The HTTP client of the backend hooks: many small POSTs at once to one backend, each
costing little CPU, over keep-alive connections.

A hook call is on the path of a connect, so its client-side cost is a connect's cost:
when every client of a worker reconnects through the connect hook, the worker makes a
thousand calls at once. Measured on this project's machine (2 cores, uvloop, a
backend answering at once on the other core): httpx 0.29 spent 1.3-1.5 ms of CPU per
call alone and 2.5-5 ms with 16-128 calls in flight (its pool re-examines every
connection for every request that starts or ends); aiohttp 230-320 µs whatever the
concurrency. So hooks go through one aiohttp session; httpx stays the client of the
LLM relay (long streams, where a call's set-up cost does not matter).
"""

from __future__ import annotations

from typing import Any

import aiohttp

CONNECTIONS = 256  # to the backend; more calls at once wait for one (within their timeout)


class _Connector(aiohttp.TCPConnector):
    """aiohttp's, but a kept-alive connection that received anything while it sat idle
    in the pool is closed, not handed to the next call: aiohttp parses what arrives then
    as a response and gives it to the next request on that connection as its answer
    (aio-libs/aiohttp#13656), so a backend (or whatever is between) that sent one
    unasked made one client's hook call answer another's (a connect hook's user).
    Overrides the private ``_get`` (pyproject bounds aiohttp to the releases tested)."""

    async def _get(self, key: Any, traces: list[Any]) -> Any:
        while (connection := await super()._get(key, traces)) is not None:
            protocol = connection.protocol
            if protocol is not None and not protocol.should_close:  # nothing came meanwhile
                return connection
            connection.close()
        return None


class ReplyTooLarge(Exception):
    """The reply's body is over the caller's ``limit``: not read further."""


class PooledClient:
    """One ``aiohttp.ClientSession``, made in the running loop on first use."""

    def __init__(self, connections: int | None = None) -> None:
        self._connections = CONNECTIONS if connections is None else connections
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        connector = _Connector(limit=self._connections, limit_per_host=0)
        # The caller's deadline bounds each call (``asyncio.timeout``): none of aiohttp's.
        timeout = aiohttp.ClientTimeout(total=None)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=timeout, trust_env=False, raise_for_status=False
        )
        return self._session

    async def post(
        self, url: str, content: bytes, headers: dict[str, str], limit: int
    ) -> tuple[int, bytes]:
        """The status and body of a POST of ``content``; raises ``aiohttp.ClientError``
        (or ``OSError``) when the backend cannot be reached or breaks the exchange, and
        ``ReplyTooLarge`` for a body over ``limit`` bytes (said or sent: the rest unread)."""
        session = self._session or self._open()
        async with session.post(url, data=content, headers=headers, allow_redirects=False) as r:
            if r.content_length is not None and r.content_length > limit:
                raise ReplyTooLarge
            body = bytearray()
            async for chunk in r.content.iter_any():
                body += chunk
                if len(body) > limit:
                    raise ReplyTooLarge
            return r.status, bytes(body)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
