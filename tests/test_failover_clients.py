"""Clients of two gateway workers through a Redis failure of each kind (tests/failover.py):
whatever a failover loses is announced to them, nothing arrives twice, and delivery
resumes by itself."""

from __future__ import annotations

import pytest

from tests.failover import SCENARIOS, run


@pytest.mark.slow
@pytest.mark.parametrize("scenario", SCENARIOS)
async def test_clients_see_no_duplicate_and_no_silent_gap_through_a_failure(
    scenario: str,
) -> None:
    outcome = await run(scenario, clients=4, rate=20, before=1.0, after=1.0, outage=1.0)
    assert outcome.notes == []
    assert outcome.accepted > 0 and outcome.delivered > 0
    assert outcome.duplicates == 0
    assert outcome.silent_gaps == 0
    assert outcome.delivery_resumed_s > 0  # every client got publications after the break
    if scenario == "shard":
        # The shard came back empty: its channels start a new epoch, announced to all.
        assert outcome.epochs_announced >= 4
