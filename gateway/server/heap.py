"""The worker's heap, set up for a server before it serves.

A worker imports FastAPI, pydantic, Starlette, uvicorn, redis and aiohttp and builds its
app: some 80,000 container objects that live as long as the process. CPython's full
collections traverse every tracked object, so each one (they follow bursts of
connections, whose objects are long-lived) paid for that heap again: about 29 ms on a
slow day of the benchmark machine, a pause every publication in flight waits for.
``gc.freeze()`` moves it to the permanent generation, which collections skip.

The youngest generation is then collected every ``YOUNG_THRESHOLD`` net allocations of
tracked objects instead of CPython's 700. A connect allocates a hundred or more, and a
collection every few connects traversed what the connects in flight held at that
moment, then traversed it again in the middle generation when it lived on: with
thousands of clients held, 3 % of an SSE connect's instructions and 4 % of a
WebSocket's went to the collector (docs/benchmarks.md). Collected ten times less
often, most of those objects are gone before a collection sees them; a collection of
the young generation walks at most that many objects (well under a millisecond), and a
closed connection does not wait for one (its cycles are broken when it closes:
tests/test_connection_cycles.py), so memory does not grow with it.

Only the process entry points call it (``python -m gateway`` and each worker), never
``create_app``: an application embedding the gateway, or the test suite building one
app after another, keeps its own collector as it is.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 7_000


def prepare_heap() -> None:
    """Collect what start-up left as garbage, freeze what remains, and collect the young
    generation every ``YOUNG_THRESHOLD`` allocations (the older ones as CPython does)."""
    gc.collect()
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, oldest)
