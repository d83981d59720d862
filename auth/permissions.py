"""Glob patterns for channel permissions: ``*`` matches any run of characters."""

from __future__ import annotations

import re
from collections.abc import Iterable


class PatternSet:
    """A set of patterns. ``*`` matches any run of characters (``:`` included); nothing else
    is special, so ``chat:*`` allows ``chat:lobby`` and ``chat:a:b`` but not ``chatroom``."""

    def __init__(self, patterns: Iterable[str] = ()) -> None:
        self.patterns = tuple(patterns)
        parts = ["".join(".*" if c == "*" else re.escape(c) for c in p) for p in self.patterns]
        self._regex = re.compile("|".join(f"(?:{p})" for p in parts)) if parts else None

    def __call__(self, name: str) -> bool:
        return self._regex is not None and self._regex.fullmatch(name) is not None

    def __bool__(self) -> bool:
        return self._regex is not None

    def __repr__(self) -> str:
        return f"PatternSet({list(self.patterns)!r})"
