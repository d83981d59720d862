"""The server adapter (gateway/server/): what it takes from uvicorn, and when it does not.

The gateway's protocols extend private uvicorn API and copy two of its methods. A
uvicorn release that changes them must fail here, by name, rather than somewhere in
a connection's life: the copied methods' sources are compared with what was copied,
the extended ones must exist, and pyproject.toml pins uvicorn to the releases the
suite passed on. Outside that range, or with ``GATEWAY_RAW_WRITES=false``, the
gateway runs on uvicorn's stock protocols, and says so.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import inspect
import logging
import pickle
import random
import re
import textwrap
import tomllib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from gateway.server import addresses, cycle, http, ports, websocket
from gateway.server.cycle import DetachableCycle
from gateway.server.front import FrontDoor
from gateway.server.http import GatewayHttpToolsProtocol
from gateway.server.options import UVICORN_TESTED, is_tested, server_choice, uvicorn_options
from gateway.server.websocket import GatewayWebSocketProtocol
from gateway.settings import Settings
from tests.conftest import SECRET, RunningServer, eventually
from tests.helpers import api_client, api_publish, ws_client
from tests.procs import GatewayProcess

ROOT = Path(__file__).resolve().parent.parent

EXTENDED = {
    # What the gateway overrides or calls, and whose uvicorn behaviour it relies on.
    WebSocketsSansIOProtocol: [
        "run_asgi",
        "send",
        "receive",
        "handle_connect",
        "handle_parser_exception",
        "start_keepalive",
        "stop_keepalive",
        "keepalive_timeout",
        "send_500_response",
    ],
    HttpToolsProtocol: [
        "_start_asgi_task",
        "on_headers_complete",
        "on_message_begin",
        "connection_lost",
        "handle_websocket_upgrade",
        "_should_upgrade",
        "data_received",
        "eof_received",
        "pause_writing",
        "resume_writing",
    ],
    RequestResponseCycle: ["run_asgi", "send", "send_500_response"],
}
ATTRIBUTES = {
    # Instance state the subclasses read or replace (set in __init__ / connection_made).
    WebSocketsSansIOProtocol: [
        "queue",
        "writable",
        "close_sent",
        "disconnected",
        "close_timer",
        "handshake_complete",
        "pending_ping_payload",
        "ping_sent_at",
        "ping_interval",
        "ping_timeout",
        "conn",
    ],
}
COPIED = {**websocket.COPIED_FROM_UVICORN, **http.COPIED_FROM_UVICORN, **cycle.COPIED_FROM_UVICORN}


def fingerprint(function: Callable[..., Any]) -> str:
    source = textwrap.dedent(inspect.getsource(function))
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def uvicorn_attribute(path: str) -> Any:
    module, _, qualname = path.partition(":")
    found: Any = importlib.import_module(module)
    for name in qualname.split("."):
        found = getattr(found, name)
    return found


@pytest.mark.parametrize("path", sorted(COPIED))
def test_the_methods_copied_from_uvicorn_are_unchanged_there(path: str) -> None:
    now = fingerprint(uvicorn_attribute(path))
    assert now == COPIED[path], (
        f"uvicorn {uvicorn.__version__} changed {path}, which gateway/server/ copied: "
        "bring its changes into the copy, then record the new fingerprint and widen the "
        "tested range (UVICORN_TESTED, pyproject.toml) once the whole suite passes"
    )


def test_copies_are_recorded_for_both_protocols() -> None:
    assert sorted(COPIED) == [
        "uvicorn.middleware.proxy_headers:ProxyHeadersMiddleware.__call__",
        "uvicorn.protocols.http.flow_control:FlowControl.__init__",
        "uvicorn.protocols.http.httptools_impl:HttpToolsProtocol.__init__",
        "uvicorn.protocols.http.httptools_impl:HttpToolsProtocol.connection_made",
        "uvicorn.protocols.http.httptools_impl:HttpToolsProtocol.on_headers_complete",
        "uvicorn.protocols.http.httptools_impl:RequestResponseCycle.run_asgi",
        "uvicorn.protocols.http.httptools_impl:RequestResponseCycle.send",
        "uvicorn.protocols.websockets.websockets_sansio_impl:WebSocketsSansIOProtocol.run_asgi",
    ]


class _Transport:
    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 40000)}.get(name)

    def close(self) -> None: ...


def _protocol_state(protocol: Any, names: Any) -> dict[str, Any]:
    """The attributes ``names`` of ``protocol`` (of the objects made anew per
    connection, their type)."""
    return {
        name: type(getattr(protocol, name))
        if name in ("parser", "pipeline")
        else getattr(protocol, name)
        for name in names
    }


async def test_the_lean_constructor_leaves_what_uvicorns_would() -> None:
    """``GatewayHttpToolsProtocol.__init__`` sets per server what uvicorn's sets per
    connection: the same attributes, the same values, each server its own."""
    from uvicorn.config import Config
    from uvicorn.protocols.http.flow_control import FlowControl
    from uvicorn.server import ServerState

    from gateway.app import create_app

    loop = asyncio.get_running_loop()
    servers = []
    for path in ("/a", "/b"):
        config = Config(create_app(Settings(jwt_secret=SECRET)), root_path=path)
        config.load()
        servers.append((config, ServerState(), {"n": path}))
    for config, server_state, app_state in servers * 2:
        theirs = HttpToolsProtocol(config, server_state, app_state, _loop=loop)
        ours = GatewayHttpToolsProtocol(config, server_state, app_state, _loop=loop)
        assert _protocol_state(ours, vars(theirs)) == _protocol_state(theirs, vars(theirs))
        assert ours.root_path == config.root_path and ours.app_state is app_state
        assert (
            ours.pipeline
            is not GatewayHttpToolsProtocol(config, server_state, app_state, _loop=loop).pipeline
        )
        transport: Any = _Transport()
        ours.connection_made(transport)
        theirs.connection_made(transport)
        assert type(ours.flow) is FlowControl
        assert vars(ours.flow).keys() == vars(theirs.flow).keys()
        assert not ours.flow.read_paused and not ours.flow.write_paused
        assert ours.flow._is_writable_event.is_set()
        assert (ours.server, ours.client, ours.scheme) == (
            theirs.server,
            theirs.client,
            theirs.scheme,
        )
        ours.connection_lost(None)
        theirs.connections.discard(theirs)


@pytest.mark.parametrize("base", list(EXTENDED), ids=lambda c: c.__name__)
def test_the_methods_the_gateway_extends_are_there(base: type) -> None:
    missing = [name for name in EXTENDED[base] if not callable(getattr(base, name, None))]
    assert missing == [], f"uvicorn's {base.__name__} lacks {missing}"


def test_the_websocket_state_the_gateway_uses_is_set_up_by_uvicorn() -> None:
    source = inspect.getsource(WebSocketsSansIOProtocol.__init__)
    missing = [
        name for name in ATTRIBUTES[WebSocketsSansIOProtocol] if f"self.{name}" not in source
    ]
    assert missing == [], f"uvicorn's WebSocketsSansIOProtocol no longer sets {missing}"


def test_the_cycle_and_protocols_are_the_gateways_subclasses() -> None:
    assert issubclass(DetachableCycle, RequestResponseCycle)
    assert issubclass(GatewayHttpToolsProtocol, HttpToolsProtocol)
    assert issubclass(GatewayWebSocketProtocol, WebSocketsSansIOProtocol)
    # The cycle's class is swapped in place: it must not add instance layout.
    assert "__slots__" not in vars(DetachableCycle)
    assert not hasattr(RequestResponseCycle, "__slots__")


def test_pyproject_pins_uvicorn_to_the_tested_releases() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    [requirement] = [r for r in project["dependencies"] if r.startswith("uvicorn")]
    (low, high) = UVICORN_TESTED
    assert re.sub(r"\s", "", requirement.split(";")[0]) == (
        f"uvicorn[standard]>={low[0]}.{low[1]},<{high[0]}.{high[1]}"
    )
    assert is_tested(uvicorn.__version__), "the installed uvicorn is outside the pinned range"


# --------------------------------------------------------------------------- choosing a mode


def test_raw_writes_installs_the_gateways_protocols() -> None:
    settings = Settings(jwt_secret=SECRET, raw_writes=True)
    choice = server_choice(settings)
    options = uvicorn_options(settings, choice)
    assert options["ws"] is GatewayWebSocketProtocol
    assert options["http"].cls is FrontDoor  # (made by ``perserver.Protocols``)
    assert issubclass(FrontDoor, GatewayHttpToolsProtocol)
    assert options["ws_max_size"] == settings.max_message_bytes
    assert choice.fallbacks == [] and "gateway's protocols" in choice.summary


def test_raw_writes_off_is_stock_uvicorn() -> None:
    settings = Settings(jwt_secret=SECRET, raw_writes=False)
    choice = server_choice(settings)
    options = uvicorn_options(settings, choice)
    assert options["ws"] == "websockets-sansio" and options["http"] == "httptools"
    # The app refuses what is over GATEWAY_MAX_MESSAGE_BYTES, with the contract's reason.
    assert options["ws_max_size"] > settings.max_message_bytes
    assert choice.fallbacks == [] and "GATEWAY_RAW_WRITES=false" in choice.summary


@pytest.mark.parametrize("version", ["0.51.0", "0.56.0", "1.0.0"])
def test_an_untested_uvicorn_falls_back_to_stock_and_says_why(version: str) -> None:
    settings = Settings(jwt_secret=SECRET)
    choice = server_choice(settings, uvicorn_version=version)
    assert uvicorn_options(settings, choice)["ws"] == "websockets-sansio"
    [fallback] = choice.fallbacks
    assert f"uvicorn {version} is outside" in fallback


def test_without_httptools_http_falls_back_to_h11_and_says_so() -> None:
    settings = Settings(jwt_secret=SECRET)
    choice = server_choice(settings, httptools=False)
    options = uvicorn_options(settings, choice)
    assert options["http"] == "h11" and options["ws"] is GatewayWebSocketProtocol
    assert any("h11" in fallback for fallback in choice.fallbacks)


async def test_python_m_gateway_logs_the_server_mode_at_start() -> None:
    for raw, expected in (("true", "with the gateway's protocols"), ("false", "stock protocols")):
        proc = GatewayProcess(env={"GATEWAY_JWT_SECRET": SECRET, "GATEWAY_RAW_WRITES": raw})
        try:
            await proc.wait_ready()
            assert expected in proc.output(), proc.output()
        finally:
            proc.stop()


@pytest.mark.gateway_protocols
async def test_a_server_without_raw_ports_is_a_logged_fallback_to_asgi(
    make_server: Callable[..., Awaitable[RunningServer]],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """GATEWAY_RAW_WRITES on, but the server offers no raw port (uvicorn's own protocol)."""
    monkeypatch.setattr(ports, "_warned", set())  # each fallback is logged once per process
    server = await make_server(uvicorn_options={"ws": "websockets-sansio"})
    with caplog.at_level(logging.WARNING, logger="gateway.server.ports"):
        async with ws_client(server) as client, api_client(server) as http:
            await client.subscribe("fallback")
            await api_publish(http, "fallback", {"n": 1})
            assert len(await client.publications("fallback", 1)) == 1
    assert "offers no raw WebSocket port: writing through ASGI" in caplog.text


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_the_protocol_names_both_ends_as_uvicorn_does(host: str) -> None:
    """``connection_made`` reads the addresses from sockname and peername (no socket object
    per connection under uvloop): the same tuples as uvicorn's, IPv6 included."""
    import uvloop
    from uvicorn.protocols.utils import get_local_addr, get_remote_addr

    async def both_ways() -> list[tuple[Any, Any]]:
        made: asyncio.Future[asyncio.Transport] = asyncio.get_running_loop().create_future()

        class Taker(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                made.set_result(transport)  # type: ignore[arg-type]

        server = await asyncio.get_running_loop().create_server(Taker, host, 0)
        port = server.sockets[0].getsockname()[1]
        _, writer = await asyncio.open_connection(host, port)
        transport = await asyncio.wait_for(made, 5)
        ours = (
            addresses.address(transport.get_extra_info("sockname"), local=True),
            addresses.peer(transport.get_extra_info("peername")),
        )
        writer.close()
        server.close()
        return [ours, (get_local_addr(transport), get_remote_addr(transport))]

    ours, uvicorns = uvloop.run(both_ways())
    assert ours == uvicorns
    assert ours[0] is not None and ours[0][0] == host and ours[1] is not None


@pytest.mark.gateway_protocols
async def test_an_upgrade_answered_here_keeps_the_transports_protocol(
    server: RunningServer,
) -> None:
    """The upgrade is handed on, not switched: uvloop's ``set_protocol`` stops and starts
    reading the socket (an epoll change each way per connection). The HTTP protocol stays
    the transport's, with nothing of its own left but the WebSocket it hands to, which
    gets every frame and the connection's end."""
    from gateway.server.upgraded import UpgradedWebSocket

    state = server.server.server_state
    async with ws_client(server) as ws:
        await ws.subscribe("handed-on")
        (upgraded,) = [c for c in state.connections if isinstance(c, UpgradedWebSocket)]
        protocol = upgraded.transport.get_protocol()
        assert type(protocol).__bases__ == (FrontDoor,)  # the server's (``server_class``)
        assert vars(protocol) == {"upgraded": upgraded}
        async with api_client(server) as api:
            await api_publish(api, "handed-on", {"n": 1})
        (push,) = await ws.publications("handed-on", 1)
        assert push["data"] == {"n": 1}
    await eventually(lambda: not state.connections and not server.gateway.hub.sessions)
    assert upgraded.ended


async def test_the_front_door_made_in_full_is_what_uvicorns_protocol_is() -> None:
    """``FrontDoor`` starts lean; once it is uvicorn's (``_begin``: a request that is not
    an upgrade it answers), it holds what uvicorn's protocol holds after
    ``connection_made``, the same values."""
    from uvicorn.config import Config
    from uvicorn.protocols.http.flow_control import FlowControl
    from uvicorn.server import ServerState

    from gateway.app import create_app

    loop = asyncio.get_running_loop()
    config = Config(create_app(Settings(jwt_secret=SECRET)), root_path="/r")
    config.load()
    server_state, app_state = ServerState(), {"n": 1}
    theirs = HttpToolsProtocol(config, server_state, app_state, _loop=loop)
    ours = FrontDoor(config, server_state, app_state, _loop=loop)
    transport: Any = _Transport()
    theirs.connection_made(transport)
    ours.connection_made(transport)
    assert "parser" not in vars(ours) and "flow" not in vars(ours)  # lean until needed
    ours._begin()
    names = [name for name in vars(theirs) if name != "flow"]
    assert _protocol_state(ours, names) == _protocol_state(theirs, names)
    assert type(ours.flow) is FlowControl and ours.begun
    ours.connection_lost(None)
    theirs.connections.discard(theirs)
    assert not server_state.connections


async def test_a_servers_connections_share_its_settings_on_their_class() -> None:
    """What uvicorn's ``__init__`` sets the same on each connection of a server is the
    class attributes of one subclass per server (and protocol class): each connection
    reads uvicorn's values, and its own dict holds none of them; another server, or
    another app state, gets a class of its own."""
    from uvicorn.config import Config
    from uvicorn.server import ServerState

    from gateway.app import create_app
    from gateway.server.perserver import server_wide

    loop = asyncio.get_running_loop()
    config = Config(create_app(Settings(jwt_secret=SECRET)), root_path="/r")
    config.load()
    server_state, app_state = ServerState(), {"n": 1}
    theirs = HttpToolsProtocol(config, server_state, app_state, _loop=loop)
    first, second = (FrontDoor(config, server_state, app_state, _loop=loop) for _ in "12")
    full = GatewayHttpToolsProtocol(config, server_state, app_state, _loop=loop)
    assert type(first) is type(second) and type(first).__bases__ == (FrontDoor,)
    assert type(full).__bases__ == (GatewayHttpToolsProtocol,)
    names = list(server_wide(config, server_state, app_state))
    assert len(names) == 13 and set(names) <= set(vars(theirs))
    for ours in (first, full):
        assert _protocol_state(ours, names) == _protocol_state(theirs, names)
        assert not set(names) & set(vars(ours))
    again = FrontDoor(config, server_state, {"n": 2}, _loop=loop)
    other = FrontDoor(config, ServerState(), app_state, _loop=loop)
    assert len({type(first), type(again), type(other)}) == 3
    assert again.app_state == {"n": 2} and other.server_state is not server_state
    theirs.connections.discard(theirs)


async def test_the_protocols_uvicorn_is_given_are_the_ones_the_class_makes() -> None:
    """uvicorn calls ``config.http_protocol_class`` with keywords per connection; the
    gateway gives it ``Protocols``, which makes an instance of the server's class without
    calling the class: the same class and the same state as the class makes, with or
    without a loop given, for each server in turn."""
    from uvicorn.config import Config
    from uvicorn.server import ServerState

    from gateway.app import create_app
    from gateway.server.perserver import Protocols

    loop = asyncio.get_running_loop()
    config = Config(create_app(Settings(jwt_secret=SECRET)))
    config.load()
    server_state, app_state = ServerState(), {"n": 1}
    for cls in (FrontDoor, GatewayHttpToolsProtocol):
        made = Protocols(cls)
        for state in (server_state, ServerState(), server_state):
            for given in (None, loop):
                ours = made(config=config, server_state=state, app_state=app_state, _loop=given)
                theirs = cls(config=config, server_state=state, app_state=app_state, _loop=given)
                assert type(ours) is type(theirs) and ours.server_state is state
                mine, yours = vars(ours), vars(theirs)
                assert mine.keys() == yours.keys()
                assert {k: v for k, v in mine.items() if k not in ("parser", "pipeline")} == {
                    k: v for k, v in yours.items() if k not in ("parser", "pipeline")
                }
                assert type(mine.get("parser")) is type(yours.get("parser"))
        assert len({type(made(config, s, app_state)) for s in (server_state, ServerState())}) == 2
        copy = pickle.loads(pickle.dumps(made))  # as ``--workers`` gives each child the config
        assert type(copy) is Protocols and copy.cls is cls
        assert type(copy(config, server_state, app_state)) is type(
            made(config, server_state, app_state)
        )


def test_request_targets_split_as_httptools_splits_them() -> None:
    """``request_target`` against ``httptools.parse_url``, which uvicorn uses: random
    targets over every byte that httptools' request parser lets through (as uvicorn
    gets them), plain ones (the split) and others (the URL parser) alike."""
    import httptools

    from gateway.server.target import request_target

    class Target:
        def __init__(self) -> None:
            self.url = b""

        def on_url(self, url: bytes) -> None:
            self.url += url

    def accepted(url: bytes) -> bool:
        target = Target()
        try:
            httptools.HttpRequestParser(target).feed_data(b"GET " + url + b" HTTP/1.1\r\n\r\n")
        except httptools.HttpParserError:
            return False
        return target.url == url

    def outcome(split: Callable[[bytes], tuple[bytes, bytes]], url: bytes) -> object:
        try:
            return split(url)
        except httptools.HttpParserInvalidURLError:
            return "invalid"

    def theirs(url: bytes) -> tuple[bytes, bytes]:
        parsed = httptools.parse_url(url)
        return parsed.path, parsed.query or b""

    rng = random.Random(2026)
    common = b"/?=&%#:@+-._~az09AZ" * 4
    plain = compared = 0
    for _ in range(30_000):
        pool = common if rng.random() < 0.7 else bytes(range(256))
        url = bytes(rng.choice(pool) for _ in range(rng.randrange(0, 24)))
        if rng.random() < 0.8:
            url = b"/" + url
        if not accepted(url):
            continue
        compared += 1
        assert outcome(request_target, url) == outcome(theirs, url), url
        plain += url[:1] == b"/" and b"#" not in url and url.isascii()
    assert compared > 15_000 and plain > 10_000
    token = b"/sse?channel=a&token=" + b"eyJ0eXAiOiJKV1Qi.x-y_z" * 20
    assert request_target(token) == (b"/sse", token[5:])


def test_a_streams_headers_are_checked_as_uvicorns_send_checks_them() -> None:
    """``valid_headers`` answers as uvicorn's ``send`` would (a name or value it refuses
    fails the whole list), and a list it passed once passes again from what it remembers;
    a refused header is never remembered."""
    from uvicorn.protocols.http.httptools_impl import HEADER_RE, HEADER_VALUE_RE

    from gateway.server.response_head import _VALID_HEADERS, valid_headers

    def uvicorns(headers: list[tuple[bytes, bytes]]) -> bool:
        return not any(HEADER_RE.search(n) or HEADER_VALUE_RE.search(v) for n, v in headers)

    good = [(b"content-type", b"text/event-stream"), (b"x-origin", b"https://a.example")]
    bad_values = [b"a\r\nset-cookie: x", b"a\nb", b"a\x00b", b"a\x7fb"]
    bad = [[*good, (b"x-origin", value)] for value in bad_values]
    bad += [[(b"bad name", b"v")], [(b"na:me", b"v")], [(b"x\r\n", b"v")]]
    for headers in [good, *bad, good]:
        assert valid_headers(headers) is uvicorns(headers), headers
    assert _VALID_HEADERS.issuperset(good)
    assert not any(_VALID_HEADERS.issuperset(headers) for headers in bad)


def test_a_front_door_streams_head_is_the_one_uvicorn_writes_and_is_remembered_per_second() -> None:
    """``stream_start`` + ``chunk`` write the bytes ``stream_head`` writes (uvicorn's
    ``send``, tested above) for every opening size; the head is made once per header
    list while uvicorn's default headers are the same list, made again when the server
    makes a new one (its date, once a second), and a list with a header uvicorn refuses
    gets None, then and later."""
    from gateway.server.response_head import _HEADS, stream_head, stream_start
    from gateway.wire import frame_chunk

    defaults = [(b"date", b"Sat, 05 Dec 2026 17:00:00 GMT"), (b"server", b"uvicorn")]
    headers = [(b"Content-Type", b"text/event-stream"), (b"cache-control", b"no-cache")]
    for size in [0, 1, 15, 16, 1023, 1024, 1025, 70_000]:
        opening = b"r" * size
        head = stream_start(defaults, headers)
        assert head is not None
        assert head + frame_chunk(opening) == stream_head([*defaults, *headers], True, opening)
    assert stream_start(defaults, list(headers)) is stream_start(defaults, headers)
    assert len(_HEADS.get(defaults)) == 1

    later = [(b"date", b"Sat, 05 Dec 2026 17:00:01 GMT"), (b"server", b"uvicorn")]
    again = stream_start(later, headers)
    assert again is not None and b"17:00:01" in again and b"17:00:00" not in again
    assert len(_HEADS.get(later)) == 1  # the last second's heads are gone

    refused = [*headers, (b"x-origin", b"a\r\nset-cookie: x")]
    assert stream_start(later, refused) is None
    assert stream_start(later, refused) is None
    assert tuple(refused) not in _HEADS.get(later)
