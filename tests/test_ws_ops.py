"""WebSocket commands and pushes, end to end, with the exact shapes of PROTOCOL.md."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import jwt

from tests.conftest import eventually, token
from tests.helpers import (
    TIMEOUT,
    WsClient,
    api_client,
    api_history,
    api_publish,
    bearer,
    is_presence,
    is_publication,
    poll,
    ws_client,
)


def entry(client_id: str, user: str, info: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"client": client_id, "user": user, "info": info or {}}


async def own_join(c: WsClient, channel: str, user: str) -> str:
    """The joiner's own join push; returns its client id."""
    push = await c.presence_push(channel, "join", user=user)
    client = push["client"]
    assert isinstance(client["client"], str) and client["client"]
    return client["client"]


# --------------------------------------------------------------------------- subscribe


async def test_subscribe_to_new_channel_replies_offset_zero_not_recovered(server):
    async with ws_client(server) as c:
        await c.send({"id": 1, "op": "subscribe", "channel": "prices"})
        reply = await c.recv()
        assert reply == {
            "id": 1,
            "ok": True,
            "result": {"offset": 0, "epoch": reply["result"]["epoch"], "recovered": False},
        }
        assert isinstance(reply["result"]["epoch"], str) and reply["result"]["epoch"]


async def test_subscribe_reply_reports_stream_top_and_epoch_of_existing_channel(server):
    async with api_client(server) as http:
        published = [await api_publish(http, "prices", {"n": n}) for n in range(3)]
    epoch = published[0]["epoch"]
    assert [p["offset"] for p in published] == [1, 2, 3]
    async with ws_client(server) as c:
        await c.send({"id": 7, "op": "subscribe", "channel": "prices"})
        assert await c.recv() == {
            "id": 7,
            "ok": True,
            "result": {"offset": 3, "epoch": epoch, "recovered": False},
        }
        # No history is replayed without `since`: the next frame is the next live one.
        async with api_client(server) as http:
            await api_publish(http, "prices", {"n": 3})
        assert await c.recv() == {
            "channel": "prices",
            "offset": 4,
            "epoch": epoch,
            "data": {"n": 3},
        }


async def test_subscribe_since_inside_history_recovers_missed_ones_in_order_before_live(server):
    async with api_client(server) as http, ws_client(server) as c:
        sub = await c.subscribe("prices")
        epoch = sub["epoch"]
        for n in range(1, 3):
            await api_publish(http, "prices", {"n": n})
        first = await c.publications("prices", 2)
        assert [p["offset"] for p in first] == [1, 2]
        position = {"offset": first[-1]["offset"], "epoch": first[-1]["epoch"]}

    async with api_client(server) as http:
        for n in range(3, 6):  # missed while disconnected
            await api_publish(http, "prices", {"n": n})
        async with ws_client(server) as c:
            await c.send({"id": 1, "op": "subscribe", "channel": "prices", "since": position})
            frames = [await c.recv() for _ in range(4)]
            assert frames == [
                {"id": 1, "ok": True, "result": {"offset": 5, "epoch": epoch, "recovered": True}},
                {"channel": "prices", "offset": 3, "epoch": epoch, "data": {"n": 3}},
                {"channel": "prices", "offset": 4, "epoch": epoch, "data": {"n": 4}},
                {"channel": "prices", "offset": 5, "epoch": epoch, "data": {"n": 5}},
            ]
            await api_publish(http, "prices", {"n": 6})
            assert await c.recv() == {
                "channel": "prices",
                "offset": 6,
                "epoch": epoch,
                "data": {"n": 6},
            }
            # Nothing was queued twice: a ping's reply is the very next frame.
            await c.send({"id": 2, "op": "ping"})
            assert await c.recv() == {"id": 2, "ok": True, "result": {}}


async def test_subscribe_since_offset_zero_recovers_everything_published_since(server):
    async with ws_client(server) as c:
        epoch = (await c.subscribe("fresh"))["epoch"]
    async with api_client(server) as http:
        for n in range(1, 4):
            await api_publish(http, "fresh", n)
    async with ws_client(server) as c:
        await c.send(
            {"id": 1, "op": "subscribe", "channel": "fresh", "since": {"offset": 0, "epoch": epoch}}
        )
        assert [await c.recv() for _ in range(4)] == [
            {"id": 1, "ok": True, "result": {"offset": 3, "epoch": epoch, "recovered": True}},
            {"channel": "fresh", "offset": 1, "epoch": epoch, "data": 1},
            {"channel": "fresh", "offset": 2, "epoch": epoch, "data": 2},
            {"channel": "fresh", "offset": 3, "epoch": epoch, "data": 3},
        ]


