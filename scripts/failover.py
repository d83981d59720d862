"""What clients see through a Redis failure: each scenario of tests/failover.py at size.

    .venv/bin/python scripts/failover.py [--clients 50] [--rate 50] [scenario ...]

Starts its own topologies (redis-server on free ports) and two gateway processes per
scenario; prints one Markdown row per scenario (the table of docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.failover import SCENARIOS, Outcome, run

COLUMNS = (
    ("scenario", "scenario"),
    ("accepted", "publications accepted"),
    ("delivered", "pushes delivered"),
    ("duplicates", "duplicates"),
    ("silent_gaps", "silent gaps"),
    ("epochs_announced", "gaps announced"),
    ("lost_in_announced_gaps", "lost, announced"),
    ("failover_s", "Redis failover s"),
    ("publish_resumed_s", "publishing back s"),
    ("delivery_resumed_s", "delivery back s"),
)


def row(outcome: Outcome) -> str:
    values = outcome.row()
    return "| " + " | ".join(str(values[key]) for key, _ in COLUMNS) + " |"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenarios", nargs="*", choices=[*SCENARIOS, []])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--rate", type=float, default=50.0, help="publications/s per channel")
    args = parser.parse_args()
    print("| " + " | ".join(title for _, title in COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for scenario in args.scenarios or SCENARIOS:
        outcome = await run(scenario, clients=args.clients, rate=args.rate, before=3, after=3)
        print(row(outcome), *outcome.notes, flush=True)


if __name__ == "__main__":
    asyncio.run(main())
