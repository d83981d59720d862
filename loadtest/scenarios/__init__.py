"""The scenarios: ``fanout``, ``idle``, ``channels``, ``churn``, ``connect``, ``storm``
and ``hooks``; each returns its report."""

from loadtest.scenarios.channels import run_channels
from loadtest.scenarios.churn import run_churn
from loadtest.scenarios.connect import run_connect
from loadtest.scenarios.fanout import run_fanout
from loadtest.scenarios.hooks import run_hooks
from loadtest.scenarios.idle import run_idle
from loadtest.scenarios.storm import run_storm

__all__ = [
    "run_channels",
    "run_churn",
    "run_connect",
    "run_fanout",
    "run_hooks",
    "run_idle",
    "run_storm",
]
