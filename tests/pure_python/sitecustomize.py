"""The gateway's modules from their sources, never their compiled builds (setup.py).

On ``PYTHONPATH`` (``scripts/test``'s pure-Python pass) this runs at every
interpreter's start, the servers the tests start included, and makes each module of
the gateway's packages load from its ``.py`` beside any extension module: what a
machine without a C compiler runs.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType

PACKAGES = {"gateway", "channels", "auth"}


class SourcesOnly:
    """A finder ahead of the standard ones for the submodules of ``PACKAGES``."""

    @staticmethod
    def find_spec(
        name: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if path is None or name.partition(".")[0] not in PACKAGES:
            return None
        leaf = name.rpartition(".")[2]
        for entry in path:
            source = os.path.join(entry, leaf + ".py")
            if os.path.isfile(source):
                return importlib.util.spec_from_file_location(name, source)
        return None  # a package, or not ours: the standard finders'


sys.meta_path.insert(0, SourcesOnly)
