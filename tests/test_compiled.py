"""The compiled modules (setup.py): built by the install this suite runs on, each one
loaded compiled, or (the pure-Python pass, tests/pure_python) none of them."""

from __future__ import annotations

import ast
import importlib
import os
import shutil
import sys
from pathlib import Path

import pytest

from gateway import compiled

ROOT = Path(__file__).resolve().parent.parent


def listed() -> list[str]:
    """setup.py's ``COMPILED``, as module names."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "COMPILED":
            paths = ast.literal_eval(node.value)
            return sorted(p.removesuffix(".py").replace("/", ".") for p in paths)
    raise AssertionError("setup.py has no COMPILED")


def sources_only() -> bool:
    """This pass loads sources only (tests/pure_python/sitecustomize.py)."""
    return any(getattr(finder, "__name__", "") == "SourcesOnly" for finder in sys.meta_path)


def test_every_listed_module_runs_compiled_or_none_in_the_pure_python_pass() -> None:
    names = listed()
    assert "gateway.ws" in names and "channels.hub" in names
    for name in names:
        importlib.import_module(name)
    loaded = sorted(compiled.compiled_modules())
    if sources_only():
        assert loaded == [] and compiled.built_modules() == []
        assert compiled.summary().startswith("running from sources")
    else:
        assert shutil.which("cc") or shutil.which("gcc"), "the build needs a C compiler"
        assert loaded == names and compiled.built_modules() == names
        assert (
            compiled.summary()
            == f"{len(names)} compiled modules on the connection and fan-out path"
        )
    assert compiled.stale_modules() == []


def test_a_source_edited_after_its_build_is_stale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check the suite runs before anything (tests/conftest.py): a module's build
    older than its ``.py`` is reported."""
    built = tmp_path / "ws.cpython-311-x86_64-linux-gnu.so"
    source = tmp_path / "ws.py"
    source.write_text("")
    built.write_bytes(b"")
    module = type(sys)("gateway.stale_probe")
    module.__file__ = str(built)
    monkeypatch.setitem(sys.modules, "gateway.stale_probe", module)
    assert "gateway.stale_probe" in compiled.compiled_modules()
    os.utime(source, (0, built.stat().st_mtime - 10))
    assert "gateway.stale_probe" not in compiled.stale_modules()
    os.utime(source, (0, built.stat().st_mtime + 10))
    assert "gateway.stale_probe" in compiled.stale_modules()
