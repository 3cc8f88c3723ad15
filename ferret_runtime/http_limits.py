"""What bounds ``ferret serve`` below the app: connections, header deadlines, body bytes, tokens.

uvicorn has no header-read deadline and its ``limit_concurrency`` answers 503 before the app (so
uncounted, and the probes refused too): :func:`protocol_class` adds both to its h11 protocol.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

log = logging.getLogger("uvicorn.error")  # uvicorn configures its handler and level
OVER_CAPACITY = "ferret_over_capacity"  # set in the request state by the protocol for connections past the cap


@dataclass
class ServerLimits:
    """Connection-level settings handed to uvicorn and to the protocol below."""

    max_connections: int = 256
    keep_alive_timeout: float = 5.0
    shutdown_timeout: float = 20.0
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None


def load_api_keys(path: str | Path) -> tuple[str, ...]:
    """Bearer tokens from a file, one per line; ConfigError when it is unreadable or holds none."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"Received --api-key-file {path}: cannot read it ({e.__class__.__name__}); "
                          "expected a readable text file of tokens, one per line") from None
    keys = tuple(line.strip() for line in lines if line.strip())
    if not keys:
        raise ConfigError(f"Received --api-key-file {path} with no token; expected one or more, one per line")
    if not all(k.isascii() for k in keys):
        raise ConfigError(f"Received --api-key-file {path} with a non-ASCII token; expected ASCII tokens")
    return keys


class ByteBudget:
    """Bytes of request bodies accepted and not yet answered, up to a limit; thread-safe."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self._lock = threading.Lock()

    def reserve(self, n: int) -> bool:
        with self._lock:
            if self.used + n > self.limit:
                return False
            self.used += n
            return True

    def release(self, n: int) -> None:
        with self._lock:
            self.used -= n


# longer than 60 lines: the protocol class is defined inside, since uvicorn (the 'serve' extra) is
# imported only when a server starts, and its methods close over the two limits
def protocol_class(read_timeout: float, max_connections: int) -> type:
    """uvicorn's h11 protocol plus a header deadline and a connection cap, which uvicorn lacks.

    A connection must deliver a complete request head within ``read_timeout`` of opening (or of the
    first byte of its next request); else it is closed. A body left unread after the answer (a 401,
    a 413) must also finish within ``read_timeout``. Requests on connections opened past
    ``max_connections`` reach the app marked :data:`OVER_CAPACITY` (answered 503 and counted there,
    the probes still served), so the cap costs no request parsing of our own.
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class DeadlineH11Protocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                self.app_state = {**self.app_state, OVER_CAPACITY: True}
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._deadline is None and self.conn.their_state is h11.IDLE:
                self._arm()  # the first bytes of the next request on a kept-alive connection
            super().data_received(data)
            self._update()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._update()

        def _reading_leftover(self) -> bool:
            """Answered, but the client is still sending that request's body (uvicorn discards it)."""
            return self.conn.their_state is h11.SEND_BODY and (self.cycle is None or self.cycle.response_complete)

        def _update(self) -> None:
            state = self.conn.their_state
            if state is h11.IDLE:
                return  # head still coming (deadline armed) or an idle keep-alive (uvicorn's own timer)
            if self._reading_leftover():
                if self._deadline is None:
                    self._arm()
            else:
                self._disarm()  # head complete: the app reads the body under its own deadline

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(read_timeout, self._expired)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expired(self) -> None:
            self._deadline = None
            if (self.conn.their_state is h11.IDLE or self._reading_leftover()) and not self.transport.is_closing():
                log.info("[serve] closed a connection from %s: no complete request within %g s (--read-timeout)",
                         self.client and self.client[0], read_timeout)
                self.transport.close()

    return DeadlineH11Protocol
