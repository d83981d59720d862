"""Small servers a team would otherwise pick, fed by the same Redis publisher as the gateway.

Each is a complete program (``python -m loadtest.baselines.NAME --port P --redis-url U``)
written the way its library's documentation shows, plus two things the load test needs:
``GET /healthz`` and a ``{"ready": channel}`` message (SSE: ``event: ready``) once the
subscription is live, so that publishing starts only when every client listens.
"""