async def test_subscribe_since_current_top_is_recovered_with_nothing_to_replay(server):
    async with api_client(server) as http:
        top = None
        for n in range(3):
            top = await api_publish(http, "prices", n)
        assert top is not None
        async with ws_client(server) as c:
            await c.send({"id": "s", "op": "subscribe", "channel": "prices", "since": top})
            assert await c.recv() == {
                "id": "s",
                "ok": True,
                "result": {"offset": 3, "epoch": top["epoch"], "recovered": True},
            }
            await api_publish(http, "prices", "live")
            assert await c.recv() == {
                "channel": "prices",
                "offset": 4,
                "epoch": top["epoch"],
                "data": "live",
            }


async def test_subscribe_since_position_out_of_history_is_not_recovered_and_replays_nothing(
    make_server,
):
    server = await make_server(history_size=3)
    async with api_client(server) as http:
        results = [await api_publish(http, "prices", n) for n in range(1, 11)]
        epoch = results[0]["epoch"]
        async with ws_client(server) as c:
            await c.send(
                {
                    "id": 1,
                    "op": "subscribe",
                    "channel": "prices",
                    "since": {"offset": 1, "epoch": epoch},
                }
            )
            assert await c.recv() == {
                "id": 1,
                "ok": True,
                "result": {"offset": 10, "epoch": epoch, "recovered": False},
            }
            await api_publish(http, "prices", 11)
            # Not 2..10 (partly lost, so none), straight to live.
            assert await c.recv() == {"channel": "prices", "offset": 11, "epoch": epoch, "data": 11}


async def test_subscribe_since_wrong_epoch_is_not_recovered_and_replays_nothing(server):
    async with api_client(server) as http:
        first = await api_publish(http, "prices", 1)
        await api_publish(http, "prices", 2)
        epoch = first["epoch"]
        wrong = "not-" + epoch
        async with ws_client(server) as c:
            await c.send(
                {
                    "id": 1,
                    "op": "subscribe",
                    "channel": "prices",
                    "since": {"offset": 1, "epoch": wrong},
                }
            )
            assert await c.recv() == {
                "id": 1,
                "ok": True,
                "result": {"offset": 2, "epoch": epoch, "recovered": False},
            }
            await api_publish(http, "prices", 3)
            assert await c.recv() == {"channel": "prices", "offset": 3, "epoch": epoch, "data": 3}


async def test_subscribing_twice_to_a_channel_is_bad_request(server):
    async with ws_client(server) as c:
        await c.subscribe("prices")
        await c.send({"id": 2, "op": "subscribe", "channel": "prices"})
        reply = await c.recv()
        assert reply == {
            "id": 2,
            "ok": False,
            "error": {"code": "bad_request", "message": reply["error"]["message"]},
        }
        assert isinstance(reply["error"]["message"], str)
        await c.ping_ok()


async def test_subscription_limit_of_128_channels_gives_limit_exceeded(server):
    async with ws_client(server) as c:
        for i in range(128):
            await c.send({"id": i, "op": "subscribe", "channel": f"ch{i}"})
        replies = [await c.reply(i) for i in range(128)]
        assert all(r["ok"] is True for r in replies), [r for r in replies if not r["ok"]][:3]
        await c.send({"id": 999, "op": "subscribe", "channel": "one-too-many"})
        reply = await c.reply(999)
        assert reply == {
            "id": 999,
            "ok": False,
            "error": {"code": "limit_exceeded", "message": reply["error"]["message"]},
        }
        # Leaving one makes room again.
        assert (await c.call("unsubscribe", channel="ch0"))["ok"] is True
        assert (await c.call("subscribe", channel="one-too-many"))["ok"] is True


# --------------------------------------------------------------------------- unsubscribe


