"""Host side of the control channel: requests and their replies over the framed protocol,
several in flight at once.

One reader thread per channel reads every frame and hands it to the request with the same
``id``: the final reply wakes the caller waiting for it; the frames a request receives before
it (``out``: a streamed command's output, ``started``: a spawned process runs) go to the
request's ``on_frame`` callback, in the reader thread. Frames for nobody (a reply to a request
that timed out) are dropped. Every wait is bounded and the reader polls the VMM's liveness,
so a dead or silent guest turns into :class:`ChannelClosed` for every waiter, or a timeout,
instead of a hang. A frame that breaks the protocol closes the channel for good.
"""

from __future__ import annotations

import collections
import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from ..errors import ProtocolError
from . import protocol

POLL = 0.25
FRAME_GRACE = 30.0
SEND_TIMEOUT = 60.0
#: Requests that timed out whose late replies are still recognised (and dropped) by id.
ABANDONED = 1024

#: Called in the reader thread with each non-final frame of a request (header, body). It must
#: not block; a ProtocolError it raises poisons the channel.
FrameHandler = Callable[[dict[str, Any], bytes], None]


class ChannelClosed(Exception):
    """The stream ended (the VMM went away)."""


class ReplyTimeout(Exception):
    """No reply arrived before the deadline."""


class Pending:
    """One request in flight: its final reply, once it came, or why it never will."""

    def __init__(self, rid: int, max_body: int, on_frame: FrameHandler | None,
                 wake: Callable[[], None] | None) -> None:
        self.id = rid
        self.max_body = max_body
        self.on_frame = on_frame
        #: Called (in the reader thread) when the reply arrived or the channel failed.
        self.wake = wake
        self.reply: tuple[dict[str, Any], bytes] | None = None
        self.failure: tuple[type[Exception], str] | None = None

    @property
    def finished(self) -> bool:
        return self.reply is not None or self.failure is not None


class ChannelBusy(Exception):
    """:meth:`Channel.quiesced` found requests in flight (the message says how many)."""


