"""The running guest: one VMM process and the agent client on its control channel.

A :class:`GuestSession` is what a boot returns (:mod:`.boot`) and what commands
(:mod:`.commands`), processes (:mod:`.process`), file transfer (:mod:`.transfer`) and
checkpoints talk to the guest through. It is the one module outside :mod:`.guest` that knows
the channel layer, and :meth:`GuestSession.call` is the one place its errors become ours (as
httpx maps httpcore's in ``map_httpcore_exceptions``):

- the control stream ends under a call: :class:`~pytest_smolvm.errors.GuestDied`, saying
  whether the guest powered off or panicked, broke off a frame (the VM is destroyed), outlived
  its lifetime, or the VMM itself died (``infra``);
- no reply in time: :class:`~pytest_smolvm.errors.GuestTimeout`, or the caller's own error
  (``on_timeout``: ``run()`` raises CommandTimeout);
- a malformed frame is already a ProtocolError (the channel raises ours).

While booting, :meth:`GuestSession.hello` maps the same failures to BootError.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from .drivers.base import Machine
from .drivers.consolelog import read_bounded
from .errors import BootError, GuestDied, GuestTimeout, ProtocolError, SmolVMError
from .guest.channel import POLL, Channel, ChannelBusy, ChannelClosed, Pending, ReplyTimeout
from .guest.client import GuestClient
from .reporting import tail

# What callers of a session need of the channel layer, named here so they import no more of it.
__all__ = ["EXIT_GRACE", "POLL", "GuestSession", "Pending"]

T = TypeVar("T")
#: How long a VMM whose control stream closed may take to exit by itself.
EXIT_GRACE = 3.0
#: How long connecting to a VMM's control socket may take.
CONNECT_TIMEOUT = 10.0


def _same(text: str) -> str:
    return text


class GuestSession:
    """One running guest of the VM ``name``: its ``machine`` (None for a VM this process did
    not start, as ``shell`` reaches a kept one) and the agent ``client``. ``redact`` masks the
    VM's secrets in the console text a GuestDied carries."""

    def __init__(self, name: str, client: GuestClient, machine: Machine | None = None, *,
                 console_prefix: str = "", redact: Callable[[str], str] = _same) -> None:
        self.name = name
        self.client = client
        self.machine = machine
        #: What the console starts with (a clone's: its snapshot's boot log).
        self.console_prefix = console_prefix
        self.redact = redact
        #: None while calls are taken; else why not ("dead", "closed", "detached").
        self.ended: str | None = None
        self._expired: str | None = None
        self._console: str | None = None  # kept once the VMM is gone

    @classmethod
    def open(cls, name: str, machine: Machine, *, max_body: int, console_prefix: str = "",
             redact: Callable[[str], str] = _same) -> GuestSession:
        """Connect to ``machine``'s agent (the handshake is :meth:`hello`)."""
        return cls(name, _client(machine.connect(timeout=CONNECT_TIMEOUT), machine.alive, max_body), machine,
                   console_prefix=console_prefix, redact=redact)

    @classmethod
    def attach(cls, name: str, sock: socket.socket, *, max_body: int) -> GuestSession:
        """A session on a connected control stream of a VM this process did not start."""
        return cls(name, _client(sock, lambda: True, max_body))

    def __repr__(self) -> str:
        return f"<GuestSession {self.name} {self.ended or 'open'}>"

    @property
    def alive(self) -> bool:
        return self.ended is None and (self.machine is None or self.machine.alive())

    # ------------------------------------------------------------------ calls

    def call(self, what: str, op: Callable[[GuestClient], T], *, wait: float | None = None,
             on_timeout: Callable[[], Exception] | None = None) -> T:
        """``op`` on the agent client, its channel errors mapped to ours. ``what`` names the
        call in messages; ``wait`` is how long ``op`` waits for its reply (said in the
        GuestTimeout), ``on_timeout`` makes the error raised instead of GuestTimeout."""
        if self.ended is not None:
            if self._expired and self.ended == "dead":
                raise GuestDied(f"{self.name}: cannot {what}: {self._expired} (config lifetime)")
            raise SmolVMError(f"{self.name} is not running (state {self.ended}); cannot {what}")
        try:
            return op(self.client)
        except ReplyTimeout:
            if on_timeout is not None:
                raise on_timeout() from None
            within = f" within {wait:.0f}s" if wait is not None else ""
            raise GuestTimeout(f"{self.name}: {what}: the guest agent did not answer{within} (the guest is "
                               f"overloaded or its agent was stopped)") from None
        except ChannelClosed as exc:
            raise self._died(what, exc) from None

    def _died(self, what: str, exc: ChannelClosed) -> GuestDied:
        """The control stream ended during ``what``: end the session and say why."""
        status, killed = None, False
        # After a guest poweroff, judge how it ended only once the VMM has exited.
        if self.machine is not None and (status := self.exit_status()) is None:
            # The VMM lives but its guest broke off (a frame stalled half-way): the guest's
            # doing, so it is destroyed and the test fails (not an ERROR).
            killed = True
            self.machine.kill()
            status = self.machine.exit_status()
        self.ended = "dead"
        console = self.redact(self.console_tail())
        if self._expired:
            return GuestDied(f"{self.name}: {what} stopped: {self._expired} (config lifetime)", console)
        # A guest poweroff or panic (panic=-1 reboots, -no-reboot exits) ends QEMU with 0;
        # anything else the VMM did by itself means the VMM itself died.
        if self.machine is None:  # a VM this process did not start: its VMM is not ours to judge
            return GuestDied(f"{self.name}: the control stream closed during {what} ({exc})", console)
        if killed:
            why = "the guest agent broke off its reply while the VM ran on; the VM was destroyed"
        elif status == 0:
            why = "the guest powered off or panicked"
        else:
            why = f"the VMM died (exit status {status}): an infrastructure failure, not the test's"
        return GuestDied(f"{self.name}: the guest stopped during {what}: {why} ({exc})", console,
                         infra=not killed and status != 0)

    def hello(self, t0: float, timeout: float) -> None:
        """The agent's handshake, due ``timeout`` seconds after ``t0``: BootError if it does
        not come, or the VM stops first (with the VMM's status and the console's tail)."""
        assert self.machine is not None
        try:
            self.client.hello(timeout=max(timeout - (time.monotonic() - t0), 1.0))
        except ReplyTimeout:
            raise BootError(f"{self.name}: the guest agent did not answer within {timeout:.0f}s "
                            f"(accel {self.machine.accel.name})", self.console_tail()) from None
        except (ChannelClosed, ProtocolError) as exc:
            self.exit_status()  # a panic's reboot under -no-reboot: let QEMU exit, so its last lines are read
            raise BootError(f"{self.name}: the VM stopped while booting ({exc}); VMM status "
                            f"{self.machine.exit_status()}; {self.machine.diagnostics()}",
                            self.console_tail()) from None

    @contextlib.contextmanager
    def quiesced(self, busy: Callable[[str], Exception]) -> Iterator[None]:
        """No request in flight, and none starts, inside (a checkpoint saves the channel's
        state). Raises ``busy(why)`` if one is in flight."""
        try:
            with self.client.channel.quiesced():
                yield
        except ChannelBusy as exc:
            raise busy(str(exc)) from None

    # ------------------------------------------------------------------ the VMM

    def exit_status(self) -> int | None:
        """The VMM's exit status, after waiting up to EXIT_GRACE for it: the control stream
        can close a moment before QEMU exits by itself. None if it still runs."""
        if self.machine is None:
            return None
        deadline = time.monotonic() + EXIT_GRACE
        while self.machine.exit_status() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.machine.exit_status()

    def expire(self, why: str) -> None:
        """Destroy the VMM for ``why`` (its lifetime is over): calls in flight and later
        ones raise GuestDied saying so."""
        self._expired = why
        if self.machine is not None:
            self.machine.kill()

    def console(self) -> str:
        """The guest's console so far (bounded: :func:`~pytest_smolvm.drivers.consolelog.read_bounded`)."""
        if self._console is not None:
            return self._console
        machine = self.machine
        if machine is None:
            return self.console_prefix
        if not machine.alive():
            machine.kill()  # reaps it and waits (bounded) for its last console output
        if not machine.console_path.exists():
            return self.console_prefix
        return self.console_prefix + read_bounded(machine.console_path)

    def console_tail(self, lines: int = 40) -> str:
        return tail(self.console(), lines)

    def disconnect(self, state: str = "disconnected") -> None:
        """Close the agent client and take no more calls; the VMM runs on."""
        self.client.close()
        if self.ended is None:
            self.ended = state

    def close(self) -> None:
        """The client first (no call may wait on a dying VM), then the VMM; the console is
        kept. Idempotent."""
        self.disconnect("closed")
        self.ended = "closed"
        if self.machine is not None and self._console is None:
            self.machine.kill()
            self._console = self.console()


def _client(sock: socket.socket, alive: Callable[[], bool], max_body: int) -> GuestClient:
    """The one place a guest client is made: the agent protocol on a connected control stream."""
    return GuestClient(Channel(sock, alive, max_body=max_body))