async def test_unsubscribe_replies_empty_result_and_stops_pushes(server):
    async with api_client(server) as http, ws_client(server) as c:
        await c.subscribe("prices")
        await c.subscribe("marker")
        await c.send({"id": 5, "op": "unsubscribe", "channel": "prices"})
        assert await c.recv() == {"id": 5, "ok": True, "result": {}}
        await api_publish(http, "prices", "after unsubscribe")
        marker = await api_publish(http, "marker", "m")
        # The marker, published later, arrives; nothing of "prices" came before it.
        assert await c.recv() == {
            "channel": "marker",
            "offset": 1,
            "epoch": marker["epoch"],
            "data": "m",
        }


async def test_unsubscribe_from_channel_not_subscribed_is_ok_with_empty_result(server):
    async with ws_client(server) as c:
        await c.send({"id": 1, "op": "unsubscribe", "channel": "never"})
        assert await c.recv() == {"id": 1, "ok": True, "result": {}}


async def test_resubscribe_after_unsubscribe_works(server):
    async with api_client(server) as http, ws_client(server) as c:
        await c.subscribe("prices")
        assert (await c.call("unsubscribe", channel="prices"))["ok"] is True
        result = await c.subscribe("prices")
        assert result["offset"] == 0
        pub = await api_publish(http, "prices", "x")
        assert await c.recv() == {
            "channel": "prices",
            "offset": 1,
            "epoch": pub["epoch"],
            "data": "x",
        }


# --------------------------------------------------------------------------- publish


async def test_publish_replies_offset_and_epoch_and_every_subscriber_gets_the_push(server):
    async with ws_client(server, token("alice")) as a, ws_client(server, token("bob")) as b:
        sa = await a.subscribe("news")
        await b.subscribe("news")
        await a.send({"id": 3, "op": "publish", "channel": "news", "data": {"text": "hi"}})
        reply = await a.reply(3)
        assert reply == {"id": 3, "ok": True, "result": {"offset": 1, "epoch": sa["epoch"]}}
        push = {"channel": "news", "offset": 1, "epoch": sa["epoch"], "data": {"text": "hi"}}
        assert await a.wait_for(lambda f: is_publication(f)) == push
        assert await b.recv() == push
        # The publisher got exactly the reply and the push, nothing else.
        await a.ping_ok()
        assert list(a.backlog) == []


async def test_publishing_over_the_clients_rate_is_refused_and_never_delivered(make_server):
    """``client_publish_rate`` per connection: a burst of that many, then ``rate_limited``
    replies whose data nobody receives; another client's bucket is its own, and the
    first client may publish again once its bucket refills."""
    server = await make_server(client_publish_rate=2)
    async with ws_client(server) as fast, ws_client(server) as other, ws_client(server) as sub:
        await sub.subscribe("rl")
        replies = [await fast.call("publish", channel="rl", data=i) for i in range(6)]
        codes = [r["error"]["code"] if not r["ok"] else "ok" for r in replies]
        assert codes[:2] == ["ok", "ok"] and "rate_limited" in codes[2:], codes
        assert all(r["ok"] or r["error"]["code"] == "rate_limited" for r in replies), replies
        sent = [i for i, r in enumerate(replies) if r["ok"]]
        assert (await other.publish("rl", "other"))["offset"] == len(sent) + 1
        got = await sub.publications("rl", len(sent) + 1)
        assert [p["data"] for p in got] == [*sent, "other"]  # no refused publish delivered

        async def allowed_again() -> bool:
            return bool((await fast.call("publish", channel="rl", data="later"))["ok"])

        await poll(allowed_again, timeout=5, interval=0.1)
        [later] = await sub.publications("rl", 1)
        assert later["data"] == "later"


async def test_publish_carries_any_json_value_unchanged(server):
    values: list[Any] = [
        None,
        True,
        0,
        -17,
        1.5,
        "text",
        "unicode é ü 😀 \u2028",
        [],
        [1, "two", {"three": 3}],
        {},
        {"nested": {"deep": [None, False, {"x": "y"}]}, "n": 12345678901234},
    ]
    async with ws_client(server) as pub, ws_client(server) as sub:
        epoch = (await sub.subscribe("types"))["epoch"]
        for value in values:
            await pub.publish("types", value)
        got = await sub.publications("types", len(values))
        assert got == [
            {"channel": "types", "offset": i + 1, "epoch": epoch, "data": v}
            for i, v in enumerate(values)
        ]


