"""Operations: liveness, readiness, Prometheus metrics (GET, and HEAD for probes that
ask for the status alone)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from gateway.deps import GatewayDep

router = APIRouter(include_in_schema=False)
# A broker that does not answer within this is not ready: a probe gets its 503 before
# its own timeout (Kubernetes' default is 1 s), not after the broker's command timeout.
READY_TIMEOUT = 0.8


@router.api_route("/healthz", methods=["GET", "HEAD"])
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.api_route("/readyz", methods=["GET", "HEAD"])
async def readyz(gateway: GatewayDep) -> Response:
    if gateway.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    try:
        async with asyncio.timeout(READY_TIMEOUT):
            ready = await gateway.hub.ready()
    except TimeoutError:
        return JSONResponse({"status": "broker not answering"}, status_code=503)
    if not ready:
        return JSONResponse({"status": "broker unavailable"}, status_code=503)
    return JSONResponse({"status": "ready"})


@router.api_route("/metrics", methods=["GET", "HEAD"])
async def metrics(gateway: GatewayDep) -> Response:
    return Response(gateway.metrics.render(), media_type=CONTENT_TYPE_LATEST)
