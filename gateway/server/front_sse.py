"""A ``GET /sse`` whose whole head was the front door's first read (``gateway.server.front``):
the app's stream opener asked, and a stream it opens at once started on a
``FrontStream``, written as ``DetachableCycle.start_stream`` writes it; one it opens once
its subscribes are done started then (``FrontDoor._open_later``).

Compiled (setup.py): every SSE connect runs it. The front door, a uvicorn protocol made
per server, cannot be; its attributes are read here as any object's, and its
``_start_here`` and ``_open_later`` are called as its methods (tests watch them).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import unquote

import httptools

from gateway.server.addresses import peer
from gateway.server.cycle import log_failure
from gateway.server.front_stream import FrontStream, StreamRequest, log_stream
from gateway.server.head import FRONT_LIMIT, Head
from gateway.server.ports import OPEN_STREAM, OpenLater, Started
from gateway.server.response_head import chunk, stream_start
from gateway.server.target import request_target


def stream_here(door: Any, data: bytes) -> bool:
    """Whether ``data``, the first read of ``door``, is a whole ``GET /sse`` head and
    nothing after it, which uvicorn would hand to the app's stream opener as it is, and
    the opener's answer is a stream started or opening here. False when uvicorn's
    protocol is to read it: told the opener's answer, if it was asked (``stream_asked``)."""
    opener = door.app_state.get(OPEN_STREAM)
    if (
        opener is None
        or door.limit_concurrency is not None
        or door.root_path
        or len(data) > FRONT_LIMIT
        or data.find(b"\r\n\r\n") != len(data) - 4
    ):
        return False
    head = Head()
    parser = head.parser = httptools.HttpRequestParser(head)
    try:
        parser.feed_data(data)
    except httptools.HttpParserError:
        return False
    finally:
        head.parser = None  # (it holds the head's callbacks)
    if (
        not head.done
        or not head.keep_alive
        or head.expects
        or head.upgrades
        or parser.get_method() != b"GET"
        or not head.http11(data, parser)
    ):
        return False
    raw_path, query = request_target(head.url)
    if not raw_path.isascii():
        return False
    path = raw_path.decode("ascii")
    if "%" in path:
        path = unquote(path)
    answer = opener(StreamRequest(path, query, head.headers))
    if isinstance(answer, OpenLater):  # once the app's subscribes are done
        deadlines = door.head_deadlines
        if deadlines is not None:
            deadlines.done(door)
        stream = door._stream = FrontStream(door)
        opening = door._open_later(answer, stream, data, raw_path, query, head.headers)
        task = asyncio.get_running_loop().create_task(opening)  # (not ensure_future's 4 calls)
        tasks = door.tasks
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        task.add_done_callback(log_failure)
        return True
    if answer is not None and door._start_here(answer, raw_path, query, head.headers):
        return True
    door.stream_asked, door.stream_answer = True, answer  # uvicorn's answers as told
    return False


def start_here(
    door: Any,
    answer: Started,
    raw_path: bytes,
    query: bytes,
    headers: list[tuple[bytes, bytes]],
    stream: FrontStream | None,
) -> bool:
    """Start ``answer``'s stream on ``door``, as ``DetachableCycle.start_stream`` starts
    one; False, with nothing done, when its headers are not ones uvicorn would write (its
    cycle then answers)."""
    head = stream_start(door.server_state.default_headers, answer.headers)
    if head is None:
        return False
    transport = door.transport
    deadlines = door.head_deadlines
    if deadlines is not None:
        deadlines.done(door)
    access = door.access_logger
    if access.isEnabledFor(logging.INFO) and access.hasHandlers():
        client = peer(transport.get_extra_info("peername"))
        log_stream(access, door.app, client, raw_path, query, headers)
    if stream is None:  # (one that waited has its own: ``_open_later``)
        stream = door._stream = FrontStream(door)
    transport.write(head + chunk(answer.opening))
    answer.start(stream)
    return True