async def test_publisher_not_subscribed_gets_only_the_reply(server):
    async with ws_client(server) as pub:
        await pub.subscribe("marker")
        assert (await pub.publish("news", 1))["offset"] == 1
        async with api_client(server) as http:
            m = await api_publish(http, "marker", "m")
        assert await pub.recv() == {
            "channel": "marker",
            "offset": 1,
            "epoch": m["epoch"],
            "data": "m",
        }


async def test_command_without_id_executes_and_reply_has_no_id(server):
    async with ws_client(server) as c:
        await c.send({"op": "ping"})
        assert await c.recv() == {"ok": True, "result": {}}
        epoch = (await c.subscribe("noid"))["epoch"]
        await c.send({"op": "publish", "channel": "noid", "data": 1})
        frames = [await c.recv(), await c.recv()]
        reply = {"ok": True, "result": {"offset": 1, "epoch": epoch}}
        push = {"channel": "noid", "offset": 1, "epoch": epoch, "data": 1}
        assert sorted(frames, key=lambda f: "ok" in f) == [push, reply]


async def test_string_and_int_ids_are_echoed(server):
    async with ws_client(server) as c:
        for cmd_id in ["abc", "", 0, 42, 2**40]:
            await c.send({"id": cmd_id, "op": "ping"})
            assert await c.recv() == {"id": cmd_id, "ok": True, "result": {}}


# --------------------------------------------------------------------------- presence


async def test_joiner_gets_its_subscribe_reply_then_its_own_join(server):
    tok = token("alice", info={"name": "Alice", "color": "red"})
    async with ws_client(server, tok) as c:
        await c.send({"id": 1, "op": "subscribe", "channel": "chat:lobby"})
        reply = await c.recv()
        assert reply == {
            "id": 1,
            "ok": True,
            "result": {"offset": 0, "epoch": reply["result"]["epoch"], "recovered": False},
        }
        join = await c.recv()
        assert join == {
            "channel": "chat:lobby",
            "event": "join",
            "client": {
                "client": join["client"]["client"],
                "user": "alice",
                "info": {"name": "Alice", "color": "red"},
            },
        }
        assert isinstance(join["client"]["client"], str) and join["client"]["client"]


async def test_presence_lists_every_subscriber_with_user_and_token_info(server):
    async with (
        ws_client(server, token("alice", info={"name": "Alice"})) as a,
        ws_client(server, token("bob")) as b,
    ):
        await a.subscribe("chat:room")
        alice_id = await own_join(a, "chat:room", "alice")
        await b.subscribe("chat:room")
        bob_id = await own_join(b, "chat:room", "bob")
        assert alice_id != bob_id
        await a.send({"id": 4, "op": "presence", "channel": "chat:room"})
        reply = await a.reply(4)
        assert set(reply) == {"id", "ok", "result"} and reply["ok"] is True and reply["id"] == 4
        assert set(reply["result"]) == {"clients"}
        assert sorted(reply["result"]["clients"], key=lambda e: e["user"]) == [
            entry(alice_id, "alice", {"name": "Alice"}),
            entry(bob_id, "bob"),
        ]


async def test_presence_shows_two_connections_of_one_user_as_two_clients(server):
    async with ws_client(server, token("carol")) as a, ws_client(server, token("carol")) as b:
        await a.subscribe("chat:two")
        ida = await own_join(a, "chat:two", "carol")
        await b.subscribe("chat:two")
        idb = await own_join(b, "chat:two", "carol")
        reply = await b.call("presence", channel="chat:two")
        assert sorted(reply["result"]["clients"], key=lambda e: e["client"]) == sorted(
            [entry(ida, "carol"), entry(idb, "carol")], key=lambda e: e["client"]
        )


async def test_other_subscribers_get_join_and_leave_on_unsubscribe(server):
    async with (
        ws_client(server, token("alice")) as a,
        ws_client(server, token("bob", info={"k": 1})) as b,
    ):
        await a.subscribe("chat:lobby")
        await own_join(a, "chat:lobby", "alice")
        await b.subscribe("chat:lobby")
        bob_id = await own_join(b, "chat:lobby", "bob")
        bob = entry(bob_id, "bob", {"k": 1})
        assert await a.presence_push("chat:lobby", "join") == {
            "channel": "chat:lobby",
            "event": "join",
            "client": bob,
        }
        assert (await b.call("unsubscribe", channel="chat:lobby"))["ok"] is True
        assert await a.presence_push("chat:lobby", "leave") == {
            "channel": "chat:lobby",
            "event": "leave",
            "client": bob,
        }
        reply = await a.call("presence", channel="chat:lobby")
        assert [e["user"] for e in reply["result"]["clients"]] == ["alice"]


