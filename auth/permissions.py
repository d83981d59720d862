"""Glob patterns for channel permissions: ``*`` matches any run of characters."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

ANSWERS_KEPT: Final = 1024  # names whose answer a pattern set keeps


class PatternSet:
    """A set of patterns. ``*`` matches any run of characters (``:`` included); nothing else
    is special, so ``chat:*`` allows ``chat:lobby`` and ``chat:a:b`` but not ``chatroom``."""

    def __init__(self, patterns: Iterable[str] = ()) -> None:
        self.patterns = tuple(patterns)
        parts = ["".join(".*" if c == "*" else re.escape(c) for c in p) for p in self.patterns]
        self._regex = re.compile("|".join(f"(?:{p})" for p in parts)) if parts else None
        # The names asked already and their answers: a regular expression's match costs
        # several times a dictionary's lookup, and the same channels come back at every
        # connect. Bounded (names are the clients' to choose): full, it starts over.
        self._answers: dict[str, bool] = {}

    def __call__(self, name: str) -> bool:
        regex = self._regex
        if regex is None:
            return False
        answers = self._answers
        answer = answers.get(name)
        if answer is None:
            if len(answers) >= ANSWERS_KEPT:
                answers.clear()
            answer = answers[name] = regex.fullmatch(name) is not None
        return answer

    def __bool__(self) -> bool:
        return self._regex is not None

    def __repr__(self) -> str:
        return f"PatternSet({list(self.patterns)!r})"
