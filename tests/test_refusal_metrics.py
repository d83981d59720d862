"""``gateway_connections_refused_total{transport, reason}``: what was turned away before it
opened, which the gauges do not show (a pod at GATEWAY_MAX_CONNECTIONS refusing clients
looked like a quiet one)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import MakeServer, RunningServer, token
from tests.helpers import api_client, sse_params, sse_request, ws_client

ORIGIN = "https://app.example"
FORGED = token("mallory", secret="not-the-gateway-secret-0123456789abcdef")


async def refused_counts(server: RunningServer) -> dict[tuple[str, str], float]:
    async with api_client(server) as http:
        text = (await http.get("/metrics")).text
    [family] = [
        f for f in text_string_to_metric_families(text) if f.name == "gateway_connections_refused"
    ]
    return {
        (s.labels["transport"], s.labels["reason"]): s.value
        for s in family.samples
        if s.name.endswith("_total")
    }


async def test_refused_connections_are_counted_by_transport_and_reason(
    make_server: MakeServer,
) -> None:
    server = await make_server(max_connections=1, allowed_origins=ORIGIN)
    assert await refused_counts(server) == {}
    async with ws_client(server, FORGED) as c:
        assert (await c.expect_close())[:2] == (4001, "unauthorized")
    async with ws_client(server, token(), origin="https://evil.example") as c:
        assert (await c.expect_close())[:2] == (1008, "origin not allowed")
    async with api_client(server) as http:
        status, _, _ = await sse_request(http, sse_params(["news"], FORGED))
        assert status == 401
        status, _, _ = await sse_request(
            http, sse_params(["news"], token()), {"Origin": "https://evil.example"}
        )
        assert status == 403
    async with ws_client(server, token()) as held:  # the one connection allowed
        await held.ping_ok()
        async with ws_client(server, token()) as c:
            assert (await c.expect_close())[:2] == (1013, "try again later")
        async with api_client(server) as http:
            status, _, _ = await sse_request(http, sse_params(["news"], token()))
            assert status == 503
    assert await refused_counts(server) == {
        ("websocket", "unauthorized"): 1,
        ("websocket", "origin_not_allowed"): 1,
        ("websocket", "try_again_later"): 1,
        ("sse", "unauthorized"): 1,
        ("sse", "forbidden"): 1,
        ("sse", "unavailable"): 1,
    }