async def test_disconnecting_client_leaves_presence_with_a_leave_push(server):
    async with ws_client(server, token("alice")) as a:
        await a.subscribe("chat:lobby")
        await own_join(a, "chat:lobby", "alice")
        async with ws_client(server, token("bob")) as b:
            await b.subscribe("chat:lobby")
            bob_id = await own_join(b, "chat:lobby", "bob")
            await a.presence_push("chat:lobby", "join", user="bob")
        assert await a.presence_push("chat:lobby", "leave") == {
            "channel": "chat:lobby",
            "event": "leave",
            "client": entry(bob_id, "bob"),
        }
        reply = await a.call("presence", channel="chat:lobby")
        assert [e["user"] for e in reply["result"]["clients"]] == ["alice"]


async def test_non_presence_channel_has_no_join_leave_and_presence_op_is_not_found(server):
    async with api_client(server) as http, ws_client(server, token("alice")) as a:
        await a.subscribe("dashboard")
        async with ws_client(server, token("bob")) as b:
            await b.subscribe("dashboard")
            assert (await b.call("unsubscribe", channel="dashboard"))["ok"] is True
            await b.subscribe("dashboard")
        await a.send({"id": 9, "op": "presence", "channel": "dashboard"})
        reply = await a.reply(9)
        assert reply == {
            "id": 9,
            "ok": False,
            "error": {"code": "not_found", "message": reply["error"]["message"]},
        }
        m = await api_publish(http, "dashboard", "marker")
        frames: list[dict[str, Any]] = []
        while not frames or frames[-1] != {
            "channel": "dashboard",
            "offset": 1,
            "epoch": m["epoch"],
            "data": "marker",
        }:
            frames.append(await a.recv())
        assert [f for f in frames if "event" in f] == []


async def test_presence_channels_setting_chooses_which_channels_have_presence(make_server):
    server = await make_server(presence_channels="room:*,vip")
    async with ws_client(server, token("alice")) as a:
        for ch in ("room:1", "vip"):
            await a.subscribe(ch)
            await own_join(a, ch, "alice")
            assert (await a.call("presence", channel=ch))["ok"] is True
        await a.subscribe("chat:x")
        reply = await a.call("presence", channel="chat:x")
        assert reply["ok"] is False and reply["error"]["code"] == "not_found"
        assert [f for f in await a.silent(0.3) if is_presence(f, "chat:x")] == []


# --------------------------------------------------------------------------- history


async def test_history_returns_last_limit_publications_oldest_first_with_stream_position(server):
    async with api_client(server) as http, ws_client(server) as c:
        results = [await api_publish(http, "prices", {"n": n}) for n in range(1, 8)]
        epoch = results[0]["epoch"]
        await c.send({"id": 5, "op": "history", "channel": "prices", "limit": 3})
        assert await c.recv() == {
            "id": 5,
            "ok": True,
            "result": {
                "publications": [
                    {"offset": 5, "data": {"n": 5}},
                    {"offset": 6, "data": {"n": 6}},
                    {"offset": 7, "data": {"n": 7}},
                ],
                "offset": 7,
                "epoch": epoch,
            },
        }


async def test_history_is_bounded_by_history_size(make_server):
    server = await make_server(history_size=5)
    async with api_client(server) as http, ws_client(server) as c:
        results = [await api_publish(http, "prices", n) for n in range(1, 9)]
        reply = await c.call("history", channel="prices", limit=100)
        assert reply["result"] == {
            "publications": [{"offset": n, "data": n} for n in range(4, 9)],
            "offset": 8,
            "epoch": results[0]["epoch"],
        }


