"""A path parameter for channel names (``/api/channels/{channel:channel}/history``)."""

from __future__ import annotations

from starlette.convertors import Convertor, register_url_convertor

CHANNEL = "channel"  # the convertor's name, registered on import


class ChannelInPath(Convertor[str]):
    """A channel name in a path as it is, whatever it holds (a ``/``, a newline, nothing):
    the endpoint's check answers a bad one 400, as the contract asks. (The default, one
    segment of one character or more, made ``a%2Fb`` or ``//history`` a 404.)"""

    regex = "[\\s\\S]*"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor(CHANNEL, ChannelInPath())
