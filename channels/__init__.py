"""Channels: names, publications, the local fan-out hub and the brokers behind it.

Nothing in this package knows about HTTP, WebSockets or FastAPI.
"""