async def test_history_of_empty_channel_is_empty_at_offset_zero(server):
    async with ws_client(server) as c:
        reply = await c.call("history", channel="nothing-here", limit=10)
        assert reply == {
            "id": reply["id"],
            "ok": True,
            "result": {"publications": [], "offset": 0, "epoch": reply["result"]["epoch"]},
        }
        assert isinstance(reply["result"]["epoch"], str)


async def test_history_does_not_require_subscribing(server):
    async with ws_client(server) as pub, ws_client(server) as c:
        r = await pub.publish("prices", "a")
        reply = await c.call("history", channel="prices", limit=1)
        assert reply["result"] == {
            "publications": [{"offset": 1, "data": "a"}],
            "offset": 1,
            "epoch": r["epoch"],
        }


# --------------------------------------------------------------------------- ping, refresh


async def test_ping_replies_empty_result(server):
    async with ws_client(server) as c:
        await c.send({"id": 6, "op": "ping"})
        assert await c.recv() == {"id": 6, "ok": True, "result": {}}


async def test_refresh_with_valid_token_for_same_user_is_ok(server):
    async with ws_client(server, token("alice")) as c:
        await c.send({"id": 7, "op": "refresh", "token": token("alice", ttl=7200)})
        assert await c.recv() == {"id": 7, "ok": True, "result": {}}
        await c.ping_ok()


async def test_refresh_with_token_of_another_user_is_an_error_and_connection_stays_open(server):
    async with ws_client(server, token("alice")) as c:
        await c.send({"id": 7, "op": "refresh", "token": token("mallory")})
        reply = await c.recv()
        assert reply["id"] == 7 and reply["ok"] is False and set(reply) == {"id", "ok", "error"}
        assert reply["error"]["code"] in ("unauthorized", "forbidden"), reply
        await c.ping_ok()
        # Still alice: presence shows the original user.
        await c.subscribe("chat:who")
        assert (await c.presence_push("chat:who", "join"))["client"]["user"] == "alice"


async def test_refresh_with_invalid_token_is_unauthorized_and_connection_stays_open(server):
    async with ws_client(server, token("alice")) as c:
        for bad in [
            "garbage",
            token("alice", secret="another-secret-0123456789abcdef0123"),
            token("alice", ttl=-60),
        ]:
            await c.send({"id": 8, "op": "refresh", "token": bad})
            reply = await c.recv()
            assert reply == {
                "id": 8,
                "ok": False,
                "error": {"code": "unauthorized", "message": reply["error"]["message"]},
            }
        await c.ping_ok()


async def test_refresh_with_narrower_claims_applies_them_to_later_commands(server):
    async with ws_client(server, token("alice")) as c:
        assert (await c.call("refresh", token=token("alice", subscribe=["chat:*"], publish=[])))[
            "ok"
        ] is True
        denied = await c.call("subscribe", channel="prices")
        assert denied["ok"] is False and denied["error"]["code"] == "forbidden"
        assert (await c.call("subscribe", channel="chat:ok"))["ok"] is True
        denied = await c.call("publish", channel="chat:ok", data=1)
        assert denied["ok"] is False and denied["error"]["code"] == "forbidden"


# --------------------------------------------------------------------------- ordering


async def test_concurrent_publishers_each_subscriber_gets_every_offset_once_in_order(server):
    publishers, per_publisher, channel = 3, 300, "busy"
    total = publishers * per_publisher
    async with ws_client(server) as s1, ws_client(server) as s2, ws_client(server) as s3:
        subs = [s1, s2, s3]
        epochs = {(await s.subscribe(channel))["epoch"] for s in subs}
        assert len(epochs) == 1
        epoch = epochs.pop()

        async def publisher(p: int) -> dict[int, int]:
            async with ws_client(server, token(f"pub{p}")) as c:
                for i in range(per_publisher):
                    await c.send(
                        {"id": i, "op": "publish", "channel": channel, "data": {"p": p, "i": i}}
                    )
                offsets = {}
                for i in range(per_publisher):
                    reply = await c.reply(i, timeout=20)
                    assert reply["ok"] is True, reply
                    assert reply["result"]["epoch"] == epoch
                    offsets[i] = reply["result"]["offset"]
                return offsets

        async def reader(s: WsClient) -> list[dict[str, Any]]:
            return await s.publications(channel, total, timeout=30)

        published, read = await asyncio.gather(
            asyncio.gather(*(publisher(p) for p in range(publishers))),
            asyncio.gather(*(reader(s) for s in subs)),
        )
        replied = {(p, i): off for p, offsets in enumerate(published) for i, off in offsets.items()}
        assert sorted(replied.values()) == list(range(1, total + 1))
        for got in read:
            assert [f["offset"] for f in got] == list(range(1, total + 1))
            assert all(f["epoch"] == epoch and f["channel"] == channel for f in got)
            # Each push carries the data whose publish reply named that offset.
            assert {(f["data"]["p"], f["data"]["i"]): f["offset"] for f in got} == replied
        for s in subs:
            await s.ping_ok()
            assert [f for f in s.backlog if is_publication(f)] == []


