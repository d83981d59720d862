"""Calls of one Lua script made in the same loop turn, sent to Redis in one pipeline.

When a crowd of clients arrives, each on a channel of its own (per-user channels), every
subscribe reads its channel's position with the history script: through redis-py one
call costs a pooled connection taken and given back, a write, a read and the event loop's
turns between them, several times what Redis spends on the script. ``BatchedScript``
takes the calls of one loop turn and sends them from a task of its own in one pipeline
(one connection, one write, the replies read in one go); a turn with one call makes it
as a plain call. Each caller gets its own reply, or its own exception: a reply that is
an error (the script's) goes to its caller alone, a failure of the exchange to all of
them. A script Redis lost (a restart) is loaded and the calls that met NOSCRIPT are sent
again (a NOSCRIPT call ran nothing). A caller cancelled while its call waits in the batch
is left out of it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.typing import EncodableT

from channels.tasks import Tasks

logger = logging.getLogger(__name__)

Call = tuple[list[str], list[EncodableT], "asyncio.Future[Any]"]


class BatchedScript:
    def __init__(self, redis: Redis, script: AsyncScript) -> None:
        self._redis = redis
        self._script = script
        self._batch: list[Call] | None = None
        self._tasks = Tasks(logger)

    async def __call__(self, keys: list[str], args: list[EncodableT]) -> Any:
        reply: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        batch = self._batch
        if batch is None:
            batch = self._batch = []
            self._tasks.spawn(self._send(batch), "redis-script-batch")
        batch.append((keys, args, reply))
        return await reply

    async def close(self) -> None:
        """Cancel the batches: their callers get a ``ConnectionError`` of redis-py's (one
        whose task had not started yet never runs: told here)."""
        batch, self._batch = self._batch, None
        await self._tasks.cancel()
        for _keys, _args, reply in batch or ():
            if not reply.done():
                reply.set_exception(RedisConnectionError("closed"))

    async def _send(self, batch: list[Call]) -> None:
        self._batch = None  # what is called from here on goes in the next batch
        calls = [call for call in batch if not call[2].done()]
        try:
            if len(calls) == 1:
                keys, args, reply = calls[0]
                _settle(reply, await self._script(keys=keys, args=args))
            elif calls:
                await self._pipelined(calls)
        except BaseException as exc:
            # Cancelled, the broker is closing: its callers are told as of a lost Redis
            # (``BrokerUnavailable``), not cancelled themselves.
            told = exc if isinstance(exc, Exception) else RedisConnectionError("closed")
            for _keys, _args, reply in calls:
                if not reply.done():
                    reply.set_exception(told)
            if told is not exc:
                raise

    async def _pipelined(self, calls: list[Call]) -> None:
        results = await evalsha_each(self._redis, self._script, [call[:2] for call in calls])
        for (_keys, _args, reply), result in zip(calls, results, strict=True):
            _settle(reply, result)


async def evalsha_each(
    redis: Redis, script: AsyncScript, calls: list[tuple[list[str], list[EncodableT]]]
) -> list[Any]:
    """``script`` called with each of ``calls`` (keys, arguments) in one pipeline: the
    replies in order, an error reply as its exception. Where Redis lost the script (a
    restart) it is loaded and the calls that met NOSCRIPT are sent again, once (a NOSCRIPT
    call ran nothing). Raises what the exchange raises."""
    replies: list[Any] = [None] * len(calls)
    todo = list(range(len(calls)))
    for attempt in range(2):
        async with redis.pipeline(transaction=False) as pipe:
            for n in todo:
                keys, args = calls[n]
                pipe.evalsha(script.sha, len(keys), *keys, *args)
            results = await pipe.execute(raise_on_error=False)
        for n, result in zip(todo, results, strict=True):
            replies[n] = result
        todo = [n for n in todo if isinstance(replies[n], NoScriptError)]
        if not todo or attempt:
            break
        await redis.script_load(script.script)
    return replies


def _settle(reply: asyncio.Future[Any], result: Any) -> None:
    if reply.done():
        return
    if isinstance(result, Exception):
        reply.set_exception(result)
    else:
        reply.set_result(result)
