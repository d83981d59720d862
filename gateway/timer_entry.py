"""One scheduled call of ``gateway.timers.Timers``: a list, its own heap entry.

A module of its own: ``Timers`` is compiled (setup.py), and a compiled module's
classes cannot derive from ``list``.
"""

from __future__ import annotations

from typing import Any

WHEN, SEQ, CALLBACK, ARGS, OWNER = range(5)  # a ``Timer``'s items


class Timer(list[Any]):
    """One scheduled call of ``Timers``, and its own heap entry: ``[when, seq, callback,
    args, owner]``, ordered by lists' comparison, in C (``seq`` is unique: no comparison
    goes past it). ``cancel()`` drops its references at once."""

    __slots__ = ()

    def cancel(self) -> None:
        if self[CALLBACK] is not None:
            self[CALLBACK] = None
            self[ARGS] = ()
            self[OWNER].cancelled()

    def cancelled(self) -> bool:
        return self[CALLBACK] is None
