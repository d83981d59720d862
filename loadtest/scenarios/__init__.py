"""The scenarios: ``fanout``, ``idle``, ``channels`` and ``churn``; each returns its report."""

from loadtest.scenarios.channels import run_channels
from loadtest.scenarios.churn import run_churn
from loadtest.scenarios.fanout import run_fanout
from loadtest.scenarios.idle import run_idle

__all__ = ["run_channels", "run_churn", "run_fanout", "run_idle"]
