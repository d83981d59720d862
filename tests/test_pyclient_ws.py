"""The Python client (gatewayclient) over WebSocket against a real in-process gateway:
commands, rpc, reconnects that resume every channel, and gaps surfaced as ``Gap`` items."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.errors import CloseCode
from gatewayclient import (
    Client,
    Gap,
    GatewayError,
    Item,
    Position,
    PresenceEvent,
    Publication,
    Publisher,
    StateChange,
    Subscribed,
    Subscription,
    SubscriptionEvent,
    connect,
)
from tests.conftest import MakeServer, RunningServer, eventually, token
from tests.fake_backend import FakeBackend


async def take(sub: Subscription, count: int, timeout: float = 5.0) -> list[Item]:
    return [await sub.get(timeout) for _ in range(count)]


def kick(server: RunningServer, close: Any = CloseCode.INTERNAL_ERROR) -> None:
    """Close every WebSocket of ``server`` from the server's side."""
    for session in list(server.gateway.hub.sessions):
        session.close(close)


async def test_subscribe_then_publish_delivers_the_publication(server):
    async with connect(server.url, token=token("alice")) as client:
        sub = await client.subscribe("news")
        assert sub.position is not None and sub.position.offset == 0
        sent = await client.publish("news", {"hello": 1})
        assert sent.offset == 1
        assert await sub.get(5) == Publication("news", 1, sent.epoch, {"hello": 1})
        assert sub.position == Position(sent.epoch, 1)


async def test_presence_history_and_join_events(server):
    async with (
        connect(server.url, token=token("alice", info={"n": 1})) as alice,
        connect(server.ws_url, token=token("bob")) as bob,
    ):
        sub = await alice.subscribe("chat:room")
        joined = await sub.get(5)
        assert isinstance(joined, PresenceEvent) and joined.event == "join"
        assert joined.client["user"] == "alice"
        await bob.subscribe("chat:room")
        bob_joined = await sub.get(5)
        assert isinstance(bob_joined, PresenceEvent) and bob_joined.client["user"] == "bob"
        users = sorted(c["user"] for c in await bob.presence("chat:room"))
        assert users == ["alice", "bob"]
        for n in range(5):
            await bob.publish("chat:room", {"n": n})
        page = await alice.history("chat:room", limit=2)
        assert [(p.offset, p.data) for p in page.publications] == [(4, {"n": 3}), (5, {"n": 4})]
        assert page.offset == 5
        after = await alice.history("chat:room", since=Position(page.epoch, 3))
        assert [p.offset for p in after.publications] == [4, 5]
        await bob.unsubscribe("chat:room")
        left = [item for item in await take(sub, 6) if isinstance(item, PresenceEvent)]
        assert left[-1].event == "leave" and left[-1].client["user"] == "bob"
        with pytest.raises(GatewayError) as refused:
            await alice.presence("news")  # not a presence channel
        assert refused.value.code == "not_found"


async def test_rpc_goes_to_the_backend_and_returns_its_data(
    make_server: MakeServer, backend: FakeBackend
) -> None:
    gw = await make_server(hooks=backend.hooks())
    async with connect(gw.url, token=token("olga")) as client:
        assert await client.rpc("rpc:echo", {"room": "lobby"}) == {
            "echo": {"room": "lobby"},
            "user": "olga",
        }
        with pytest.raises(GatewayError) as refused:
            await client.rpc("rpc:refuse")
        assert refused.value.code == "forbidden"
        with pytest.raises(GatewayError) as unknown:
            await client.rpc("other")
        assert unknown.value.code == "not_found"
        await client.ping()  # the connection is still usable


async def test_a_refused_subscription_raises_and_the_client_goes_on(server):
    async with connect(server.url, token=token("eve", subscribe=["ok:*"])) as client:
        with pytest.raises(GatewayError) as refused:
            await client.subscribe("secret")
        assert refused.value.code == "forbidden"
        assert "secret" not in client.subscriptions
        sub = await client.subscribe("ok:1")
        await client.publish("ok:1", 1)
        assert isinstance(await sub.get(5), Publication)


async def test_a_bad_token_without_a_factory_fails_connect(server):
    with pytest.raises(GatewayError) as failed:
        await connect(server.url, token="not-a-jwt")
    assert failed.value.code == "unauthorized"


