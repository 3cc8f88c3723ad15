"""uvicorn's h11 protocol with the connection limits ``ferret serve`` needs below the app.

uvicorn has no header deadline; it counts a TLS connection only once its handshake is done
(asyncio's handshake timeout is 60 s); it closes a connection right after an answer that refuses
an upload, so the client reads a reset instead of the answer; and its ``limit_concurrency``
answers 503 before the app (uncounted, the probes refused too). Here:

- Every connection is counted from accept, TLS handshake included (this protocol runs the handshake
  itself), in one of two phases. *Idle*: no request in progress (handshake, head arriving,
  keep-alive, lingering). Idle connections are cheap on an event loop, so they are budgeted apart:
  past ``max_idle_connections`` the oldest one is closed to make room, and each must deliver a
  complete request head within ``read_timeout`` of accept (or of the first byte of its next
  request). *Working*: a head received and not yet answered; a request that starts while
  ``max_connections`` others are working reaches the app marked OVER_CAPACITY (answered 503 and
  counted there, the probes still served). So idle or slow connections never lock ordinary
  clients out.
- Refusals are answers: a head over ``max_header_kb`` gets 431 and a malformed one 400 (JSON,
  counted); after an answer that leaves the client sending (an early 413, a 408), the connection
  lingers as nginx's does: shut for writing (plain TCP), what arrives discarded, closed when the client closes
  or after ``read_timeout``, so the client reads the answer rather than a reset.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Callable
from typing import Any

from .http_limits import OVER_CAPACITY, ServerLimits, log


class Census:
    """One server's connections: the ``idle`` ones, oldest first, and how many are ``working``."""

    def __init__(self) -> None:
        self.idle: dict[Any, None] = {}
        self.working = 0


class ClosingTransport:
    """A connection's transport as uvicorn sees it: ``close()`` asks the protocol, which may linger."""

    def __init__(self, transport: asyncio.Transport, protocol: Any):
        self.transport, self.protocol = transport, protocol

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)

    def is_closing(self) -> bool:
        return self.protocol.lingering or self.transport.is_closing()

    def close(self) -> None:
        self.protocol.close_after_answer()


def error_events(status: int, reason: bytes, message: str) -> list[Any]:
    """The h11 events of a JSON error answer that closes the connection."""
    import h11

    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]
    return [h11.Response(status_code=status, headers=headers, reason=reason), h11.Data(data=body), h11.EndOfMessage()]