async def test_offsets_and_epoch_agree_between_ws_replies_pushes_history_and_http_api(server):
    async with api_client(server) as http, ws_client(server) as pub, ws_client(server) as sub:
        sub_epoch = (await sub.subscribe("agree"))["epoch"]
        r1 = await pub.publish("agree", "ws")
        r2 = await api_publish(http, "agree", "http")
        r3 = await pub.publish("agree", "ws2")
        assert [r1["offset"], r2["offset"], r3["offset"]] == [1, 2, 3]
        assert r1["epoch"] == r2["epoch"] == r3["epoch"] == sub_epoch
        pushes = await sub.publications("agree", 3)
        assert pushes == [
            {"channel": "agree", "offset": 1, "epoch": sub_epoch, "data": "ws"},
            {"channel": "agree", "offset": 2, "epoch": sub_epoch, "data": "http"},
            {"channel": "agree", "offset": 3, "epoch": sub_epoch, "data": "ws2"},
        ]
        expected = {
            "publications": [
                {"offset": 1, "data": "ws"},
                {"offset": 2, "data": "http"},
                {"offset": 3, "data": "ws2"},
            ],
            "offset": 3,
            "epoch": sub_epoch,
        }
        assert (await sub.call("history", channel="agree", limit=10))["result"] == expected
        assert await api_history(http, "agree") == expected
        r = await http.get(
            "/api/channels/agree/history", params={"since_offset": 1}, headers=bearer()
        )
        assert r.status_code == 200
        assert r.json() == {**expected, "publications": expected["publications"][1:]}


# --------------------------------------------------------------------------- token expiry


async def test_connection_is_closed_4001_token_expired_when_token_expires(server):
    tok = token("alice", ttl=2)
    exp = jwt.decode(tok, options={"verify_signature": False})["exp"]
    async with ws_client(server, tok) as c:
        await c.ping_ok()
        await c.subscribe("prices")
        code, reason, frames = await c.expect_close(timeout=15)
        closed_at = time.time()
    assert (code, reason) == (4001, "token expired")
    assert closed_at >= exp - 1.0, "closed before the token expired"
    assert [f for f in frames if isinstance(f, dict) and "ok" in f] == []


async def test_refresh_before_expiry_keeps_connection_open_past_old_expiry(server):
    tok = token("alice", ttl=2)
    exp = jwt.decode(tok, options={"verify_signature": False})["exp"]
    async with ws_client(server, tok) as c:
        assert (await c.call("refresh", token=token("alice", ttl=3600))) == {
            "id": 1,
            "ok": True,
            "result": {},
        }
        # Past the old expiry plus the largest leeway the contract allows.
        deadline = exp + 5 + 1.5
        frames = await c.silent(max(0.0, deadline - time.time()))
        assert frames == []
        assert time.time() > exp + 5
        await c.ping_ok()


async def test_refresh_extends_expiry_of_a_connection_with_zero_leeway(make_server):
    server = await make_server(jwt_leeway=0)
    tok = token("alice", ttl=2)
    exp = jwt.decode(tok, options={"verify_signature": False})["exp"]
    async with ws_client(server, tok) as c:
        assert (await c.call("refresh", token=token("alice", ttl=3600)))["ok"] is True
        frames = await c.silent(max(0.0, exp + 1.5 - time.time()))
        assert frames == []
        await c.ping_ok()
    # Without refresh the same server does close at expiry.
    async with ws_client(server, token("bob", ttl=2)) as c:
        code, reason, _ = await c.expect_close(timeout=TIMEOUT + 3)
        assert (code, reason) == (4001, "token expired")


