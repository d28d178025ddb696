"""uvicorn's HTTP/1.1 protocol with the limits a server facing untrusted clients needs.

uvicorn (h11) holds a connection whose request headers never finish for ever: its keep-alive timer
starts only after a response, and any byte received cancels it. So a few thousand sockets that each send
half a request line would hold the server's connections and memory indefinitely. Here:

- headers: every request's headers must be complete within `header_timeout` seconds of the connection
  opening, or of the previous response; a byte now and then does not extend it. Else a 408 and close.
- body: once the headers are in, the whole body must arrive within `body_timeout` seconds, whether or
  not the application reads it (a 401 does not). Else the connection closes; a handler still reading
  sees the client as gone.
- connections: past `max_connections` open ones, a new connection gets a 503 with Retry-After and is
  closed at once, before it costs a request.

Invariant: a connection has at most one of the two timers armed, and none once closed.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger(__name__)

DEFAULT_HEADER_TIMEOUT_S = 10.0
DEFAULT_BODY_TIMEOUT_S = 30.0
DEFAULT_MAX_CONNECTIONS = 1000

_TIMEOUT_RESPONSE = b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"
_BUSY_RESPONSE = (b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 1\r\nconnection: close\r\n"
                  b"content-length: 0\r\n\r\n")


def limited_h11_protocol(header_timeout: float, body_timeout: float, max_connections: int) -> type[H11Protocol]:
    """An H11Protocol subclass with these limits, for `uvicorn.Config(http=...)`."""

    class LimitedH11Protocol(H11Protocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._deadline: asyncio.TimerHandle | None = None
            self._awaiting: type[h11.IDLE] | type[h11.SEND_BODY] | None = None  # the client state being timed

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.write(_BUSY_RESPONSE)
                transport.close()
                return
            self._follow_state()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def handle_events(self) -> None:
            super().handle_events()
            self._follow_state()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._follow_state()

        def _follow_state(self) -> None:
            """Arm the timer that the client's h11 state calls for: headers awaited (IDLE), body awaited
            (SEND_BODY), or none (request complete, or the connection ending). A timer runs from the
            moment its state began, however many bytes arrive meanwhile."""
            state = self.conn.their_state
            if self.transport.is_closing() or state not in (h11.IDLE, h11.SEND_BODY):
                self._disarm()
            elif state is not self._awaiting:
                self._disarm()
                self._awaiting = state
                seconds = header_timeout if state is h11.IDLE else body_timeout
                self._deadline = self.loop.call_later(seconds, self._on_timeout, state)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            self._deadline = self._awaiting = None

        def _on_timeout(self, state: object) -> None:
            self._deadline = self._awaiting = None
            if self.conn.their_state is not state or self.transport.is_closing():
                return
            if state is h11.IDLE:
                self.transport.write(_TIMEOUT_RESPONSE)  # no request is open: the reply is ours to write
            # (mid-body, a handler still reading is told the client is gone when the connection drops)
            self.transport.close()

    return LimitedH11Protocol
