"""Which of the gateway's modules run compiled, and any built before its source changed.

setup.py compiles the modules a connect and a delivery run through with mypyc, each
into an extension module beside its ``.py`` (the sources run as they are where no C
compiler is). An editable install builds them in the source tree: a source edited
since runs its old build until ``pip install -e .`` builds it again, which
``stale_modules`` tells (the test suite refuses to start then).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

PACKAGES = ("gateway", "channels", "auth")


def compiled_modules() -> dict[str, str]:
    """The imported modules of the gateway's packages that are compiled: name -> file."""
    found = {}
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if name.partition(".")[0] in PACKAGES and path and path.endswith(_SUFFIXES):
            found[name] = path
    return found


def stale_modules() -> list[str]:
    """The compiled modules whose ``.py`` changed after they were built."""
    stale = []
    for name, path in sorted(compiled_modules().items()):
        source = _source_of(path)
        if os.path.exists(source) and os.stat(source).st_mtime > os.stat(path).st_mtime:
            stale.append(name)
    return stale


def built_modules() -> list[str]:
    """The modules of the packages that load compiled when imported: a build beside the
    source that the import system finds first (nothing is imported but the packages)."""
    root = Path(__file__).resolve().parent.parent
    found = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*")):
            if not path.name.endswith(_SUFFIXES):
                continue
            relative = path.relative_to(root)
            name = ".".join([*relative.parent.parts, path.name.partition(".")[0]])
            spec = importlib.util.find_spec(name)
            if spec is not None and spec.origin == str(path):
                found.append(name)
    return sorted(found)


def summary() -> str:
    """One line for the start-up log."""
    count = len(built_modules())
    if count:
        return f"{count} compiled modules on the connection and fan-out path"
    return "running from sources: no compiled modules (no C compiler or GATEWAY_COMPILE=0)"


_SUFFIXES = tuple(EXTENSION_SUFFIXES)


def _source_of(path: str) -> str:
    for suffix in EXTENSION_SUFFIXES:
        if path.endswith(suffix):
            return path[: -len(suffix)] + ".py"
    return path
