"""Command-line argument types shared by the subcommands."""

from __future__ import annotations

import argparse


def floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected numbers separated by commas: {text!r}"
        ) from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError("rates must be positive")
    return values


def cpus(text: str) -> list[int]:
    """``0`` / ``0,2`` / ``1-3``, as taskset takes them."""
    result: list[int] = []
    for part in text.split(","):
        if "-" in part:
            low, high = part.split("-", 1)
            result.extend(range(int(low), int(high) + 1))
        elif part.strip():
            result.append(int(part))
    return result