class Channel:
    """A multiplexing request/response client for the guest agent."""

    def __init__(self, sock: socket.socket, alive: Callable[[], bool], max_body: int) -> None:
        self.sock = sock
        self.alive = alive
        self.max_body = max_body
        sock.settimeout(POLL)  # the reader's: it checks the VMM's liveness between reads
        self._wsock = sock.dup()  # its own timeout: the reader's short one would cut long sends
        self._send_lock = threading.Lock()
        self._cond = threading.Condition()
        self._pending: dict[int, Pending] = {}
        self._abandoned: collections.OrderedDict[int, int] = collections.OrderedDict()
        self._next_id = 0
        self._broken: str | None = None
        self._closed: str | None = None
        self._closed_kind: type[Exception] = ChannelClosed
        self._frame_started: float | None = None
        self._reader = threading.Thread(target=self._read_loop, name="smolvm-channel", daemon=True)
        self._reader.start()

    # ------------------------------------------------------------------ ending

    def poison(self, reason: str) -> None:
        """The peer broke the protocol (``reason``): refuse every later call and hang up."""
        self._broken = self._broken or reason
        self._fail(ProtocolError, f"control channel unusable: {reason}")  # not ChannelClosed: the VMM lives
        self.close()

    def close(self) -> None:
        """Hang up. Waiters still in flight get :class:`ChannelClosed`."""
        self._fail(ChannelClosed, "the control channel was closed")
        self._hang_up()

    def _hang_up(self) -> None:
        for s in (self.sock, self._wsock):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._reader is not threading.current_thread():
            self._reader.join(timeout=POLL + 1.0)
        for s in (self.sock, self._wsock):
            try:
                s.close()
            except OSError:
                pass

    def _fail(self, kind: type[Exception], message: str) -> None:
        """End the channel: every request in flight (and every later one) fails with ``kind``."""
        with self._cond:
            if self._closed is None:
                self._closed, self._closed_kind = message, kind
            waiters = list(self._pending.values())
            for p in waiters:
                p.failure = p.failure or (kind, message)
            self._pending.clear()
            self._cond.notify_all()
        for p in waiters:
            if p.wake is not None:
                p.wake()

    # ------------------------------------------------------------------ reading

    def _read_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            started = self._frame_started
            if started is not None and time.monotonic() > started + FRAME_GRACE:
                self._broken = "a frame stalled half-way"
                raise ChannelClosed("a frame from the guest stalled half-way")
            try:
                chunk = self.sock.recv(min(n - len(buf), 1 << 20))
            except TimeoutError:
                if self._closed is not None:
                    raise ChannelClosed(self._closed) from None
                if not self.alive():
                    raise ChannelClosed("VMM exited") from None
                continue
            except OSError as exc:
                raise ChannelClosed(str(exc)) from exc
            if not chunk:
                raise ChannelClosed("control stream closed")
            if self._frame_started is None:
                self._frame_started = time.monotonic()
            buf += chunk
        return bytes(buf)

    def _body_limit(self, header: dict[str, Any]) -> int:
        rid = header.get("id")
        with self._cond:
            pending = self._pending.get(rid) if type(rid) is int else None
            if pending is not None:
                return pending.max_body
            return self._abandoned.get(rid, self.max_body) if type(rid) is int else self.max_body

    def _read_loop(self) -> None:
        try:
            while True:
                self._frame_started = None
                header, body = protocol.decode(self._read_exact, self._body_limit)
                self._frame_started = None
                self._dispatch(header, body)
        except ChannelClosed as exc:
            self._fail(ChannelClosed, str(exc))
        except protocol.FrameError as exc:
            self._broken = self._broken or str(exc)
            self._hang_up()  # before waking the waiters: whoever sees the error finds it closed
            self._fail(ProtocolError, f"guest agent sent an invalid frame: {exc}")
        except ProtocolError as exc:  # an on_frame handler found a malformed frame
            self._broken = self._broken or str(exc)
            self._hang_up()
            self._fail(ProtocolError, str(exc))
        except BaseException as exc:  # a bug: never leave waiters hanging on a dead reader
            self._fail(ChannelClosed, f"the channel's reader failed: {exc!r}")
            raise
        finally:
            self._frame_started = None

    def _dispatch(self, header: dict[str, Any], body: bytes) -> None:
        rid = header.get("id")
        if type(rid) is not int:  # not True, not 1.0
            return
        with self._cond:
            pending = self._pending.get(rid)
        if pending is None:  # a late reply (or output) for a request that timed out: dropped
            if header.get("op") not in ("out", "started"):
                with self._cond:
                    self._abandoned.pop(rid, None)  # answered at last: nothing of it runs on
            return
        if pending.on_frame is not None and header["op"] in ("out", "started"):
            pending.on_frame(header, body)
            return
        with self._cond:
            self._pending.pop(rid, None)
            pending.reply = (header, body)
            self._cond.notify_all()
        if pending.wake is not None:
            pending.wake()

    # ------------------------------------------------------------------ requests

    @contextlib.contextmanager
    def quiesced(self) -> Iterator[None]:
        """A block during which the agent has nothing to send: no request is in flight (an
        unanswered one, e.g. a spawned process, raises :class:`ChannelBusy`) and none is sent
        until the block ends. For saving the guest's state: a frame the agent had half-written
        would reach a clone's host as the tail of a frame and break its channel."""
        with self._send_lock:
            with self._cond:
                busy = [p.id for p in self._pending.values()] + list(self._abandoned)
            if busy:
                raise ChannelBusy(f"{len(busy)} request(s) to the guest agent still in flight")
            yield

    def start(self, header: dict[str, Any], body: bytes = b"", *, max_body: int | None = None,
              on_frame: FrameHandler | None = None, wake: Callable[[], None] | None = None,
              send_timeout: float = SEND_TIMEOUT) -> Pending:
        """Send one request; :meth:`wait` for its reply. ``on_frame`` receives the request's
        ``out``/``started`` frames; ``wake`` is called once it finished (both in the reader thread)."""
        with self._cond:
            if self._broken:
                raise ProtocolError(f"control channel unusable: {self._broken}")
            if self._closed is not None:
                raise self._closed_kind(self._closed)
            self._next_id += 1
            pending = Pending(self._next_id, max_body or self.max_body, on_frame, wake)
            self._pending[pending.id] = pending
        try:
            with self._send_lock:
                self._wsock.settimeout(send_timeout)
                self._wsock.sendall(protocol.encode({**header, "id": pending.id}, body))
        except OSError as exc:
            with self._cond:
                self._pending.pop(pending.id, None)
            raise ChannelClosed(str(exc)) from exc
        return pending

    def wait(self, pending: Pending, timeout: float | None, *, abandon: bool = True) -> tuple[dict[str, Any], bytes]:
        """The reply to ``pending``.

        Raises :class:`ReplyTimeout` if none came within ``timeout`` seconds (a frame that
        started arriving before then is waited for); with ``abandon`` the request is then
        forgotten and its late reply dropped. Raises :class:`ChannelClosed` (the VMM is gone)
        or :class:`~pytest_smolvm.errors.ProtocolError` if the channel ended.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if pending.reply is not None:
                    return pending.reply
                if pending.failure is not None:
                    kind, message = pending.failure
                    raise kind(message)
                now = time.monotonic()
                if deadline is not None and now >= deadline and self._frame_started is None:
                    if abandon:
                        self._abandon(pending)
                    raise ReplyTimeout()
                self._cond.wait(POLL if deadline is None or now >= deadline else min(POLL, deadline - now))

    def _abandon(self, pending: Pending) -> None:
        """Forget ``pending`` (call with the condition held); its late reply will be dropped."""
        if self._pending.pop(pending.id, None) is not None:
            self._abandoned[pending.id] = pending.max_body
            while len(self._abandoned) > ABANDONED:
                self._abandoned.popitem(last=False)

    def forget(self, pending: Pending) -> None:
        """Stop waiting for ``pending`` for good (its reply and frames will be dropped)."""
        with self._cond:
            self._abandon(pending)

    def call(
        self,
        header: dict[str, Any],
        body: bytes = b"",
        *,
        timeout: float | None,
        max_body: int | None = None,
    ) -> tuple[dict[str, Any], bytes]:
        """Send one request and wait for its reply.

        Raises :class:`ReplyTimeout` (no reply in time; the channel stays usable and a late
        reply is discarded), :class:`ChannelClosed` (the VMM is gone) or
        :class:`~pytest_smolvm.errors.ProtocolError`.
        """
        pending = self.start(header, body, max_body=max_body, send_timeout=max(SEND_TIMEOUT, timeout or 0.0))
        return self.wait(pending, timeout)
