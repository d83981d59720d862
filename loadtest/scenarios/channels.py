"""``channels``: many channels with a few subscribers each; the rates are publications per
second over all channels together (round-robin), so each channel gets rate / channels."""

from __future__ import annotations

import asyncio
from typing import Any

from loadtest.config import Setup
from loadtest.harness import Harness
from loadtest.scenarios.common import finish_report, run_steps, save


async def run_channels(
    setup: Setup,
    *,
    channels: int,
    subscribers: int,
    rates: list[float],
    step_duration: float,
    stop_on_fail: bool = False,
    settle: float = 1.0,
) -> dict[str, Any]:
    config = {
        "channels": channels,
        "subscribers_per_channel": subscribers,
        "rates": rates,
        "step_duration_s": step_duration,
        "stop_on_fail": stop_on_fail,
        "publish_lanes": setup.publish_lanes,
        "slow_share": setup.slow_share,
        "pad_bytes": setup.pad_bytes,
        "p99_limit_ms": setup.p99_limit_ms,
    }
    async with Harness(setup, "channels") as h:
        names = [h.channel(i) for i in range(channels)]
        # Interleaved, so that every worker holds subscribers of every channel.
        per_conn = [name for _ in range(subscribers) for name in names]
        connect = await h.connect(h.specs(per_conn), n_steps=len(rates))
        await asyncio.sleep(settle)
        runs, rp = await run_steps(
            h, names, rates, step_duration, stop_on_fail=stop_on_fail, lanes=setup.publish_lanes
        )
        report, _ = await finish_report(h, "channels", config, len(per_conn), connect, runs, rp)
        return save(h, "channels", report)
