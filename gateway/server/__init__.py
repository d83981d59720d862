"""The server adapter: everything that knows uvicorn.

``options`` picks uvicorn's protocols (the gateway's own, or stock) and the options
the settings imply; ``websocket`` and ``http`` are the gateway's protocols, each a
port per connection; ``asgi`` the ports over plain ASGI; ``ports`` the interface the
transports write to; ``draining`` the server with the contract's shutdown order;
``workers`` the ``--workers N`` supervisor. Nothing here knows the hub.
"""
