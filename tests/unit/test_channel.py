"""Unit tests of pytest_smolvm.guest.channel over a socketpair; the test plays the guest."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sockpeer import recv_exact

from pytest_smolvm.errors import ProtocolError
from pytest_smolvm.guest import channel as channel_mod
from pytest_smolvm.guest import protocol
from pytest_smolvm.guest.channel import POLL, Channel, ChannelClosed, ReplyTimeout

MAX_BODY = 1 << 20


class Guest:
    """The guest end of a socketpair, driven by the test from helper threads."""

    def __init__(self) -> None:
        self.host_sock, self.sock = socket.socketpair()
        self.sock.settimeout(10)
        self.threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []
        self.requests: list[tuple[dict[str, Any], bytes]] = []

    def read_request(self) -> tuple[dict[str, Any], bytes]:
        req = protocol.decode(lambda n: recv_exact(self.sock, n), MAX_BODY)
        self.requests.append(req)
        return req

    def send(self, header: dict[str, Any], body: bytes = b"") -> None:
        self.sock.sendall(protocol.encode(header, body))

    def run(self, fn: Callable[[], None]) -> None:
        def wrapper() -> None:
            try:
                fn()
            except BaseException as exc:  # reported by the fixture
                self.errors.append(exc)

        t = threading.Thread(target=wrapper, daemon=True)
        t.start()
        self.threads.append(t)

    def close(self) -> None:
        for s in (self.sock, self.host_sock):
            try:
                s.close()
            except OSError:
                pass


@pytest.fixture
def guest() -> Iterator[Guest]:
    g = Guest()
    yield g
    g.close()
    for t in g.threads:
        t.join(timeout=5)
    for exc in g.errors:
        if not isinstance(exc, (EOFError, OSError)):  # the host may close first on purpose
            raise exc


def make_channel(guest: Guest, alive: Callable[[], bool] = lambda: True, max_body: int = MAX_BODY) -> Channel:
    return Channel(guest.host_sock, alive, max_body)


def test_call_returns_matching_reply_and_body(guest: Guest) -> None:
    def serve() -> None:
        req, body = guest.read_request()
        guest.send({"op": "pong", "id": req["id"], "got": req["op"]}, body[::-1])

    guest.run(serve)
    chan = make_channel(guest)
    reply, data = chan.call({"op": "ping"}, b"abc", timeout=5)
    assert reply["op"] == "pong"
    assert reply["got"] == "ping"
    assert data == b"cba"
    (req, body), = guest.requests
    assert req["id"] == reply["id"]
    assert body == b"abc"


def test_ids_increase_per_call(guest: Guest) -> None:
    def serve() -> None:
        for _ in range(3):
            req, _ = guest.read_request()
            guest.send({"op": "ok", "id": req["id"]})

    guest.run(serve)
    chan = make_channel(guest)
    ids = [chan.call({"op": "ping"}, timeout=5)[0]["id"] for _ in range(3)]
    assert len(set(ids)) == 3
    assert ids == sorted(ids)


def test_stale_reply_is_skipped(guest: Guest) -> None:
    def serve() -> None:
        req, _ = guest.read_request()
        guest.send({"op": "ok", "id": req["id"] - 1, "which": "stale"}, b"old")
        guest.send({"op": "ok", "id": req["id"] + 1000, "which": "bogus"}, b"odd")
        guest.send({"op": "ok", "id": req["id"], "which": "right"}, b"new")

    guest.run(serve)
    reply, data = make_channel(guest).call({"op": "ping"}, timeout=5)
    assert reply["which"] == "right"
    assert data == b"new"


def test_timeout_then_late_reply_is_discarded(guest: Guest) -> None:
    first_seen = threading.Event()
    release = threading.Event()

    def serve() -> None:
        req1, _ = guest.read_request()
        first_seen.set()
        release.wait(10)
        req2, _ = guest.read_request()
        # The reply to the timed-out call arrives late, just before the current one.
        guest.send({"op": "ok", "id": req1["id"], "for": 1}, b"late")
        guest.send({"op": "ok", "id": req2["id"], "for": 2}, b"current")

    guest.run(serve)
    chan = make_channel(guest)
    started = time.monotonic()
    with pytest.raises(ReplyTimeout):
        chan.call({"op": "exec"}, timeout=0.2)
    elapsed = time.monotonic() - started
    assert 0.15 <= elapsed < 2
    assert first_seen.is_set()
    release.set()
    reply, data = chan.call({"op": "exec"}, timeout=5)
    assert reply["for"] == 2
    assert data == b"current"


def test_reply_timeout_without_any_reply_is_quick(guest: Guest) -> None:
    chan = make_channel(guest)
    for _ in range(2):  # and the channel stays usable for the next call
        started = time.monotonic()
        with pytest.raises(ReplyTimeout):
            chan.call({"op": "ping"}, timeout=0.2)
        assert time.monotonic() - started < 2


def test_frame_started_before_deadline_is_read_to_the_end(guest: Guest) -> None:
    def serve() -> None:
        req, _ = guest.read_request()
        frame = protocol.encode({"op": "ok", "id": req["id"]}, b"x" * 100)
        guest.sock.sendall(frame[:7])
        time.sleep(0.5)  # past the call's deadline
        guest.sock.sendall(frame[7:])

    guest.run(serve)
    reply, data = make_channel(guest).call({"op": "ping"}, timeout=0.25)
    assert reply["op"] == "ok"
    assert data == b"x" * 100


def test_peer_close_raises_channel_closed(guest: Guest) -> None:
    def serve() -> None:
        guest.read_request()
        guest.sock.close()

    guest.run(serve)
    started = time.monotonic()
    with pytest.raises(ChannelClosed):
        make_channel(guest).call({"op": "ping"}, timeout=5)
    assert time.monotonic() - started < 2


def test_peer_close_mid_frame_raises_channel_closed(guest: Guest) -> None:
    def serve() -> None:
        req, _ = guest.read_request()
        guest.sock.sendall(protocol.encode({"op": "ok", "id": req["id"]}, b"body")[:-2])
        guest.sock.close()

    guest.run(serve)
    with pytest.raises(ChannelClosed):
        make_channel(guest).call({"op": "ping"}, timeout=5)


def test_send_to_closed_peer_raises_channel_closed(guest: Guest) -> None:
    guest.sock.close()
    with pytest.raises(ChannelClosed):
        make_channel(guest).call({"op": "ping"}, b"x" * 1000, timeout=1)


def test_garbage_breaks_channel_for_good(guest: Guest) -> None:
    def serve() -> None:
        guest.read_request()
        guest.sock.sendall(b"XX" + b"\x00" * 20)

    guest.run(serve)
    chan = make_channel(guest)
    with pytest.raises(ProtocolError, match="magic"):
        chan.call({"op": "ping"}, timeout=5)
    # Every later call fails the same way, without touching the stream.
    for _ in range(2):
        with pytest.raises(ProtocolError, match="unusable"):
            chan.call({"op": "ping"}, timeout=5)
    assert chan.sock.fileno() == -1  # the channel closed its socket


def test_oversize_body_rejected_without_reading_it(guest: Guest) -> None:
    def serve() -> None:
        req, _ = guest.read_request()
        header = protocol.dumps({"op": "ok", "id": req["id"]}).encode()
        # Announce a 1 GiB body but never send it: reading it would block until the timeout.
        guest.sock.sendall(protocol.PREFIX.pack(protocol.MAGIC, len(header), 1 << 30) + header)

    guest.run(serve)
    chan = make_channel(guest, max_body=1024)
    started = time.monotonic()
    with pytest.raises(ProtocolError, match="exceeds"):
        chan.call({"op": "get"}, timeout=10)
    assert time.monotonic() - started < 2
    with pytest.raises(ProtocolError):
        chan.call({"op": "ping"}, timeout=1)


def test_per_call_max_body_override(guest: Guest) -> None:
    def serve() -> None:
        req, _ = guest.read_request()
        guest.send({"op": "ok", "id": req["id"]}, b"y" * 200)

    guest.run(serve)
    chan = make_channel(guest, max_body=MAX_BODY)
    with pytest.raises(ProtocolError, match="200"):
        chan.call({"op": "get"}, timeout=5, max_body=100)


def test_dead_vmm_raises_channel_closed_within_poll(guest: Guest) -> None:
    chan = make_channel(guest, alive=lambda: False)
    started = time.monotonic()
    with pytest.raises(ChannelClosed, match="VMM"):
        chan.call({"op": "ping"}, timeout=None)
    assert time.monotonic() - started < POLL + 1.0


def test_vmm_dying_later_is_noticed(guest: Guest) -> None:
    dies_at = time.monotonic() + 0.3
    chan = make_channel(guest, alive=lambda: time.monotonic() < dies_at)
    with pytest.raises(ChannelClosed):
        chan.call({"op": "ping"}, timeout=30)
    elapsed_after_death = time.monotonic() - dies_at
    assert -0.05 <= elapsed_after_death < POLL + 1.0


def test_half_frame_stall_is_bounded(guest: Guest, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(channel_mod, "FRAME_GRACE", 0.3)

    def serve() -> None:
        req, _ = guest.read_request()
        guest.sock.sendall(protocol.encode({"op": "ok", "id": req["id"]}, b"body")[:5])

    guest.run(serve)
    # Safety net so the test itself can never hang: the "VMM" dies after 1.5 s.
    dies_at = time.monotonic() + 1.5
    chan = make_channel(guest, alive=lambda: time.monotonic() < dies_at)
    started = time.monotonic()
    with pytest.raises(ChannelClosed) as info:
        chan.call({"op": "ping"}, timeout=0.2)
    elapsed = time.monotonic() - started
    assert "stalled" in str(info.value)
    assert elapsed < 1.2
    # The stream is out of step now, so the channel must refuse further calls.
    with pytest.raises(ProtocolError):
        chan.call({"op": "ping"}, timeout=0.2)
