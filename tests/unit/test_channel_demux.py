"""Unit tests of the channel's demultiplexing: several requests in flight, frames routed by
id, every waiter woken when the stream ends (tests/unit/test_channel.py has the single-call
guarantees). The test plays the guest on a socketpair."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from test_channel import Guest, make_channel

from pytest_smolvm.errors import ProtocolError
from pytest_smolvm.guest import protocol
from pytest_smolvm.guest.channel import ChannelClosed, ReplyTimeout


@pytest.fixture
def guest() -> Iterator[Guest]:
    g = Guest()
    yield g
    g.close()
    for t in g.threads:
        t.join(timeout=5)


def test_replies_out_of_order_reach_their_callers(guest: Guest) -> None:
    chan = make_channel(guest)
    first = chan.start({"op": "exec"})
    second = chan.start({"op": "ping"})
    (r1, _), (r2, _) = guest.read_request(), guest.read_request()
    guest.send({"op": "pong", "id": r2["id"]}, b"two")
    assert chan.wait(second, 5) == ({"op": "pong", "id": r2["id"]}, b"two")
    assert not first.finished
    guest.send({"op": "result", "id": r1["id"]}, b"one")
    assert chan.wait(first, 5)[1] == b"one"
    chan.close()


def test_out_frames_go_to_on_frame_before_the_reply(guest: Guest) -> None:
    chan = make_channel(guest)
    seen: list[tuple[str, bytes]] = []
    pending = chan.start({"op": "exec"}, on_frame=lambda h, b: seen.append((h["op"], b)))
    req, _ = guest.read_request()
    guest.send({"op": "out", "id": req["id"], "stream": "stdout"}, b"a")
    guest.send({"op": "out", "id": req["id"] + 50, "stream": "stdout"}, b"nobody's")   # dropped
    guest.send({"op": "started", "id": req["id"], "pid": 3})
    guest.send({"op": "result", "id": req["id"]}, b"end")
    reply, body = chan.wait(pending, 5)
    assert (reply["op"], body) == ("result", b"end")
    assert seen == [("out", b"a"), ("started", b"")]
    chan.close()


def test_a_call_completes_while_another_request_waits(guest: Guest) -> None:
    chan = make_channel(guest)
    long = chan.start({"op": "exec"})
    guest.read_request()

    def serve() -> None:
        req, _ = guest.read_request()
        guest.send({"op": "pong", "id": req["id"]})

    guest.run(serve)
    assert chan.call({"op": "ping"}, timeout=5)[0]["op"] == "pong"
    with pytest.raises(ReplyTimeout):
        chan.wait(long, 0.1, abandon=False)   # still registered: its reply can still come
    assert not long.finished
    chan.close()
    with pytest.raises(ChannelClosed):
        chan.wait(long, 5)


def test_vmm_death_wakes_every_waiter(guest: Guest) -> None:
    dead = threading.Event()
    chan = make_channel(guest, alive=lambda: not dead.is_set())
    pendings = [chan.start({"op": "exec"}) for _ in range(3)]
    errors: list[BaseException] = []

    def waiter(p: Any) -> None:
        try:
            chan.wait(p, None)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=waiter, args=(p,)) for p in pendings]
    for t in threads:
        t.start()
    time.sleep(0.1)
    dead.set()
    for t in threads:
        t.join(timeout=3)
    assert not any(t.is_alive() for t in threads)
    assert [type(e) for e in errors] == [ChannelClosed] * 3
    assert all("VMM exited" in str(e) for e in errors)
    with pytest.raises(ChannelClosed):
        chan.start({"op": "ping"})


def test_wake_is_called_when_the_reply_comes_or_the_channel_ends(guest: Guest) -> None:
    chan = make_channel(guest)
    woke: list[int] = []
    done = chan.start({"op": "exec"}, wake=lambda: woke.append(1))
    never = chan.start({"op": "exec"}, wake=lambda: woke.append(2))
    req, _ = guest.read_request()
    guest.send({"op": "result", "id": req["id"]})
    chan.wait(done, 5)
    assert woke == [1]
    chan.close()
    assert woke == [1, 2] and never.failure is not None


def test_malformed_frame_fails_every_waiter_and_poisons(guest: Guest) -> None:
    chan = make_channel(guest)
    pendings = [chan.start({"op": "exec"}) for _ in range(2)]
    guest.sock.sendall(b"XX" + b"\0" * 20)
    for p in pendings:
        with pytest.raises(ProtocolError, match="magic"):
            chan.wait(p, 5)
    with pytest.raises(ProtocolError, match="unusable"):
        chan.start({"op": "ping"})


def test_on_frame_protocol_error_poisons(guest: Guest) -> None:
    chan = make_channel(guest)

    def strict(header: dict[str, Any], body: bytes) -> None:
        raise ProtocolError("bad out frame")

    pending = chan.start({"op": "exec"}, on_frame=strict)
    req, _ = guest.read_request()
    guest.send({"op": "out", "id": req["id"], "stream": "nope"}, b"x")
    with pytest.raises(ProtocolError, match="bad out frame"):
        chan.wait(pending, 5)
    with pytest.raises(ProtocolError, match="unusable"):
        chan.start({"op": "ping"})


def test_body_limit_is_the_request_s_own(guest: Guest) -> None:
    chan = make_channel(guest, max_body=100)
    big = chan.start({"op": "get"}, max_body=10_000)
    req, _ = guest.read_request()
    guest.send({"op": "ok", "id": req["id"]}, b"z" * 5000)
    assert len(chan.wait(big, 5)[1]) == 5000
    small = chan.start({"op": "get"}, max_body=10)
    req, _ = guest.read_request()
    guest.send({"op": "ok", "id": req["id"]}, b"z" * 11)
    with pytest.raises(ProtocolError, match="exceeds the limit of 10"):
        chan.wait(small, 5)


def test_late_reply_within_its_own_limit_is_dropped_quietly(guest: Guest) -> None:
    chan = make_channel(guest, max_body=100)
    slow = chan.start({"op": "get"}, max_body=10_000)
    req, _ = guest.read_request()
    with pytest.raises(ReplyTimeout):
        chan.wait(slow, 0.1)
    guest.sock.sendall(protocol.encode({"op": "ok", "id": req["id"]}, b"q" * 5000))   # late, big

    def serve() -> None:
        r, _ = guest.read_request()
        guest.send({"op": "pong", "id": r["id"]})

    guest.run(serve)
    assert chan.call({"op": "ping"}, timeout=5)[0]["op"] == "pong"
    chan.close()


def test_close_ends_the_reader_thread(guest: Guest) -> None:
    chan = make_channel(guest)
    chan.close()
    assert not chan._reader.is_alive()


def test_poison_fails_other_waiters_with_protocol_error(guest: Guest) -> None:
    """A malformed reply found by one caller: the others get ProtocolError, never ChannelClosed
    (which would read as the guest breaking off and destroy a VM whose VMM lives)."""
    chan = make_channel(guest)
    other = chan.start({"op": "exec"})
    chan.poison("a malformed exec reply")
    with pytest.raises(ProtocolError, match="malformed exec reply"):
        chan.wait(other, 5)


def test_quiesced_refuses_while_a_request_is_in_flight_and_holds_new_ones(guest: Guest) -> None:
    """checkpoint() saves the guest only when the agent has nothing to send: a request in
    flight (a spawn) or one given up on that may still answer makes quiesced() refuse; inside
    the block a new request waits until the block ends."""
    from pytest_smolvm.guest.channel import ChannelBusy

    chan = make_channel(guest)
    pending = chan.start({"op": "exec"})
    req, _ = guest.read_request()
    with pytest.raises(ChannelBusy, match="1 request"), chan.quiesced():
        pass
    with pytest.raises(ReplyTimeout):
        chan.wait(pending, 0.05)  # given up on: its late reply may still come
    with pytest.raises(ChannelBusy), chan.quiesced():
        pass
    guest.send({"op": "result", "id": req["id"]})  # the late reply: now nothing is in flight
    deadline = time.monotonic() + 5
    sent: list[Any] = []
    while True:
        try:
            with chan.quiesced():
                t = threading.Thread(target=lambda: sent.append(chan.start({"op": "ping"})))
                t.start()
                t.join(0.3)
                assert not sent  # held until the block ends
            break
        except ChannelBusy:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    t.join(5)
    assert sent and guest.read_request()[0]["op"] == "ping"
    chan.close()
