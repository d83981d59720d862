"""What only the memory backend has to do (the shared contracts are tests/test_contract_*.py):
``memory://`` is private to its backend, ``memory://<name>`` is shared by the backends of
the process created with that name, and only while one of them is open."""

from __future__ import annotations

import secrets

from channels.backend_url import create_backend
from channels.broker import Backend, BrokerOptions
from tests.conftest import eventually
from tests.contract import Received


async def started(url: str) -> tuple[Backend, Received]:
    backend, received = create_backend(url, BrokerOptions()), Received()
    await backend.broker.start(received.on_message, received.on_resync)
    backend.signals.listen(received.on_signal)
    return backend, received


async def test_a_private_namespace_shares_nothing() -> None:
    (a, heard_a), (b, heard_b) = await started("memory://"), await started("memory://")
    try:
        await b.broker.subscribe("c")
        await a.presence.add("chat:x", "c-1", b"{}")
        await a.signals.register("k", b"v", 60)
        first = await a.broker.publish("c", b'"a"')
        second = await b.broker.publish("c", b'"b"')
        assert first.offset == second.offset == 1 and first.epoch != second.epoch
        assert [p.data for p in heard_b.publications("c")] == [b'"b"']  # fanned out in publish
        assert not await a.broker.has_subscribers("c")
        assert await b.presence.list("chat:x") == [] and await b.signals.lookup("k") is None
        await a.signals.signal(b"only-a")
        await b.signals.signal(b"only-b")
        await eventually(lambda: heard_a.signals and heard_b.signals)
        assert (heard_a.signals, heard_b.signals) == ([b"only-a"], [b"only-b"])
    finally:
        await a.broker.close()
        await b.broker.close()


async def test_a_named_namespace_lives_while_one_of_its_backends_is_open() -> None:
    url = f"memory://lifetime-{secrets.token_hex(4)}"
    (a, _), (b, _) = await started(url), await started(url)
    first = await a.broker.publish("c", b"1")
    await a.broker.close()
    # ``b`` is still open: the namespace, and the channel's sequence, are still there.
    assert (await b.broker.publish("c", b"2")).epoch == first.epoch
    await b.broker.close()
    (c, _) = await started(url)  # every backend of it closed: a new, empty namespace
    try:
        page = await c.broker.history("c")
        assert page.publications == [] and page.position.offset == 0
        assert page.position.epoch != first.epoch
    finally:
        await c.broker.close()
