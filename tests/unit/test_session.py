"""GuestSession: the one place channel errors become ours (issue 21), tested with a fake VMM
and ops that fail the way the channel does."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_smolvm.errors import GuestDied, GuestTimeout, SmolVMError
from pytest_smolvm.guest.channel import ChannelBusy, ChannelClosed, ReplyTimeout
from pytest_smolvm.guest.client import GuestClient
from pytest_smolvm.session import GuestSession


class FakeMachine:
    """A VMM that has exited with ``status`` (None: still runs until killed)."""

    def __init__(self, tmp: Path, status: int | None) -> None:
        self.status = status
        self.killed = 0
        self.console_path = tmp / "console.log"
        self.console_path.write_text("boot line\nlast line\n")

    def exit_status(self) -> int | None:
        return self.status

    def alive(self) -> bool:
        return self.status is None

    def kill(self) -> None:
        self.killed += 1
        if self.status is None:
            self.status = -9


@pytest.fixture
def pair() -> Iterator[socket.socket]:
    host, guest = socket.socketpair()
    yield host
    host.close()
    guest.close()


def session_on(sock: socket.socket, machine: FakeMachine | None) -> GuestSession:
    session = GuestSession.attach("vm1", sock, max_body=1 << 20)
    session.machine = machine  # type: ignore[assignment]
    return session


def raising(exc: Exception):  # type: ignore[no-untyped-def]
    def op(guest: GuestClient) -> None:
        raise exc
    return op


def test_no_reply_is_a_guest_timeout_naming_the_wait(pair: socket.socket) -> None:
    session = session_on(pair, None)
    with pytest.raises(GuestTimeout, match=r"vm1: get\('/x'\): the guest agent did not answer within 7s"):
        session.call("get('/x')", raising(ReplyTimeout("late")), wait=7)


def test_no_reply_raises_the_callers_error_when_given(pair: socket.socket) -> None:
    session = session_on(pair, None)
    with pytest.raises(KeyError, match="mine"):
        session.call("run", raising(ReplyTimeout("late")), on_timeout=lambda: KeyError("mine"))
    assert session.ended is None  # a timeout does not end the session


@pytest.mark.parametrize(("status", "why", "infra"), [
    (0, "the guest powered off or panicked", False),
    (3, r"the VMM died \(exit status 3\)", True),
    (None, "broke off its reply while the VM ran on; the VM was destroyed", False),
])
def test_a_closed_stream_is_guest_died_saying_why(pair: socket.socket, tmp_path: Path, status: int | None,
                                                 why: str, infra: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("pytest_smolvm.session.EXIT_GRACE", 0.05)
    machine = FakeMachine(tmp_path, status)
    session = session_on(pair, machine)
    with pytest.raises(GuestDied, match=why) as info:
        session.call("run('x')", raising(ChannelClosed("gone")))
    assert info.value.infra is infra
    assert "last line" in (info.value.console_tail or "")
    assert machine.status == (-9 if status is None else status)  # a VMM still running is destroyed
    assert session.ended == "dead" and not session.alive
    with pytest.raises(SmolVMError, match=r"not running \(state dead\); cannot get"):
        session.call("get", raising(AssertionError("must not be called")))


def test_expiry_is_named_in_flight_and_after(pair: socket.socket, tmp_path: Path) -> None:
    machine = FakeMachine(tmp_path, None)
    session = session_on(pair, machine)
    session.expire("the VM exceeded its lifetime of 5s and was destroyed")
    assert machine.killed == 1
    with pytest.raises(GuestDied, match=r"run\('x'\) stopped: the VM exceeded its lifetime of 5s"):
        session.call("run('x')", raising(ChannelClosed("gone")))
    with pytest.raises(GuestDied, match=r"cannot put: the VM exceeded its lifetime of 5s .*\(config lifetime\)"):
        session.call("put", raising(AssertionError("must not be called")))


def test_close_refuses_later_calls_and_keeps_the_console(pair: socket.socket, tmp_path: Path) -> None:
    machine = FakeMachine(tmp_path, None)
    session = session_on(pair, machine)
    session.console_prefix = "snapshot log\n"
    session.close()
    kills = machine.killed
    assert kills >= 1 and not machine.alive()
    machine.console_path.unlink()  # the VM directory is removed after close
    assert session.console() == "snapshot log\nboot line\nlast line\n"
    with pytest.raises(SmolVMError, match=r"vm1 is not running \(state closed\); cannot run"):
        session.call("run", raising(AssertionError("must not be called")))
    session.close()  # idempotent: the VMM is not killed again
    assert machine.killed == kills


def test_busy_channel_raises_the_callers_error(pair: socket.socket, monkeypatch: pytest.MonkeyPatch) -> None:
    session = session_on(pair, None)

    def busy() -> None:
        raise ChannelBusy("1 request in flight")

    monkeypatch.setattr(session.client.channel, "quiesced", busy)
    with pytest.raises(LookupError, match="idle, but 1 request in flight"), \
            session.quiesced(lambda why: LookupError(f"idle, but {why}")):
        pass