async def test_reconnect_resumes_every_channel_with_nothing_lost_or_repeated(server):
    """The server drops the connection; what is published before the client is back is
    replayed from history, once, in order, on both channels."""
    client = await connect(server.url, token=token(), min_reconnect_delay=2.0)
    try:
        subs = [await client.subscribe("a"), await client.subscribe("b")]
        async with Publisher(server.url, token("backend")) as api:
            for n in range(1, 4):
                for ch in ("a", "b"):
                    await api.publish(ch, n)
            kick(server)
            await eventually(lambda: not client.connected)
            for n in range(4, 9):
                for ch in ("a", "b"):
                    await api.publish(ch, n)
            # All published while the client was away (its backoff is at least 1 s).
            assert client.connections == 1
            await client.wait_connected(10)
            assert client.connections == 2
            for n in range(9, 11):
                for ch in ("a", "b"):
                    await api.publish(ch, n)
        for sub in subs:
            items = await take(sub, 10)
            assert [(i.offset, i.data) for i in items if isinstance(i, Publication)] == [
                (n, n) for n in range(1, 11)
            ]
            assert sub.recovered is True and sub.repeats == 0
            # Nothing more: a duplicate would be next.
            await client.publish(sub.channel, "last")
            last = await sub.get(5)
            assert isinstance(last, Publication) and last.offset == 11
    finally:
        await client.close()


async def test_history_lost_while_away_is_a_gap(make_server: MakeServer) -> None:
    gw = await make_server(history_size=2)
    events: list[SubscriptionEvent] = []
    async with connect(gw.url, token=token(), min_reconnect_delay=2.0) as client:
        sub = await client.subscribe("news", on_event=events.append)
        await client.publish("news", 1)
        assert isinstance(await sub.get(5), Publication)
        kick(gw)
        await eventually(lambda: not client.connected)
        async with Publisher(gw.url, token("backend")) as api:
            for n in range(2, 7):
                await api.publish("news", n)
        await client.wait_connected(10)
        gap = await sub.get(5)
        assert isinstance(gap, Gap)
        assert (gap.reason, gap.last_offset, gap.offset) == ("history", 1, 6)
        assert sub.recovered is False
        await client.publish("news", 7)
        after = await sub.get(5)
        assert isinstance(after, Publication) and after.offset == 7
    epoch = after.epoch
    assert events == [
        Subscribed("news", Position(epoch, 0), None),
        Subscribed("news", Position(epoch, 6), False),
        gap,
    ]


async def test_a_new_epoch_after_failing_over_is_a_gap(make_server: MakeServer) -> None:
    """Two memory gateways do not share history: moving from one to the other is an
    epoch change, which the subscription reports before the new epoch's publications."""
    first, second = await make_server(), await make_server()
    client = Client([first.url, second.url], token=token())
    async with client:
        sub = await client.subscribe("news")
        one = await client.publish("news", 1)
        assert (await sub.get(5)) == Publication("news", 1, one.epoch, 1)
        kick(first, CloseCode.SERVICE_RESTART)
        await eventually(lambda: client.connections == 2 and client.connected)
        assert client.url == second.url
        gap = await sub.get(5)
        assert isinstance(gap, Gap) and gap.reason == "epoch"
        assert gap.last_epoch == one.epoch and gap.epoch != one.epoch
        two = await client.publish("news", 2)
        assert two.epoch == gap.epoch
        assert (await sub.get(5)) == Publication("news", 1, two.epoch, 2)


async def test_unsubscribe_and_close_end_the_iteration(server):
    client = await connect(server.url, token=token())
    sub = await client.subscribe("a")
    other = await client.subscribe("b")
    await client.unsubscribe("a")
    assert [item async for item in sub] == []
    await client.publish("a", 1)  # not delivered to the ended subscription
    await client.close()
    assert [item async for item in other] == []
    with pytest.raises(GatewayError) as closed:
        await client.publish("a", 2)
    assert closed.value.code == "closed"


async def test_the_token_is_refreshed_before_it_expires(make_server: MakeServer) -> None:
    gw = await make_server(jwt_leeway=0)
    made: list[str] = []

    async def factory() -> str:
        made.append(token("alice", ttl=3))
        return made[-1]

    async with connect(gw.url, token_factory=factory, refresh_before_expiry=30) as client:
        assert len(made) == 1
        sub = await client.subscribe("news")
        # A 3 s token is replaced halfway through (every ~1.5 s); the fourth comes ~4.5 s
        # in, well past the first one's exp, when the gateway would have closed without
        # the refresh ops.
        await eventually(lambda: len(made) >= 4, timeout=10)
        await client.publish("news", "still here")
        assert isinstance(await sub.get(5), Publication)
        assert client.last_close is None and client.connections == 1  # never dropped


async def test_a_4001_close_gets_a_new_token_from_the_factory(server):
    made: list[str] = []

    async def factory() -> str:
        made.append(token("alice"))
        return made[-1]

    async with connect(server.url, token_factory=factory) as client:
        sub = await client.subscribe("news")
        kick(server, CloseCode.UNAUTHORIZED)
        await eventually(lambda: client.connections == 2 and client.connected, timeout=10)
        assert len(made) == 2
        await client.publish("news", 1)
        assert isinstance(await sub.get(5), Publication)


