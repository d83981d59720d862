"""The FastAPI gateway: transports (WebSocket, SSE), the HTTP API and operations around the hub."""
