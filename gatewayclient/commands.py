"""The WebSocket client's request/reply commands, each one ``_call`` of the connection."""

from __future__ import annotations

from typing import Any

from gatewayclient.models import History, Position, Publication, PublishResult


class Commands:
    """``publish``, ``presence``, ``history``, ``rpc``, ``ping``: mixed into ``Client``,
    which sends them on its current connection (``_call``)."""

    async def _call(self, op: str, **fields: Any) -> dict[str, Any]:
        raise NotImplementedError

    async def publish(self, channel: str, data: Any) -> PublishResult:
        result = await self._call("publish", channel=channel, data=data)
        return PublishResult(int(result["offset"]), str(result["epoch"]))

    async def presence(self, channel: str) -> list[dict[str, Any]]:
        """The channel's clients: ``[{"client", "user", "info"}]``."""
        result = await self._call("presence", channel=channel)
        return list(result.get("clients") or [])

    async def history(
        self, channel: str, *, limit: int | None = None, since: Position | None = None
    ) -> History:
        """The last ``limit`` publications (all history holds without it), or the first
        ``limit`` after ``since`` (``not_found`` when history lost that position)."""
        fields: dict[str, Any] = {"channel": channel}
        if limit is not None:
            fields["limit"] = limit
        if since is not None:
            fields["since"] = since.as_since()
        result = await self._call("history", **fields)
        epoch = str(result["epoch"])
        pubs = [
            Publication(channel, int(p["offset"]), str(p.get("epoch", epoch)), p.get("data"))
            for p in result.get("publications") or []
        ]
        return History(pubs, int(result["offset"]), epoch)

    async def rpc(self, method: str, data: Any = None) -> Any:
        """Call the application's rpc hook; returns its ``data``."""
        result = await self._call("rpc", method=method, data=data)
        return result.get("data")

    async def ping(self) -> None:
        await self._call("ping")