# longer than 60 lines: the protocol class is defined inside, since uvicorn (the 'serve' extra) is
# imported only when a server starts, and its methods close over the limits and the census
def protocol_class(read_timeout: float, limits: ServerLimits, tls: ssl.SSLContext | None,
                   answered: Callable[[int, str], None], closed: Callable[[str], None]) -> type:
    """The protocol class for ``uvicorn.Config(http=...)``; ``answered(status, kind)`` counts the answers
    it gives itself (400, 431), ``closed(reason)`` the connections it closes unanswered."""
    import h11
    from uvicorn.protocols.http.h11_impl import STATUS_PHRASES, H11Protocol

    census = Census()
    max_head = int(limits.max_header_kb * 1024)
    step = min(max_head, 1024)

    class RecordingConnection(h11.Connection):
        """h11's connection, keeping the protocol error that uvicorn answers with a bare 400."""

        error: h11.RemoteProtocolError | None = None

        def next_event(self) -> Any:
            try:
                return super().next_event()
            except h11.RemoteProtocolError as e:
                self.error = e
                raise

    class LimitedH11Protocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None
        _real: Any = None  # the transport itself: raw TCP until the TLS handshake is done
        _early: list[bytes] | None = None  # TLS data delivered before start_tls returned
        _busy = _counted = _shutting_down = _lost = False
        lingering = False

        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.conn = RecordingConnection(h11.SERVER, max_head)
            self._state = self.app_state

        # ---------------------------------------------------------------------- open and close
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            self._real = transport
            self.connections.add(self)
            self._to_idle()
            self._arm()  # from accept: a TLS handshake spends the same deadline as the head
            if tls is None:
                self._open(transport)
            else:
                self._early = []
                self.loop.create_task(self._handshake(transport))

        def _open(self, transport: Any) -> None:
            self._real = transport
            super().connection_made(ClosingTransport(transport, self))

        async def _handshake(self, raw: Any) -> None:
            secure = None
            if not raw.is_closing():  # else evicted or expired before this task ran
                try:
                    secure = await self.loop.start_tls(raw, self, tls, server_side=True,
                                                       ssl_handshake_timeout=read_timeout,
                                                       ssl_shutdown_timeout=read_timeout)
                except Exception as e:  # any failed handshake (SSLError, reset, timeout) closes this connection only
                    log.debug("[serve] TLS handshake with %s failed: %r", raw.get_extra_info("peername"), e)
            if secure is None or self._lost:  # start_tls gives None when the client closed during the handshake
                self._close_unanswered("tls_handshake", abort=True)
                self._forget()
                return
            early, self._early = self._early or [], None
            self._open(secure)
            for data in early:
                self.data_received(data)

        def connection_lost(self, exc: Exception | None) -> None:
            self._lost = True  # also when the handshake is done and _handshake has yet to open the connection
            self._forget()
            if self.transport is not None:  # else closed during its TLS handshake: uvicorn never saw it
                super().connection_lost(exc)

        def shutdown(self) -> None:
            self._shutting_down = True
            if self.transport is None or self.lingering:
                self._real.abort()
            else:
                super().shutdown()

        def close_after_answer(self) -> None:
            """uvicorn closes after an answer; while the client may still be sending, linger first."""
            t = self._real
            if self.lingering or t.is_closing():
                return
            if self._shutting_down or self.conn.their_state not in (h11.SEND_BODY, h11.ERROR):
                t.close()  # nothing more to come
                return
            self.lingering = True
            self._disarm()
            t.resume_reading()
            if t.can_write_eof():  # not over TLS, where the client reads the answer by its length
                t.write_eof()
            self._deadline = self.loop.call_later(read_timeout, t.close)
            self._track()

        def _close_unanswered(self, reason: str, abort: bool = False) -> None:
            if not self._counted:
                self._counted = True
                closed(reason)
            self._real.abort() if abort else self._real.close()

        # ---------------------------------------------------------------------- reading
        def data_received(self, data: bytes) -> None:
            if self._early is not None:
                self._early.append(data)
                return
            if self.lingering:
                return  # answered: what the client still sends is discarded
            if self.conn.their_state is h11.IDLE:
                if self._deadline is None:
                    self._arm()  # the first bytes of the next request on a kept-alive connection
                self._mark()
                if len(data) > step:
                    self._feed_head(memoryview(data))
                    self._after()
                    return
            super().data_received(data)
            self._after()

        def _feed_head(self, view: memoryview) -> None:
            # h11 checks an incomplete head against max_head once per call: fed in slices, a head that
            # arrives in one large read is held to the same limit (within a slice)
            i = 0
            while i < len(view) and self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                super().data_received(view[i:i + step])
                i += step
            if i < len(view) and not self.transport.is_closing():
                super().data_received(view[i:])

        def send_400_response(self, msg: str) -> None:
            err = self.conn.error
            status = err.error_status_hint if err is not None else 400  # h11 hints 431 for a head too long
            if status == 431:
                kind, message = "header_too_large", (f"Received a request head over {max_head} bytes; expected at "
                                                     "most that (--max-header-kb)")
            else:
                status, kind = 400, "bad_request"
                message = f"Received an invalid HTTP/1.1 request ({str(err or msg)[:200]}); expected a well-formed one"
            answered(status, kind)
            try:
                for event in error_events(status, STATUS_PHRASES[status], message):
                    self.transport.write(self.conn.send(event))
            except h11.LocalProtocolError:  # in the middle of an answer: nothing more can be said
                pass
            self.transport.close()

        def on_response_complete(self) -> None:
            self._track()  # answered: idle again before a pipelined request is marked
            self._mark()
            super().on_response_complete()
            self._after()

        # ---------------------------------------------------------------------- phases
        def _mark(self) -> None:
            """Decide before a request starts whether it is past the cap on working connections."""
            over = census.working >= limits.max_connections
            if over != self.app_state.get(OVER_CAPACITY, False):
                self.app_state = {**self._state, OVER_CAPACITY: True} if over else self._state

        def _after(self) -> None:
            self._update()
            self._track()

        def _track(self) -> None:
            busy = self.cycle is not None and not self.cycle.response_complete and not self.lingering
            if busy != self._busy:
                self._busy = busy
                if busy:
                    census.idle.pop(self, None)
                    census.working += 1
                else:
                    census.working -= 1
                    self._to_idle()

        def _to_idle(self) -> None:
            census.idle.pop(self, None)
            census.idle[self] = None  # the newest
            while len(census.idle) > limits.max_idle_connections:
                oldest = next(iter(census.idle))
                census.idle.pop(oldest)
                log.debug("[serve] closed an idle connection: over --max-idle-connections")
                oldest._close_unanswered("evicted", abort=True)

        def _forget(self) -> None:
            self._disarm()
            census.idle.pop(self, None)
            if self._busy:
                self._busy = False
                census.working -= 1
            self.connections.discard(self)

        # ---------------------------------------------------------------------- deadlines
        def _reading_leftover(self) -> bool:
            """Answered, but the client is still sending that request's body (uvicorn discards it)."""
            return self.conn.their_state is h11.SEND_BODY and (self.cycle is None or self.cycle.response_complete)

        def _update(self) -> None:
            if self.lingering or self.conn.their_state is h11.IDLE:
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
            if self.transport is None:
                self._close_unanswered("header_timeout", abort=True)  # still in its TLS handshake
            elif (self.conn.their_state is h11.IDLE or self._reading_leftover()) and not self._real.is_closing():
                log.info("[serve] closed a connection from %s: no complete request within %g s (--read-timeout)",
                         self.client and self.client[0], read_timeout)
                self._close_unanswered("header_timeout")

    return LimitedH11Protocol
