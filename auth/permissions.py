"""Glob patterns for channel permissions: ``*`` matches any run of characters."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

# Names whose answer a pattern set keeps. Few: a token's sets live as long as the
# verified-token cache keeps it (up to 4,096 tokens, two sets each), and a match is a few
# string comparisons now; what they save is a connection's channels asked again.
ANSWERS_KEPT: Final = 64
SETS_KEPT: Final = 1024  # distinct pattern lists whose set is shared (``pattern_set``)


class PatternSet:
    """A set of patterns. ``*`` matches any run of characters (``:`` included); nothing else
    is special, so ``chat:*`` allows ``chat:lobby`` and ``chat:a:b`` but not ``chatroom``."""

    def __init__(self, patterns: Iterable[str] = ()) -> None:
        self.patterns = tuple(patterns)
        self._exact = frozenset(p for p in self.patterns if "*" not in p)
        self._globs = tuple(tuple(p.split("*")) for p in self.patterns if "*" in p)
        # The names asked already and their answers: a regular expression's match costs
        # several times a dictionary's lookup, and the same channels come back at every
        # connect. Bounded (names are the clients' to choose): full, it starts over.
        self._answers: dict[str, bool] = {}

    def __call__(self, name: str) -> bool:
        if not self.patterns:
            return False
        answers = self._answers
        answer = answers.get(name)
        if answer is None:
            if len(answers) >= ANSWERS_KEPT:
                answers.clear()
            answer = name in self._exact or any(_matches(g, name) for g in self._globs)
            answers[name] = answer
        return answer

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def __repr__(self) -> str:
        return f"PatternSet({list(self.patterns)!r})"


def _matches(parts: tuple[str, ...], name: str) -> bool:
    """Whether ``name`` is the pattern whose ``*``-separated ``parts`` these are: the
    first at the start, the last at the end, each other one found after the one before
    it, leftmost. (Leftmost is never wrong when ``*`` matches anything: a later match
    leaves less room to the rest, never more.) Linear in the name for each part, where a
    regular expression's ``.*`` between parts backtracks: ``*a*a*a*a*a*b`` took a regular
    expression 7 s on a 128-character name, the worker stopped all that time."""
    first, last = parts[0], parts[-1]
    if len(name) < len(first) + len(last) or not name.startswith(first):
        return False
    if not name.endswith(last):
        return False
    at, end = len(first), len(name) - len(last)
    for part in parts[1:-1]:
        found = name.find(part, at, end)
        if found < 0:
            return False
        at = found + len(part)
    return True


_shared: dict[tuple[str, ...], PatternSet] = {}


def pattern_set(patterns: list[str]) -> PatternSet:
    """The ``PatternSet`` of ``patterns``, one for every token that has the same list (a
    role's tokens share one, and its remembered answers): at most ``SETS_KEPT`` lists
    are remembered; full, it starts over."""
    key = tuple(patterns)
    found = _shared.get(key)
    if found is None:
        if len(_shared) >= SETS_KEPT:
            _shared.clear()
        found = _shared[key] = PatternSet(key)
    return found
