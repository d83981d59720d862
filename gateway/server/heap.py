"""The start-up heap, frozen out of the garbage collector before a worker serves.

A worker imports FastAPI, pydantic, Starlette, uvicorn, redis and aiohttp and builds its
app: some 80,000 container objects that live as long as the process. CPython's full
collections traverse every tracked object, so each one (they follow bursts of
connections, whose objects are long-lived) paid for that heap again: about 29 ms on a
slow day of the benchmark machine, a pause every publication in flight waits for.
``gc.freeze()`` moves it to the permanent generation, which collections skip.

Only the process entry points call it (``python -m gateway`` and each worker), never
``create_app``: an application embedding the gateway, or the test suite building one
app after another, keeps its own collector as it is.
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> None:
    """Collect what start-up left as garbage, then freeze what remains."""
    gc.collect()
    gc.freeze()
