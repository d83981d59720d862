"""What uvicorn's HTTP protocol computes the same for every connection of one server.

uvicorn's ``__init__`` sets thirteen attributes on each new protocol object from the
server's config and state: the same values for every connection. The gateway's protocol
makes each connection an instance of a subclass for its server instead
(``GatewayHttpToolsProtocol.__new__``), where they are class attributes: nothing to set
per connection, and a stream held open keeps a small instance dict of its own.
uvicorn is given ``Protocols`` as that class (``gateway.server.options``): it makes
each connection's protocol of the server's subclass without calling a class whose
``__new__`` and ``__init__`` are Python.
"""

from __future__ import annotations

import logging
from typing import Any

from uvicorn.config import Config
from uvicorn.server import ServerState


def server_class(
    cls: type, config: Config, server_state: ServerState, app_state: dict[str, Any]
) -> type:
    """``cls`` for the connections of one server: a subclass whose class attributes are
    what uvicorn's ``__init__`` gives each of them the same (``server_wide``), made on
    the server's first connection and kept on its ``ServerState``."""
    kept = getattr(server_state, "gateway_protocol_classes", None)
    if kept is None or kept[0] is not config or kept[1] is not app_state:
        kept = server_state.gateway_protocol_classes = (config, app_state, {})  # type: ignore[attr-defined]
    classes: dict[type, type] = kept[2]
    made = classes.get(cls)
    if made is None:
        attributes = server_wide(config, server_state, app_state)
        made = classes[cls] = type(
            cls.__name__, (cls,), {**attributes, "__module__": cls.__module__}
        )
    return made


def server_wide(
    config: Config, server_state: ServerState, app_state: dict[str, Any]
) -> dict[str, Any]:
    """The attributes uvicorn's ``__init__`` gives every protocol of one server the same
    values."""
    if not config.loaded:
        config.load()
    attributes = {
        "config": config,
        "app": config.loaded_app,
        "logger": logging.getLogger("uvicorn.error"),
        "access_logger": logging.getLogger("uvicorn.access"),
        "ws_protocol_class": config.ws_protocol_class,
        "root_path": config.root_path,
        "asgi_version": config.asgi_version,
        "limit_concurrency": config.limit_concurrency,
        "app_state": app_state,
        "timeout_keep_alive": config.timeout_keep_alive,
        "server_state": server_state,
        "connections": server_state.connections,
        "tasks": server_state.tasks,
    }
    return attributes


class Protocols:
    """What uvicorn is given as its HTTP protocol class (``config.http``) for the gateway's
    ``cls``: uvicorn's ``create_protocol`` calls it once per connection, with the same
    keywords it would give the class, and it makes an instance of ``cls``'s class for the
    server (``server_class``) without the Python ``__new__`` and ``__init__`` calling
    the class costs: ``__init__`` only when it has something to do (``parses_at_once``,
    or a loop given)."""

    def __init__(self, cls: type) -> None:
        self.cls = cls

    def __reduce__(self) -> tuple[type[Protocols], tuple[type]]:
        """Pickled as its class (``--workers``: each child is given the config)."""
        return Protocols, (self.cls,)

    def __call__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: Any = None,
    ) -> Any:
        made = server_class(self.cls, config, server_state, app_state)
        protocol: Any = object.__new__(made)
        if _loop is not None or made.parses_at_once:  # type: ignore[attr-defined]
            protocol.__init__(config, server_state, app_state, _loop)
        return protocol
