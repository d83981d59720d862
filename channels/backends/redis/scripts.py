"""The Lua scripts, from the ``.lua`` files of this package, each file read once.

A script is made of parts, composed at load time: the presence scripts start with the
shared ``server_clock.lua`` (and ``reap.lua``), publish, publish_many and history with
``stream_meta.lua``; publish_once is publish after ``publish_seen.lua``. ``Scripts``
registers them on one client: EVALSHA, with SCRIPT LOAD when Redis does not know one
(after a restart).
"""

from __future__ import annotations

import functools
from importlib import resources

from redis.asyncio import Redis, RedisCluster
from redis.commands.core import AsyncScript

_PACKAGE = __name__.rpartition(".")[0]

# script -> its files, in order
PARTS = {
    "publish": ("stream_meta.lua", "publish.lua"),
    "publish_once": ("publish_seen.lua", "stream_meta.lua", "publish.lua"),
    "publish_many": ("stream_meta.lua", "publish_many.lua"),
    "history": ("stream_meta.lua", "history.lua"),
    "presence_add": ("server_clock.lua", "presence_add.lua"),
    "presence_remove": ("presence_remove.lua",),
    "presence_leave": ("presence_leave.lua",),
    "presence_list": ("server_clock.lua", "reap.lua", "presence_list.lua"),
    "presence_expire": ("server_clock.lua", "reap.lua", "presence_expire.lua"),
}


def _read_file(name: str) -> str:
    return resources.files(_PACKAGE).joinpath(name).read_text(encoding="utf-8")


@functools.cache
def _part(name: str) -> str:
    return _read_file(name)


@functools.cache
def source(script: str, sharded: bool = False) -> str:
    """The text of ``script`` (a key of ``PARTS``); ``sharded``: for a Redis Cluster, whose
    topics are shard channels (SPUBLISH, to the node that has the channel's keys)."""
    text = "".join(_part(name) for name in PARTS[script])
    return text.replace("redis.call('PUBLISH'", "redis.call('SPUBLISH'") if sharded else text


class Scripts:
    __slots__ = (
        "history",
        "presence_add",
        "presence_expire",
        "presence_leave",
        "presence_list",
        "presence_remove",
        "publish",
        "publish_many",
        "publish_once",
    )

    def __init__(self, redis: Redis | RedisCluster, sharded: bool = False) -> None:
        def load(script: str) -> AsyncScript:
            return redis.register_script(source(script, sharded))

        self.publish = load("publish")
        self.publish_many = load("publish_many")
        self.publish_once = load("publish_once")
        self.history = load("history")
        self.presence_add = load("presence_add")
        self.presence_list = load("presence_list")
        self.presence_remove = load("presence_remove")
        self.presence_leave = load("presence_leave")
        self.presence_expire = load("presence_expire")