# ------------------------------------------------------------------ races with live traffic


async def _publish_paced(server: Any, channel: str, total: int) -> None:
    """Publish ``total`` messages one round trip at a time (so that other work interleaves)."""
    async with ws_client(server, token("pacer")) as pub:
        for i in range(1, total + 1):
            assert (await pub.publish(channel, i))["offset"] == i


async def test_reconnecting_with_since_during_live_publishing_gets_every_offset_exactly_once(
    make_server,
):
    server = await make_server(history_size=1000)
    total, channel = 400, "race"
    async with ws_client(server) as probe:
        epoch = (await probe.call("history", channel=channel, limit=1))["result"]["epoch"]
    publisher = asyncio.create_task(_publish_paced(server, channel, total))
    seen: list[int] = []
    position = {"offset": 0, "epoch": epoch}
    reconnects = 0
    try:
        while not seen or seen[-1] < total:
            async with ws_client(server) as c:
                result = await c.subscribe(channel, since=position)
                assert result["recovered"] is True, result
                assert result["epoch"] == epoch
                # Read a few (more when history says there is more), then drop the connection.
                want = min(total - position["offset"], 7 + reconnects % 23)
                for f in await c.publications(channel, want, timeout=10):
                    assert f["epoch"] == epoch and f["data"] == f["offset"]
                    seen.append(f["offset"])
                position = {"offset": seen[-1], "epoch": epoch}
                reconnects += 1
        await publisher
    finally:
        publisher.cancel()
    assert seen == list(range(1, total + 1))
    assert reconnects > 5


async def test_fresh_subscribe_during_live_publishing_continues_right_after_the_reply_offset(
    server,
):
    total, channel = 400, "race2"
    async with ws_client(server) as watcher:
        await watcher.subscribe(channel)
        publisher = asyncio.create_task(_publish_paced(server, channel, total))
        try:
            checked = 0
            for k in range(1, 7):
                # Join at different points of the stream, while it is moving.
                def past(f: dict[str, Any], k: int = k) -> bool:
                    return is_publication(f) and f["offset"] >= 50 * k

                await watcher.wait_for(past)
                async with ws_client(server) as c:
                    top = (await c.subscribe(channel))["offset"]
                    assert top >= 50 * k
                    got = await c.publications(channel, total - top, timeout=15)
                    assert [f["offset"] for f in got] == list(range(top + 1, total + 1))
                    checked += 1
            await publisher
        finally:
            publisher.cancel()
        assert checked == 6


# --------------------------------------------------------------------------- history ttl


async def test_history_is_dropped_history_ttl_after_the_last_publication(make_server):
    server = await make_server(history_ttl=0.5)
    async with ws_client(server) as c:
        first = await c.publish("ttl", 1)
        await c.publish("ttl", 2)
        await c.publish("ttl", 3)
        assert [
            p["offset"]
            for p in (await c.call("history", channel="ttl", limit=10))["result"]["publications"]
        ] == [1, 2, 3]

        async def expired() -> bool:
            reply = await c.call("history", channel="ttl", limit=10)
            return reply["ok"] is True and reply["result"]["publications"] == []

        await poll(expired, timeout=5)
        result = await c.subscribe("ttl", since={"offset": 1, "epoch": first["epoch"]})
        assert result["recovered"] is False


# --------------------------------------------------------------------------- liveness


async def test_server_drops_connection_that_does_not_answer_websocket_pings(make_server):
    server = await make_server(ping_interval=0.2, ping_timeout=0.3)
    async with ws_client(server, token("mute"), ping_interval=None) as c:
        await c.ping_ok()
        assert [s for s in server.gateway.hub.sessions if s.user == "mute"]
        c.conn.transport.pause_reading()  # no more pongs (nor anything else)
        try:
            await eventually(
                lambda: not [s for s in server.gateway.hub.sessions if s.user == "mute"], timeout=5
            )
        finally:
            c.conn.transport.resume_reading()
        code, _, _ = await c.expect_close()
        assert code != 1000


async def test_connection_that_answers_pings_stays_open(make_server):
    server = await make_server(ping_interval=0.2, ping_timeout=0.3)
    async with ws_client(server, ping_interval=None) as c:
        assert await c.silent(1.2) == []  # several ping intervals, answered by the client library
        await c.ping_ok()
