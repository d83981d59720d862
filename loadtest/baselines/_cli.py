"""The command line every baseline takes, and a work-around for broadcaster's listener."""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

KEEPALIVE_CHANNEL = "_loadtest_keepalive"


def parse_args(description: str | None, argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    return parser.parse_args(argv)


@asynccontextmanager
async def keep_listening(broadcast: Any) -> AsyncIterator[None]:
    """Hold one subscription for the app's lifetime.

    broadcaster 0.3.1's Redis listener wakes when a subscription starts, finds redis-py's
    pub/sub not yet subscribed (the channel is recorded only after SUBSCRIBE is sent),
    leaves ``listen()`` and sleeps until the *next* new channel: a channel's first
    subscriber alone never receives anything. With this subscription in place every
    later one finds the pub/sub subscribed, so the listener keeps running.
    """
    async with broadcast.subscribe(channel=KEEPALIVE_CHANNEL):
        yield
