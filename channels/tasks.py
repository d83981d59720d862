"""Background tasks that are owned: a strong reference each, crashes logged, cancelled together."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Hashable
from typing import Any, TypeVar

K = TypeVar("K", bound=Hashable)
R = TypeVar("R")


async def gather_grouped(
    items: list[str], group: Callable[[str], K], run: Callable[[K, list[str]], Awaitable[list[R]]]
) -> list[R]:
    """``run`` once per group of ``items`` (by ``group``), the groups at once, each with
    its items in order; the results put back in the order of ``items``."""
    groups: dict[K, list[int]] = {}  # group -> positions in items
    for n, item in enumerate(items):
        groups.setdefault(group(item), []).append(n)
    done = await asyncio.gather(
        *(run(key, [items[n] for n in spots]) for key, spots in groups.items())
    )
    placed: list[R | None] = [None] * len(items)
    for spots, results in zip(groups.values(), done, strict=True):
        for n, result in zip(spots, results, strict=True):
            placed[n] = result
    return [result for result in placed if result is not None]


class Tasks:
    """The background tasks of one owner (the hub, a Redis connection).

    asyncio keeps only a weak reference to a task: one nobody holds may vanish mid-run.
    These are held until done; one that crashes is logged on ``logger``, since nobody
    awaits it; ``cancel`` stops them all and waits for them.
    """

    __slots__ = ("_logger", "_tasks")

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger
        self._tasks: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        # (the loop's own: ``asyncio.create_task`` adds two Python calls to every task)
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._logger.error("task %s crashed", task.get_name(), exc_info=task.exception())

    async def cancel(self) -> None:
        """Cancel every task and wait for them to end. Idempotent."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
