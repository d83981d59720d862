"""Operations: liveness, readiness, Prometheus metrics (GET, and HEAD for probes that
ask for the status alone)."""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from gateway.deps import GatewayDep

router = APIRouter(include_in_schema=False)
# A broker that does not answer within this is not ready: a probe gets its 503 before
# its own timeout (Kubernetes' default is 1 s), not after the broker's command timeout.
READY_TIMEOUT = 0.8

logger = logging.getLogger(__name__)


@router.api_route("/healthz", methods=["GET", "HEAD"])
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.api_route("/readyz", methods=["GET", "HEAD"])
async def readyz(request: Request, gateway: GatewayDep) -> Response:
    if gateway.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    try:
        async with asyncio.timeout(READY_TIMEOUT):
            status = "ready" if await gateway.hub.ready() else "broker unavailable"
    except TimeoutError:
        status = "broker not answering"
    # What the app's /readyz last answered: a change is logged, once, so that a pod taken
    # out of its Service for a broker that stalled says why.
    state = request.app.state
    if getattr(state, "last_readiness", "ready") != status:
        state.last_readiness = status
        if status == "ready":
            logger.warning("ready again: the broker answers")
        else:
            logger.warning("not ready: %s (/readyz answers 503)", status)
    return JSONResponse({"status": status}, status_code=200 if status == "ready" else 503)


@router.api_route("/metrics", methods=["GET", "HEAD"])
async def metrics(gateway: GatewayDep) -> Response:
    return Response(gateway.metrics.render(), media_type=CONTENT_TYPE_LATEST)
