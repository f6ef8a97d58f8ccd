"""Host side of the control channel: request/response over the framed protocol.

Calls are serialised by a lock (one request in flight at a time); every wait is bounded and
polls the VMM's liveness, so a dead or silent guest turns into :class:`GuestDied` or a
timeout instead of a hang. A frame that breaks the protocol closes the channel for good.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from ..errors import ProtocolError
from . import protocol

POLL = 0.25
FRAME_GRACE = 30.0
SEND_TIMEOUT = 60.0


class ChannelClosed(Exception):
    """The stream ended (the VMM went away)."""


class ReplyTimeout(Exception):
    """No reply arrived before the deadline."""


class Channel:
    """A request/response client for the guest agent."""

    def __init__(self, sock: socket.socket, alive: Callable[[], bool], max_body: int) -> None:
        self.sock = sock
        self.alive = alive
        self.max_body = max_body
        self.lock = threading.Lock()
        self._next_id = 0
        self._broken: str | None = None

    def poison(self, reason: str) -> None:
        """The peer broke the protocol (``reason``): refuse every later call and hang up."""
        self._broken = reason
        self.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def _reader(self, deadline: float | None) -> Callable[[int], bytes]:
        """A read_exact for one frame. The deadline only applies before the frame's first
        byte: once a frame has started it is read to the end (bounded by FRAME_GRACE), so a
        timeout never leaves the stream out of step."""
        frame_limit: float | None = None  # set once, when the frame's first byte arrives

        def read_exact(n: int) -> bytes:
            nonlocal frame_limit
            buf = bytearray()
            while len(buf) < n:
                now = time.monotonic()
                limit = deadline if frame_limit is None else frame_limit
                if limit is not None and now > limit:
                    if frame_limit is not None:
                        self._broken = "a frame stalled half-way"
                        raise ChannelClosed("a frame from the guest stalled half-way")
                    raise ReplyTimeout()
                wait = POLL if limit is None else max(0.001, min(POLL, limit - now))
                self.sock.settimeout(wait)
                try:
                    chunk = self.sock.recv(min(n - len(buf), 1 << 20))
                except TimeoutError:
                    if not self.alive():
                        raise ChannelClosed("VMM exited") from None
                    continue
                except OSError as exc:
                    raise ChannelClosed(str(exc)) from exc
                if not chunk:
                    raise ChannelClosed("control stream closed")
                if frame_limit is None:
                    frame_limit = max(deadline or now, now) + FRAME_GRACE
                buf += chunk
            return bytes(buf)

        return read_exact

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
        with self.lock:
            if self._broken:
                raise ProtocolError(f"control channel unusable: {self._broken}")
            self._next_id += 1
            rid = self._next_id
            try:
                self.sock.settimeout(max(SEND_TIMEOUT, timeout or 0.0))
                self.sock.sendall(protocol.encode({**header, "id": rid}, body))
            except OSError as exc:
                raise ChannelClosed(str(exc)) from exc
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                try:
                    reply, data = protocol.decode(self._reader(deadline), max_body or self.max_body)
                except protocol.FrameError as exc:
                    self.poison(str(exc))
                    raise ProtocolError(f"guest agent sent an invalid frame: {exc}") from None
                if type(reply.get("id")) is int and reply["id"] == rid:  # not True, not 1.0
                    return reply, data
                # A late reply to an earlier request that timed out: drop it.

