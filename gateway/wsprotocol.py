"""uvicorn's websockets-sansio protocol with the contract's close reason for oversized frames.

The parser refuses a frame over ``ws_max_size`` (set to ``GATEWAY_MAX_MESSAGE_BYTES``)
and closes with 1009 and its own wording; the contract says ``message too big``.
"""

from __future__ import annotations

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.exceptions import PayloadTooBig
from websockets.frames import Close, Frame, Opcode

from gateway.errors import CloseCode


class GatewayWebSocketProtocol(WebSocketsSansIOProtocol):
    def handle_parser_exception(self) -> None:
        if not isinstance(self.conn.parser_exc, PayloadTooBig):
            super().handle_parser_exception()
            return
        code, reason = CloseCode.MESSAGE_TOO_BIG
        self.conn.data_to_send()  # drop the parser's own close frame
        self.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})
        close = Frame(Opcode.CLOSE, Close(code, reason).serialize())
        self.transport.write(close.serialize(mask=False))
        self.close_sent = True
        self.transport.close()
