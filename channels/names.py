"""Channel names."""

from __future__ import annotations

import re

CHANNEL_RE = re.compile(r"[A-Za-z0-9_.:@-]{1,128}")


def is_valid_channel(name: object) -> bool:
    return isinstance(name, str) and CHANNEL_RE.fullmatch(name) is not None
