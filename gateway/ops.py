"""Operations: liveness, readiness, Prometheus metrics (GET, and HEAD for probes that
ask for the status alone)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from gateway.deps import GatewayDep

router = APIRouter(include_in_schema=False)


@router.api_route("/healthz", methods=["GET", "HEAD"])
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.api_route("/readyz", methods=["GET", "HEAD"])
async def readyz(gateway: GatewayDep) -> Response:
    if gateway.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    if not await gateway.hub.ready():
        return JSONResponse({"status": "broker unavailable"}, status_code=503)
    return JSONResponse({"status": "ready"})


@router.api_route("/metrics", methods=["GET", "HEAD"])
async def metrics(gateway: GatewayDep) -> Response:
    return Response(gateway.metrics.render(), media_type=CONTENT_TYPE_LATEST)