async def test_a_stored_position_resumes_in_a_new_client(server):
    async with connect(server.url, token=token()) as client:
        sub = await client.subscribe("news")
        for n in (1, 2):
            await client.publish("news", n)
        await take(sub, 2)
        stored = sub.position
    assert stored is not None and stored.offset == 2
    async with Publisher(server.url, token("backend")) as api:
        for n in (3, 4):
            await api.publish("news", n)
    async with connect(server.url, token=token()) as client:
        resumed = await client.subscribe("news", since=stored)
        assert resumed.recovered is True
        items = await take(resumed, 2)
        assert [(i.offset, i.data) for i in items if isinstance(i, Publication)] == [(3, 3), (4, 4)]
        stale = await client.subscribe("other", since=Position("not-the-epoch", 7))
        gap = await stale.get(5)
        assert isinstance(gap, Gap) and (gap.reason, gap.last_offset) == ("epoch", 7)


async def test_state_callbacks_follow_a_cut_connection_and_a_refused_token(server):
    states: list[StateChange] = []
    events: list[SubscriptionEvent] = []
    async with connect(
        server.url, token=token(), min_reconnect_delay=0.1, on_state=states.append
    ) as client:
        sub = await client.subscribe("news", on_event=events.append)
        kick(server)
        await eventually(lambda: client.connections == 2 and client.connected)
        sent = await client.publish("news", 1)
        assert isinstance(await sub.get(5), Publication)
    assert [(s.state, s.code) for s in states] == [
        ("connecting", None),
        ("connected", None),
        ("disconnected", 1011),
        ("connecting", 1011),
        ("connected", None),
        ("closed", None),
    ]
    assert {s.url for s in states} == {server.url}
    assert states[2].reason == states[3].reason == "internal error"
    assert events == [
        Subscribed("news", Position(sent.epoch, 0), None),
        Subscribed("news", Position(sent.epoch, 0), True),
    ]
    refused: list[StateChange] = []
    with pytest.raises(GatewayError):
        await connect(server.url, token="not-a-jwt", on_state=refused.append)
    assert [(s.state, s.code) for s in refused] == [
        ("connecting", None),
        ("closed", 4001),
    ]


async def test_a_failing_callback_is_logged_and_the_client_goes_on(server, caplog):
    def broken(change: StateChange) -> None:
        raise RuntimeError("a bug in the application")

    async with connect(server.url, token=token(), on_state=broken) as client:
        sub = await client.subscribe("news")
        await client.publish("news", 1)
        assert isinstance(await sub.get(5), Publication)
    assert "a gatewayclient callback failed" in caplog.text


# --------------------------------------------------------------------------- while resubscribing


async def test_a_resubscribe_the_gateway_cannot_make_now_is_made_later(
    make_server: MakeServer, backend: FakeBackend
) -> None:
    """After a reconnect the subscribe hook does not answer (``internal``, as a broker
    down would be): the subscription is sent again a little later, not dropped (it was,
    and its iteration ended with ``internal`` once the gateway was fine again)."""
    gw = await make_server(hooks=backend.hooks(subscribe=1))
    backend.release.set()  # "hang" channels answer at once while it is set
    async with connect(gw.url, token=token()) as client:
        sub = await client.subscribe("chat:hang.1")
        backend.release.clear()
        kick(gw, CloseCode.SERVICE_RESTART)
        timeouts = gw.gateway.metrics.hook_outcomes.labels("subscribe", "timeout")
        await eventually(lambda: timeouts._value.get() >= 1, timeout=10)  # resubscribe failed
        backend.release.set()  # answered from now on: the retry is made
        await eventually(lambda: len(backend.calls_of("subscribe")) >= 3, timeout=10)
        await eventually(
            lambda: (
                bool(gw.gateway.hub.sessions)
                and all("chat:hang.1" in s.channels for s in gw.gateway.hub.sessions)
            ),
            timeout=10,
        )
        assert client.subscriptions.get("chat:hang.1") is sub and sub.active
        async with Publisher(gw.url, token("backend")) as api:
            published = await api.publish("chat:hang.1", "after")
        item = await sub.get(5)
        while isinstance(item, PresenceEvent):  # (chat:* has presence: its own joins)
            item = await sub.get(5)
        assert isinstance(item, Publication) and item.offset == published.offset, item


async def test_close_ends_a_subscribe_still_waiting_for_its_reply(
    make_server: MakeServer, backend: FakeBackend
) -> None:
    gw = await make_server(hooks=backend.hooks(subscribe=30))
    client = await connect(gw.url, token=token(), command_timeout=30)
    waiting = asyncio.ensure_future(client.subscribe("chat:hang.2"))
    await eventually(lambda: backend.pending == 1)
    await client.close()
    with pytest.raises(GatewayError) as ended:
        await asyncio.wait_for(waiting, 5)  # not the 30 s command timeout
    assert ended.value.code == "closed"
    backend.release.set()
