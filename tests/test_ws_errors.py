"""Bad input on the WebSocket: exact error replies and close codes, and no harm to others."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import string
import time
from typing import Any

import jwt
import pytest
from websockets.exceptions import ConnectionClosed

from auth.tokens import make_token
from tests.conftest import SECRET, RunningServer, eventually, token
from tests.helpers import (
    WsClient,
    api_client,
    api_publish,
    bearer,
    dumps,
    is_publication,
    open_sse,
    sse_request,
    ws_client,
)

OTHER_SECRET = "another-secret-0123456789abcdef0123456789abcdef"


def assert_error(
    reply: dict[str, Any], code: str, cmd_id: Any = None, *, has_id: bool = True
) -> None:
    """``reply`` is exactly an error reply with ``code`` (and ``id`` when ``has_id``)."""
    assert isinstance(reply.get("error"), dict), reply
    message = reply["error"].get("message")
    assert isinstance(message, str), reply
    expected: dict[str, Any] = {"ok": False, "error": {"code": code, "message": message}}
    if has_id:
        expected["id"] = cmd_id
    assert reply == expected


# --------------------------------------------------------------------------- bad frames

NOT_AN_OBJECT = {
    "malformed_json": "{not json",
    "truncated_json": '{"id": 1, "op": "ping"',
    "trailing_garbage": '{"id": 1, "op": "ping"} x',
    "json_array": '[{"id": 1, "op": "ping"}]',
    "json_string": '"ping"',
    "json_number": "42",
    "json_null": "null",
    "json_true": "true",
    "empty_text": "",
}


@pytest.mark.parametrize("frame", list(NOT_AN_OBJECT.values()), ids=list(NOT_AN_OBJECT))
async def test_frame_that_is_not_a_json_object_gets_bad_request_without_id(server, frame):
    async with ws_client(server) as c:
        await c.send_raw(frame)
        assert_error(await c.recv(), "bad_request", has_id=False)
        await c.ping_ok()


WRONG_SHAPE = {
    "missing_op": {"id": 1, "channel": "x"},
    "unknown_op": {"id": 2, "op": "explode"},
    "op_not_string": {"id": 3, "op": 7},
    "op_null": {"id": 4, "op": None},
    "subscribe_channel_not_string": {"id": 5, "op": "subscribe", "channel": 5},
    "subscribe_channel_missing": {"id": 6, "op": "subscribe"},
    "subscribe_channel_list": {"id": 7, "op": "subscribe", "channel": ["x"]},
    "since_not_object": {"id": 8, "op": "subscribe", "channel": "x", "since": 5},
    "since_string": {"id": 9, "op": "subscribe", "channel": "x", "since": "41:e1"},
    "since_offset_not_int": {
        "id": 10,
        "op": "subscribe",
        "channel": "x",
        "since": {"offset": "41", "epoch": "e1"},
    },
    "since_epoch_not_string": {
        "id": 11,
        "op": "subscribe",
        "channel": "x",
        "since": {"offset": 41, "epoch": 1},
    },
    "since_missing_epoch": {"id": 12, "op": "subscribe", "channel": "x", "since": {"offset": 41}},
    "history_limit_string": {"id": 13, "op": "history", "channel": "x", "limit": "10"},
    "history_limit_float": {"id": 14, "op": "history", "channel": "x", "limit": 2.5},
    "history_limit_object": {"id": 15, "op": "history", "channel": "x", "limit": {}},
    "history_channel_not_string": {"id": 16, "op": "history", "channel": 1, "limit": 1},
    "publish_channel_not_string": {"id": 17, "op": "publish", "channel": {"a": 1}, "data": 1},
    "publish_without_data": {"id": 18, "op": "publish", "channel": "x"},
    "presence_channel_null": {"id": 19, "op": "presence", "channel": None},
    "unsubscribe_channel_number": {"id": 20, "op": "unsubscribe", "channel": 3},
    "refresh_without_token": {"id": 21, "op": "refresh"},
    "refresh_token_not_string": {"id": 22, "op": "refresh", "token": 5},
    "string_id_unknown_op": {"id": "abc", "op": "explode"},
}


@pytest.mark.parametrize("command", list(WRONG_SHAPE.values()), ids=list(WRONG_SHAPE))
async def test_command_of_wrong_shape_gets_bad_request_with_its_id(server, command):
    async with ws_client(server) as c:
        await c.send(command)
        assert_error(await c.recv(), "bad_request", command["id"])
        await c.ping_ok()


@pytest.mark.parametrize("op", ["publish", "rpc"])
async def test_data_nested_deeper_than_json_is_written_back_gets_bad_request(server, op):
    """orjson reads 1,024 levels of nesting and writes 254: data between the two is a
    ``bad_request`` reply (it was a 1011 close), and nothing is published."""
    deep = "[" * 300 + "]" * 300
    async with ws_client(server) as c:
        await c.subscribe("deep")
        raw = f'{{"id": 30, "op": "{op}", "channel": "deep", "method": "m", "data": {deep}}}'
        await c.send_raw(raw)
        reply = await c.recv()
        assert_error(reply, "bad_request", 30)
        assert "nested too deeply" in reply["error"]["message"]
        await c.ping_ok()
        assert (await c.call("history", channel="deep"))["result"]["publications"] == []


BAD_IDS = {"list": [1], "object": {"a": 1}, "float": 1.5, "bool": True}


@pytest.mark.parametrize("bad_id", list(BAD_IDS.values()), ids=list(BAD_IDS))
async def test_command_with_id_of_bad_type_gets_bad_request(server, bad_id):
    async with ws_client(server) as c:
        await c.send({"id": bad_id, "op": "ping"})
        reply = await c.recv()
        # The contract only allows int or string ids; such an id may be left out of the reply.
        assert_error(reply, "bad_request", bad_id, has_id="id" in reply)
        await c.ping_ok()


async def test_binary_frame_gets_bad_request(server):
    async with ws_client(server) as c:
        await c.send_raw(dumps({"id": 1, "op": "ping"}).encode())
        reply = await c.recv()
        assert_error(reply, "bad_request", 1, has_id="id" in reply)
        await c.ping_ok()


INVALID_NAMES = {
    "too_long": "a" * 129,
    "space": "a b",
    "slash": "a/b",
    "empty": "",
    "non_ascii": "é",
    "star": "chat:*",
    "newline": "a\nb",
    "trailing_newline": "abc\n",
    "hash": "a#b",
}

CHANNEL_OPS = {
    "subscribe": {},
    "publish": {"data": 1},
    "history": {"limit": 1},
    "presence": {},
    "unsubscribe": {},
}


@pytest.mark.parametrize("op", list(CHANNEL_OPS))
async def test_invalid_channel_name_is_bad_request_with_id_and_does_not_count_as_bad_frame(
    server, op
):
    async with ws_client(server) as c:
        # More invalid names than max_bad_frames (3): none of them closes the connection.
        for i, name in enumerate(INVALID_NAMES.values()):
            await c.send({"id": i, "op": op, "channel": name, **CHANNEL_OPS[op]})
            assert_error(await c.recv(), "bad_request", i)
        await c.ping_ok()


# The contract's ^...$ means the whole string (Python's $ would also accept a final "\n").
CONTRACT_CHANNEL_RE = re.compile(r"[A-Za-z0-9_.:@-]{1,128}")
ALLOWED = string.ascii_letters + string.digits + "_.:@-"
DISALLOWED = "/ é*#?%\t~,😀\x00\n\"'\\[]{}+=!$&()"


def _random_names(count: int, seed: int = 20240601) -> list[str]:
    rnd = random.Random(seed)
    names = []
    for i in range(count):
        length = rnd.choice([0, 1, 2, 5, 20, 127, 128, 129, 130, rnd.randint(1, 140)])
        chars = [rnd.choice(ALLOWED) for _ in range(length)]
        if i % 2 and length:  # half of them get one character the contract does not allow
            chars[rnd.randrange(length)] = rnd.choice(DISALLOWED)
        names.append("".join(chars))
    return names


async def test_channel_name_validation_matches_the_contract_pattern_exactly(server):
    names = _random_names(300)
    assert any(CONTRACT_CHANNEL_RE.fullmatch(n) for n in names)
    assert any(not CONTRACT_CHANNEL_RE.fullmatch(n) for n in names)
    async with ws_client(server) as c:
        for i, name in enumerate(names):
            await c.send({"id": i, "op": "history", "channel": name, "limit": 1})
        for i, name in enumerate(names):
            reply = await c.reply(i)
            if CONTRACT_CHANNEL_RE.fullmatch(name):
                assert reply["ok"] is True, (name, reply)
            else:
                assert_error(reply, "bad_request", i)
        await c.ping_ok()


async def test_longest_valid_channel_name_and_every_allowed_character_work(server):
    async with ws_client(server) as c:
        for name in ["a" * 128, "AZaz09_.:@-", "x", "user@example.com:room-1_a.b"]:
            result = await c.subscribe(name)
            pub = await c.publish(name, name)
            assert pub == {"offset": 1, "epoch": result["epoch"]}

            def on_name(f: dict[str, Any], n: str = name) -> bool:
                return is_publication(f, n)

            assert await c.wait_for(on_name) == {
                "channel": name,
                "offset": 1,
                "epoch": result["epoch"],
                "data": name,
            }


async def test_bad_frames_get_replies_until_the_third_closes_4002_bad_request(server):
    async with ws_client(server) as c:
        await c.send({"id": 1, "channel": "x"})  # missing op
        assert_error(await c.recv(), "bad_request", 1)
        await c.send_raw("{oops")
        assert_error(await c.recv(), "bad_request", has_id=False)
        await c.send({"id": 3, "op": "bogus"})
        code, reason, frames = await c.expect_close()
        assert (code, reason) == (4002, "bad request")
        # The closing frame may or may not get its own reply first; nothing else comes.
        assert len(frames) <= 1
        for frame in frames:
            assert_error(frame, "bad_request", 3)


async def test_bad_frame_count_is_per_connection_and_not_reset_by_good_frames(make_server):
    server = await make_server(max_bad_frames=5)
    async with ws_client(server) as c, ws_client(server) as other:
        for i in range(4):
            await c.send({"id": i, "op": "nope"})
            assert_error(await c.recv(), "bad_request", i)
            await c.ping_ok()
            # Another connection's bad frames do not add up with these.
            await other.send_raw("[]")
            assert_error(await other.recv(), "bad_request", has_id=False)
            await other.send({"id": 1, "op": "ping"})
            assert await other.recv() == {"id": 1, "ok": True, "result": {}}
        await c.send_raw(b"\x00")
        code, reason, _ = await c.expect_close()
        assert (code, reason) == (4002, "bad request")


async def test_max_bad_frames_one_closes_on_the_first_bad_frame(make_server):
    server = await make_server(max_bad_frames=1)
    async with ws_client(server) as c:
        await c.ping_ok()
        await c.send_raw("nope")
        code, reason, _ = await c.expect_close()
        assert (code, reason) == (4002, "bad request")


async def test_invalid_channels_and_forbidden_commands_do_not_count_toward_bad_frames(server):
    async with ws_client(server, token("u", subscribe=["chat:*"], publish=[])) as c:
        for i in range(4):
            await c.send({"id": i, "op": "subscribe", "channel": "a b"})
            assert_error(await c.recv(), "bad_request", i)
            await c.send({"id": i, "op": "publish", "channel": "chat:x", "data": 1})
            assert_error(await c.recv(), "forbidden", i)
        await c.send({"id": 10, "op": "nope"})
        assert_error(await c.recv(), "bad_request", 10)
        await c.send({"id": 11, "op": "nope"})
        assert_error(await c.recv(), "bad_request", 11)
        await c.ping_ok()
        await c.send({"id": 12, "op": "nope"})
        code, reason, _ = await c.expect_close()
        assert (code, reason) == (4002, "bad request")


# --------------------------------------------------------------------------- size


async def test_frame_over_max_message_bytes_closes_1009_message_too_big(make_server):
    server = await make_server(max_message_bytes=1024)
    async with ws_client(server) as c:
        # Just under the limit is fine.
        small = dumps({"id": 1, "op": "publish", "channel": "x", "data": "a" * 900})
        assert len(small.encode()) <= 1024
        await c.send_raw(small)
        assert (await c.reply(1))["ok"] is True
        big = dumps({"id": 2, "op": "publish", "channel": "x", "data": "a" * 2000})
        await c.send_raw(big)
        code, reason, frames = await c.expect_close()
        assert (code, reason) == (1009, "message too big")
        assert [f for f in frames if isinstance(f, dict) and f.get("id") == 2 and f.get("ok")] == []
    async with api_client(server) as http:
        r = await http.get(
            "/api/channels/x/history", headers={"Authorization": f"Bearer {token()}"}
        )
        assert [p["offset"] for p in r.json()["publications"]] == [1]


async def test_frame_far_over_default_limit_closes_1009_message_too_big(server):
    async with ws_client(server) as c:
        await c.send_raw(dumps({"id": 1, "op": "publish", "channel": "x", "data": "a" * 70_000}))
        code, reason, _ = await c.expect_close()
        assert (code, reason) == (1009, "message too big")


async def test_frame_several_times_the_limit_closes_1009_message_too_big(make_server):
    server = await make_server(max_message_bytes=1024)
    async with ws_client(server) as c:
        await c.send_raw(dumps({"id": 1, "op": "publish", "channel": "x", "data": "a" * 20_000}))
        code, reason, _ = await c.expect_close()
        assert (code, reason) == (1009, "message too big")


async def test_binary_frame_over_max_message_bytes_closes_1009(make_server):
    server = await make_server(max_message_bytes=1024)
    async with ws_client(server) as c:
        await c.send_raw(b"x" * 5000)
        code, reason, _ = await c.expect_close()
        assert (code, reason) == (1009, "message too big")


# --------------------------------------------------------------------------- permissions


async def test_subscribe_without_subscribe_claim_is_forbidden(server):
    async with ws_client(server, token("u", subscribe=[])) as c:
        await c.send({"id": 1, "op": "subscribe", "channel": "news"})
        assert_error(await c.recv(), "forbidden", 1)
        await c.ping_ok()


async def test_subscribe_to_channel_not_matching_patterns_is_forbidden(server):
    async with ws_client(server, token("u", subscribe=["chat:*", "prices"])) as c:
        for i, ch in enumerate(["news", "chatroom", "prices2", "xprices", "chat"]):
            await c.send({"id": i, "op": "subscribe", "channel": ch})
            assert_error(await c.recv(), "forbidden", i)
        for ch in ["chat:lobby", "chat:a:b", "prices"]:
            assert (await c.call("subscribe", channel=ch))["ok"] is True


async def test_publish_without_publish_claim_is_forbidden_and_not_delivered(server):
    async with ws_client(server) as watcher, ws_client(server, token("u", publish=[])) as c:
        await watcher.subscribe("news")
        await c.send({"id": 1, "op": "publish", "channel": "news", "data": "nope"})
        assert_error(await c.recv(), "forbidden", 1)
        async with api_client(server) as http:
            ok = await api_publish(http, "news", "allowed")
        assert ok["offset"] == 1  # the forbidden one took no offset
        assert await watcher.recv() == {
            "channel": "news",
            "offset": 1,
            "epoch": ok["epoch"],
            "data": "allowed",
        }


async def test_publish_to_channel_not_matching_patterns_is_forbidden(server):
    async with ws_client(server, token("u", publish=["chat:*"])) as c:
        await c.send({"id": 1, "op": "publish", "channel": "news", "data": 1})
        assert_error(await c.recv(), "forbidden", 1)
        assert (await c.call("publish", channel="chat:x", data=1))["ok"] is True


async def test_history_and_presence_need_the_subscribe_claim(server):
    async with ws_client(server, token("u", subscribe=["allowed:*"])) as c:
        await c.send({"id": 1, "op": "history", "channel": "news", "limit": 5})
        assert_error(await c.recv(), "forbidden", 1)
        await c.send({"id": 2, "op": "presence", "channel": "chat:lobby"})
        assert_error(await c.recv(), "forbidden", 2)
        assert (await c.call("history", channel="allowed:x", limit=5))["ok"] is True


async def test_token_without_any_claims_may_do_nothing_but_ping(server):
    bare = make_token(SECRET, "bare")
    assert "subscribe" not in jwt.decode(bare, options={"verify_signature": False})
    async with ws_client(server, bare) as c:
        cmds: list[dict[str, Any]] = [
            {"op": "subscribe", "channel": "news"},
            {"op": "publish", "channel": "news", "data": 1},
            {"op": "history", "channel": "news", "limit": 1},
            {"op": "presence", "channel": "chat:x"},
        ]
        for i, cmd in enumerate(cmds):
            await c.send({"id": i, **cmd})
            assert_error(await c.recv(), "forbidden", i)
        await c.ping_ok()


# --------------------------------------------------------------------------- authentication


def _no_sub_token() -> str:
    return jwt.encode(
        {"exp": int(time.time()) + 600, "subscribe": ["*"]}, SECRET, algorithm="HS256"
    )


def _alg_none_token() -> str:
    # PyJWT's "none" algorithm takes "" for its absent key, as it does None.
    return jwt.encode({"sub": "eve", "exp": int(time.time()) + 600}, "", algorithm="none")


BAD_TOKENS = {
    "missing": None,
    "empty": "",
    "garbage": "garbage",
    "three_garbage_parts": "aaa.bbb.ccc",
    "other_secret": "OTHER",
    "no_sub": "NOSUB",
    "alg_none": "NONE",
}


def _bad_token(kind: str) -> str | None:
    value = BAD_TOKENS[kind]
    if value == "OTHER":
        return token("eve", secret=OTHER_SECRET)
    if value == "NOSUB":
        return _no_sub_token()
    if value == "NONE":
        return _alg_none_token()
    return value


@pytest.mark.parametrize("kind", list(BAD_TOKENS))
async def test_bad_or_missing_token_is_accepted_then_closed_4001_unauthorized(server, kind):
    tok = _bad_token(kind)
    url = f"{server.ws_url}/ws" if tok is None else f"{server.ws_url}/ws?token={tok}"
    async with ws_client(server, url=url) as c:
        code, reason, frames = await c.expect_close()
    assert (code, reason) == (4001, "unauthorized")
    assert frames == []


async def test_expired_token_is_accepted_then_closed_4001_token_expired(server):
    async with ws_client(server, token("alice", ttl=-60)) as c:
        code, reason, frames = await c.expect_close()
    assert (code, reason) == (4001, "token expired")
    assert frames == []


async def test_unauthorized_connection_executes_no_commands(server):
    async with api_client(server) as http:
        url = f"{server.ws_url}/ws?token=garbage"
        async with ws_client(server, url=url) as c:
            with contextlib.suppress(ConnectionClosed):
                await c.send({"id": 1, "op": "publish", "channel": "news", "data": "sneaky"})
            code, reason, frames = await c.expect_close()
        assert (code, reason) == (4001, "unauthorized")
        assert frames == []
        r = await http.get(
            "/api/channels/news/history", headers={"Authorization": f"Bearer {token()}"}
        )
        assert r.json()["offset"] == 0


async def test_authorization_bearer_header_works_instead_of_query_parameter(server):
    url = f"{server.ws_url}/ws"
    headers = {"Authorization": f"Bearer {token('header-user')}"}
    async with ws_client(server, url=url, additional_headers=headers) as c:
        await c.ping_ok()
        await c.subscribe("chat:hdr")
        join = await c.presence_push("chat:hdr", "join")
        assert join["client"]["user"] == "header-user"


async def test_bad_bearer_header_is_closed_4001_unauthorized(server):
    url = f"{server.ws_url}/ws"
    async with ws_client(
        server, url=url, additional_headers={"Authorization": "Bearer garbage"}
    ) as c:
        code, reason, _ = await c.expect_close()
    assert (code, reason) == (4001, "unauthorized")


# --------------------------------------------------------------------------- origin


async def test_origin_not_allowed_is_closed_1008(make_server):
    server = await make_server(allowed_origins="https://good.example")
    async with ws_client(server, origin="https://evil.example") as c:
        code, reason, frames = await c.expect_close()
    assert (code, reason) == (1008, "origin not allowed")
    assert frames == []


async def test_allowed_origin_and_no_origin_are_accepted(make_server):
    server = await make_server(allowed_origins="https://good.example, https://other.example")
    async with (
        ws_client(server, origin="https://good.example") as a,
        ws_client(server, origin="https://other.example") as b,
        ws_client(server) as c,
    ):
        for client in (a, b, c):
            await client.ping_ok()
    async with ws_client(server, origin="https://good.example.evil.example") as d:
        code, reason, _ = await d.expect_close()
        assert (code, reason) == (1008, "origin not allowed")


async def test_default_allowed_origins_accepts_any_origin(server):
    async with ws_client(server, origin="https://anything.example") as c:
        await c.ping_ok()


# --------------------------------------------------------------------------- connection limit


async def test_max_connections_reached_closes_1013_try_again_later(make_server):
    server = await make_server(max_connections=2)
    async with ws_client(server) as a, ws_client(server) as b:
        await a.ping_ok()
        await b.ping_ok()
        async with ws_client(server) as c:
            code, reason, frames = await c.expect_close()
        assert (code, reason) == (1013, "try again later")
        assert frames == []
        await a.ping_ok()
        await b.ping_ok()

    # Once connections close there is room again.
    async def accepted() -> bool:
        async with ws_client(server) as d:
            try:
                await d.ping_ok()
                return True
            except ConnectionClosed:
                return False

    deadline = time.monotonic() + 5
    while not await accepted():
        assert time.monotonic() < deadline, "no room after connections closed"
        await asyncio.sleep(0.05)


# --------------------------------------------------------------------------- others unaffected


async def _bad_malformed(server: RunningServer, bad: WsClient) -> bool:
    await bad.send_raw("{oops")
    await bad.send_raw("[1, 2]")
    return False


async def _bad_binary(server: RunningServer, bad: WsClient) -> bool:
    await bad.send_raw(b"\x00\xff\x10")
    return False


async def _bad_wrong_types(server: RunningServer, bad: WsClient) -> bool:
    await bad.send({"id": "bad-1", "op": "subscribe", "channel": 5})
    await bad.send({"id": "bad-2", "op": "history", "channel": "shared", "limit": "x"})
    return False


async def _bad_until_closed(server: RunningServer, bad: WsClient) -> bool:
    for frame in ("nope", "[]", '"x"'):
        await bad.send_raw(frame)
    code, reason, _ = await bad.expect_close()
    assert (code, reason) == (4002, "bad request")
    return True


async def _bad_oversize(server: RunningServer, bad: WsClient) -> bool:
    await bad.send_raw(dumps({"id": 1, "op": "publish", "channel": "shared", "data": "z" * 5000}))
    code, _, _ = await bad.expect_close()
    assert code == 1009  # the reason is checked in the tests above
    return True


async def _bad_invalid_channel(server: RunningServer, bad: WsClient) -> bool:
    for name in ("a b", "", "x" * 129):
        await bad.send({"id": "bad", "op": "publish", "channel": name, "data": "corrupt"})
    return False


async def _bad_forbidden(server: RunningServer, bad: WsClient) -> bool:
    async with ws_client(server, token("mallory", publish=[], subscribe=[])) as m:
        await m.send({"id": 1, "op": "publish", "channel": "shared", "data": "forged"})
        assert_error(await m.recv(), "forbidden", 1)
        await m.send({"id": 2, "op": "subscribe", "channel": "shared"})
        assert_error(await m.recv(), "forbidden", 2)
    return False


async def _bad_action_token(server: RunningServer, bad: WsClient) -> bool:
    async with ws_client(server, "garbage") as m:
        with contextlib.suppress(ConnectionClosed):
            await m.send({"id": 1, "op": "publish", "channel": "shared", "data": "forged"})
        code, _, _ = await m.expect_close()
        assert code == 4001
    return False


async def _bad_abrupt_disconnect(server: RunningServer, bad: WsClient) -> bool:
    bad.conn.transport.abort()
    return True


BAD_ACTIONS = {
    "malformed_json": _bad_malformed,
    "binary_frame": _bad_binary,
    "wrong_types": _bad_wrong_types,
    "bad_frames_until_4002": _bad_until_closed,
    "oversize_1009": _bad_oversize,
    "invalid_channel": _bad_invalid_channel,
    "forbidden": _bad_forbidden,
    "bad_token": _bad_action_token,
    "abrupt_disconnect": _bad_abrupt_disconnect,
}


@pytest.mark.parametrize("action", list(BAD_ACTIONS.values()), ids=list(BAD_ACTIONS))
async def test_bad_input_from_one_client_loses_nothing_for_others(make_server, action):
    server = await make_server(max_message_bytes=1024)
    count = 120
    async with (
        api_client(server) as http,
        ws_client(server) as s1,
        ws_client(server) as s2,
        ws_client(server) as bad,
    ):
        for c in (s1, s2, bad):
            await c.subscribe("shared")

        async def publish(start: int, stop: int) -> None:
            for i in range(start, stop):
                await api_publish(http, "shared", {"i": i, "pad": "p" * (i % 50)})

        await publish(0, count // 2)
        closed, _ = await asyncio.gather(action(server, bad), publish(count // 2, count))
        expected = [{"i": i, "pad": "p" * (i % 50)} for i in range(count)]
        for s in (s1, s2):
            got = await s.publications("shared", count, timeout=10)
            assert [f["offset"] for f in got] == list(range(1, count + 1))
            assert [f["data"] for f in got] == expected
            await s.ping_ok()
        if not closed:
            # The misbehaving client itself still gets everything, untouched.
            got = await bad.publications("shared", count, timeout=10)
            assert [f["data"] for f in got] == expected
            await bad.ping_ok()
        history = await http.get(
            "/api/channels/shared/history",
            params={"limit": 1000},
            headers={"Authorization": f"Bearer {token()}"},
        )
        assert [p["data"] for p in history.json()["publications"]] == expected[-100:]
    if closed:
        await eventually(lambda: len(server.gateway.hub.sessions) == 0)


async def test_closed_bad_client_is_removed_from_the_hub(server):
    async with ws_client(server) as keep:
        await keep.subscribe("shared")
        async with ws_client(server) as bad:
            await bad.subscribe("shared")
            await eventually(lambda: len(server.gateway.hub.sessions) == 2)
            for frame in ("nope", "[]", "1"):
                await bad.send_raw(frame)
            code, _, _ = await bad.expect_close()
            assert code == 4002
        await eventually(lambda: len(server.gateway.hub.sessions) == 1)
        await keep.ping_ok()


# --------------------------------------------------------------------------- logs


CLIENT_SIDE_LOGGERS = ("httpx", "httpcore", "websockets.client", "hpack", "asyncio")


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith(CLIENT_SIDE_LOGGERS):
            return  # this test's own HTTP and WebSocket clients, not the gateway
        try:
            text = record.getMessage()
        except Exception:
            text = f"{record.msg} {record.args}"
        if record.exc_info:
            text += "\n" + logging.Formatter().formatException(record.exc_info)
        self.lines.append(f"{record.name}: {text}")


@pytest.mark.parametrize("log_level", ["info", "debug"])
async def test_token_never_appears_in_any_log_line(make_server, log_level):
    server = await make_server(log_level=log_level)
    capture = _Capture()
    # Whatever the gateway logs at its configured level, wherever it goes.
    loggers = [logging.getLogger()] + [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    for lg in loggers:
        lg.addHandler(capture)
    good = token("logged-user")
    wrong_secret = token("eve", secret=OTHER_SECRET)
    expired = token("old", ttl=-60)
    try:
        async with ws_client(server, good) as c:
            await c.subscribe("chat:log")
            await c.send_raw("{bad")
            await c.recv()
            await c.send({"id": 1, "op": "refresh", "token": wrong_secret})
            await c.reply(1)
            await c.send({"id": 2, "op": "refresh", "token": good})
            await c.reply(2)
        for tok in (wrong_secret, expired):
            async with ws_client(server, tok) as c:
                await c.expect_close()
        async with api_client(server) as http:
            async with open_sse(http, ["log"], good) as s:
                await s.event()
            for tok in (good, wrong_secret, expired):
                await http.post(
                    "/api/publish", json={"channel": "log", "data": 1}, headers=bearer(tok)
                )
                await sse_request(http, [("channel", "log"), ("token", tok)])
        await asyncio.sleep(0)  # records of tasks finishing right now
    finally:
        for lg in loggers:
            lg.removeHandler(capture)
    assert capture.lines, "nothing was logged at all"
    for tok in (good, wrong_secret, expired):
        signature = tok.rsplit(".", 1)[1]
        leaks = [line[:300] for line in capture.lines if signature in line]
        assert leaks == [], "a token appears in the logs"
