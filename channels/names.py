"""Channel names."""

from __future__ import annotations

import re
from typing import Final

CHANNEL_RE = re.compile(r"[A-Za-z0-9_.:@-]{1,128}")

# Names found valid already: a set's lookup instead of the expression's match, for the
# channels every connect names again. Bounded (names are the clients'): full, it starts
# over.
_VALID: Final[set[str]] = set()
VALID_KEPT: Final = 4096


def is_valid_channel(name: object) -> bool:
    if not isinstance(name, str):
        return False
    if name in _VALID:
        return True
    if CHANNEL_RE.fullmatch(name) is None:
        return False
    if len(_VALID) >= VALID_KEPT:
        _VALID.clear()
    _VALID.add(name)
    return True
