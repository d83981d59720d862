"""The build: pyproject.toml holds the project; this adds the compiled modules.

The modules a connection and a delivery run through are compiled by mypyc (from the
same typed sources: the code stays Python and runs as it is where no compiler is)
into C extensions, each beside its ``.py``. Without a C compiler, or with
``GATEWAY_COMPILE=0``, the build installs the sources alone and the gateway runs them
as they are (docs/architecture.md, "Compiled modules").
"""

from __future__ import annotations

import os
from pathlib import Path

from setuptools import setup

# The connection path (a WebSocket's and a stream's, from the first byte to the
# subscription) and the fan-out's: what every connect and every delivery runs.
COMPILED = [
    "auth/permissions.py",
    "auth/tokens.py",
    "channels/backends/redis/keys.py",
    "channels/backends/redis/pubsub.py",
    "channels/fanout.py",
    "channels/hub.py",
    "channels/local.py",
    "channels/lock.py",
    "channels/names.py",
    "channels/session.py",
    "gateway/access.py",
    "gateway/admission.py",
    "gateway/commands.py",
    "gateway/connections.py",
    "gateway/cursor.py",
    "gateway/dispatch.py",
    "gateway/query.py",
    "gateway/runtime.py",
    "gateway/sse.py",
    "gateway/sse_opener.py",
    "gateway/server/addresses.py",
    "gateway/server/frames.py",
    "gateway/server/front_sse.py",
    "gateway/server/front_stream.py",
    "gateway/server/front_upgrade.py",
    "gateway/server/handover.py",
    "gateway/server/head.py",
    "gateway/server/headwait.py",
    "gateway/server/keepalive.py",
    "gateway/server/perserver.py",
    "gateway/server/response_head.py",
    "gateway/server/upgraded.py",
    "gateway/server/target.py",
    "gateway/server/waiting.py",
    "gateway/timers.py",
    "gateway/wire.py",
    "gateway/ws.py",
]


def forget_old_builds() -> None:
    """Delete the compiled modules an earlier editable install left beside the sources:
    a module no longer listed, or a build with ``GATEWAY_COMPILE=0``, would otherwise
    still load its old build (and that build's shared library) instead of its source."""
    root = Path(__file__).resolve().parent
    for package in ("auth", "channels", "gateway"):
        for built in (root / package).rglob("*.so"):
            built.unlink()
    for library in root.glob("*__mypyc*.so"):
        library.unlink()


def compiled() -> list[object]:
    forget_old_builds()
    if os.environ.get("GATEWAY_COMPILE", "1") == "0":
        return []
    from mypyc.build import mypycify

    # The build's own mypy options, not the checks' of pyproject.toml (its plugin's
    # package is not installed where the build runs, nor are the dependencies: their
    # types are Any to the compiler, checked at run time where they meet ours).
    options = ["--config-file=", "--ignore-missing-imports", "--follow-imports=silent"]
    extensions = mypycify([*options, *COMPILED], opt_level="3", debug_level="0")
    for extension in extensions:
        extension.optional = True  # no compiler: the sources as they are
    return extensions


setup(ext_modules=compiled())
