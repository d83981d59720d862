"""The admin page (``/admin``) and its API (``/admin/api/...``): live figures of every
worker, and publish, history and presence for any channel.

Safe by default: in dev mode (no key configured) it is open; with a key configured it
does not exist (404) unless ``GATEWAY_ADMIN_TOKEN`` is set, and then every API request
needs ``Authorization: Bearer <admin token>`` (the page asks for it once and keeps it in
the tab's ``sessionStorage``). A set admin token is required in dev mode too.
"""

from __future__ import annotations

from fastapi import FastAPI

from gateway.admin import routes
from gateway.admin.stats import ClusterStats
from gateway.runtime import Gateway


def install(app: FastAPI, gateway: Gateway) -> None:
    stats = ClusterStats(gateway)
    app.state.admin_stats = stats
    gateway.add_feature(stats)
    app.include_router(routes.router)
