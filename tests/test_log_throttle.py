"""LogThrottle: a crowd of the same event is one line a while, and the next line says how
many were held back."""

from __future__ import annotations

import logging

import pytest

from channels.log_throttle import LogThrottle, LogThrottles


def test_one_line_per_interval_and_the_held_ones_counted(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    throttle = LogThrottle(logging.getLogger("tests.throttle"), 10.0, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="tests.throttle"):
        for i in range(100):  # a crowd in one instant
            throttle.warning("client %s left", i)
        now[0] += 9.9
        throttle.warning("client %s left", 100)
        now[0] += 0.1
        throttle.warning("client %s left", 101)
        now[0] += 60
        throttle.info("client %s left", 102)
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "client 0 left"),
        ("WARNING", "client 101 left (and 100 more like it since the last such line, not logged)"),
        ("INFO", "client 102 left"),
    ]


def test_a_level_not_logged_holds_nothing(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("tests.throttle.quiet")
    throttle = LogThrottle(logger, 10.0, clock=lambda: 0.0)
    with caplog.at_level(logging.WARNING, logger="tests.throttle.quiet"):
        throttle.info("not written, not counted")
        throttle.warning("written")
    assert [r.getMessage() for r in caplog.records] == ["written"]


def test_each_key_has_its_own_throttle(caplog: pytest.LogCaptureFixture) -> None:
    throttles = LogThrottles(logging.getLogger("tests.throttles"))
    with caplog.at_level(logging.WARNING, logger="tests.throttles"):
        for _ in range(3):
            throttles["connect", "failed"].warning("connect failed")
            throttles["rpc", "failed"].warning("rpc failed")
    assert [r.getMessage() for r in caplog.records] == ["connect failed", "rpc failed"]
    assert throttles["rpc", "failed"] is throttles["rpc", "failed"]
