"""The shape of the code, kept: small modules, no import cycles, dependencies pointing inward.

Read from the source (``ast``), every import counted, those inside functions and
under ``TYPE_CHECKING`` included: a cycle hidden in a function is still a cycle.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("gateway", "gatewayclient", "channels", "auth", "loadtest")
MAX_LINES = 400  # gateway/, gatewayclient/, channels/, auth/


def modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = modules()


def imports_of(name: str) -> Iterator[str]:
    """The project modules ``name`` imports, anywhere in its source."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names if alias.name in MODULES)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                if f"{base}.{alias.name}" in MODULES:  # a module: from package import module
                    yield f"{base}.{alias.name}"
                elif base in MODULES:  # a name defined in the module
                    yield base


GRAPH = {name: set(imports_of(name)) - {name} for name in MODULES}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles() -> None:
    assert cycles(GRAPH) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize(
    "path", [p for n, p in MODULES.items() if not n.startswith("loadtest")], ids=str
)
def test_modules_are_at_most_400_lines(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines: split it by concept"


def third_party_imports(name: str) -> set[str]:
    path = MODULES[name]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_dependencies_point_inward() -> None:
    """``channels`` and ``auth`` know no web framework and nothing above them; the server
    adapter knows uvicorn but not the hub or the transports."""
    web = {"fastapi", "starlette", "uvicorn", "websockets", "httpx"}
    wrong: list[str] = []
    for name in MODULES:
        top = name.split(".")[0]
        project = {other.split(".")[0] for other in GRAPH[name]}
        if top == "channels" and (project - {"channels"} or third_party_imports(name) & web):
            wrong.append(name)
        if top == "auth" and (project - {"auth"} or third_party_imports(name) & web):
            wrong.append(name)
        if name.startswith("gateway.server") and any(
            other.startswith("channels.hub") or other in ("gateway.ws", "gateway.sse")
            for other in GRAPH[name]
        ):
            wrong.append(name)
    assert wrong == []


def test_only_the_mode_choice_imports_the_gateways_uvicorn_protocols() -> None:
    """They subclass private uvicorn API: in stock mode (or on an untested uvicorn) they
    must not even be imported, so only ``options`` does, once it chose them."""
    protocols = {"gateway.server.websocket", "gateway.server.http", "gateway.server.front"}
    importers = sorted(
        n
        for n in MODULES
        if GRAPH[n] & protocols and n.startswith("gateway") and n not in protocols
    )
    assert importers == ["gateway.server.options"]


def test_the_runtime_knows_no_feature_and_only_channels_knows_the_backends() -> None:
    """Features install themselves on the app (gateway.llm, gateway.demo); the gateway reaches
    a backend only through the hub, so nothing outside channels/ imports a backend module."""
    assert not {
        m for m in GRAPH["gateway.runtime"] if m.startswith(("gateway.llm", "gateway.demo"))
    }
    outside = [
        (name, sorted(m for m in GRAPH[name] if m.startswith("channels.backends")))
        for name in MODULES
        if not name.startswith("channels")
    ]
    assert [(name, deps) for name, deps in outside if deps] == []


def test_the_python_client_needs_only_websockets_httpx_and_orjson() -> None:
    """``gatewayclient`` is installed by applications that never run the gateway: it
    imports nothing of the server side (no FastAPI, no gateway, channels or auth)."""
    allowed = {"websockets", "httpx", "orjson", "gatewayclient", "__future__"}
    wrong = {
        (name, module)
        for name in MODULES
        if name.startswith("gatewayclient")
        for module in third_party_imports(name)
        if module not in allowed and module not in sys.stdlib_module_names
    }
    assert wrong == set()
