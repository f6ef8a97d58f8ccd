"""Commands whose output streams while they run: ``run(on_output=...)`` and ``spawn()``.

The guest agent sends a streamed command's output as it arrives; the channel's reader thread
hands each chunk to an :class:`Output`, which keeps at most ``max_output`` bytes a stream
(the rest is dropped and the result says it was truncated: a guest flooding its output costs
the host no more memory than that). ``run(on_output=cb)`` calls ``cb`` in the thread that
called ``run()``, never in the reader thread, so a slow or failing callback cannot stall
other requests; the chunks waiting for it are bounded the same way.
"""

from __future__ import annotations

import codecs
import collections
import dataclasses
import errno
import signal as signals
import threading
import time
from collections.abc import Callable

from .errors import CommandTimeout, ConfigError, GuestError, SmolVMError
from .guest import replies
from .guest.client import GuestClient, WireEnv
from .results import RunResult
from .session import POLL, GuestSession, Pending

#: ``on_output(stream, text)``: ``stream`` is ``"stdout"`` or ``"stderr"``, ``text`` the
#: next piece of it, decoded as UTF-8 (errors replaced; a character is never split).
OutputCallback = Callable[[str, str], None]
#: Undelivered chunks kept apart at most; beyond, a chunk joins the last one of its stream.
MAX_QUEUED = 256
#: How long a failing callback's command gets to confirm its kill.
KILL_GRACE = 10.0
STREAMS = ("stdout", "stderr")
#: The agent's request-body limit.
MAX_STDIN = 1 << 30


@dataclasses.dataclass(frozen=True)
class ExecCall:
    """One ``run()``/``spawn()`` call, checked: the argv sent to the guest and the command as
    reports show it."""

    argv: list[str]
    shown: str
    timeout: float
    max_output: int
    env: WireEnv
    cwd: str | None
    stdin: bytes


#: Turns a finished command's reply into its result (or error), and records it:
#: :meth:`Commands.result <pytest_smolvm.commands.Commands.result>`.
Finish = Callable[[str, float, "replies.ExecReply | replies.AgentError", float, bool], RunResult]


class CallbackFailed(Exception):
    """``on_output`` raised ``error``; the command was killed."""

    def __init__(self, error: Exception) -> None:
        super().__init__(f"on_output raised {error!r}")
        self.error = error


class Output:
    """What a streamed command printed so far, each stream capped at ``cap`` bytes. With
    ``deliver``, the chunks are also queued for :meth:`take` (bounded: see MAX_QUEUED)."""

    def __init__(self, cap: int, *, deliver: bool) -> None:
        self.cap = cap
        self.cond = threading.Condition()
        self.data = {s: bytearray() for s in STREAMS}
        self.truncated = dict.fromkeys(STREAMS, False)
        self.deliver = deliver
        self._queue: collections.deque[tuple[str, bytearray]] | None = collections.deque() if deliver else None
        self.finished = False
        self.pid: int | None = None

    def add(self, stream: str, chunk: bytes) -> None:
        """One chunk from the guest (the channel's reader thread)."""
        with self.cond:
            kept = self.data[stream]
            room = max(self.cap - len(kept), 0)
            if len(chunk) > room:
                self.truncated[stream] = True
                chunk = chunk[:room]
            if not chunk:
                return
            kept += chunk
            if self._queue is not None:
                self._enqueue(stream, chunk)
            self.cond.notify_all()

    def _enqueue(self, stream: str, chunk: bytes) -> None:
        assert self._queue is not None
        if self._queue and self._queue[-1][0] == stream:
            self._queue[-1][1].extend(chunk)
            return
        if len(self._queue) >= MAX_QUEUED:  # the consumer lags: merge, so entries stay bounded
            for name, buf in reversed(self._queue):
                if name == stream:
                    buf.extend(chunk)
                    return
        self._queue.append((stream, bytearray(chunk)))

    def started(self, pid: int) -> None:
        with self.cond:
            self.pid = pid
            self.cond.notify_all()

    def finish(self) -> None:
        """The final reply came, or the channel ended (the reader thread)."""
        with self.cond:
            self.finished = True
            self.cond.notify_all()

    def take(self, timeout: float) -> list[tuple[str, bytes]]:
        """The chunks not yet taken, waiting up to ``timeout`` seconds for one (or the end)."""
        assert self._queue is not None
        with self.cond:
            if not self._queue and not self.finished:
                self.cond.wait(timeout)
            taken = [(s, bytes(b)) for s, b in self._queue]
            self._queue.clear()
            return taken

    def bytes(self, stream: str) -> bytes:
        with self.cond:
            return bytes(self.data[stream])

    def merged(self, reply: replies.ExecReply) -> replies.ExecReply:
        """``reply`` with the streamed output in front of what its body holds (an exec that
        failed to start reports why in its body)."""
        with self.cond:
            return replies.ExecReply(
                exit_code=reply.exit_code, timed_out=reply.timed_out,
                stdout=bytes(self.data["stdout"]) + reply.stdout, stderr=bytes(self.data["stderr"]) + reply.stderr,
                stdout_truncated=reply.stdout_truncated or self.truncated["stdout"],
                stderr_truncated=reply.stderr_truncated or self.truncated["stderr"], usage=reply.usage)


class Deliverer:
    """Feeds chunks to the callbacks as text, decoding each stream incrementally."""

    def __init__(self, callbacks: list[OutputCallback]) -> None:
        self.callbacks = callbacks
        self.decoders = {s: codecs.getincrementaldecoder("utf-8")(errors="replace") for s in STREAMS}

    def feed(self, chunks: list[tuple[str, bytes]], *, final: bool = False) -> None:
        for stream, chunk in chunks:
            self._send(stream, self.decoders[stream].decode(chunk))
        if final:
            for stream in STREAMS:
                self._send(stream, self.decoders[stream].decode(b"", final=True))
            for callback in self.callbacks:  # a line printer shows its unfinished lines
                flush = getattr(callback, "flush", None)
                if callable(flush):
                    flush()

    def _send(self, stream: str, text: str) -> None:
        if text:
            for callback in self.callbacks:
                try:
                    callback(stream, text)
                except Exception as exc:
                    raise CallbackFailed(exc) from exc


def run_streamed(guest: GuestClient, call: ExecCall, wait: float,
                 callbacks: list[OutputCallback]) -> replies.ExecReply | replies.AgentError:
    """``call`` with its output given to ``callbacks`` as it arrives, in this thread. Raises
    ReplyTimeout if no result came within ``wait`` seconds, and :class:`CallbackFailed` (the
    command killed) if a callback raised."""
    out = Output(call.max_output, deliver=True)
    pending = guest.start_exec(call.argv, timeout=call.timeout, max_output=call.max_output, on_out=out.add,
                               wake=out.finish, env=call.env, cwd=call.cwd, stdin=call.stdin)
    deliver = Deliverer(callbacks)
    deadline = time.monotonic() + wait
    try:
        while not out.finished and time.monotonic() < deadline:
            deliver.feed(out.take(min(POLL, max(deadline - time.monotonic(), 0.001))))
        deliver.feed(out.take(0))
        parsed = guest.finish_exec(pending, timeout=max(deadline - time.monotonic(), 0.0))
        if isinstance(parsed, replies.AgentError):
            return parsed
        deliver.feed([("stdout", parsed.stdout), ("stderr", parsed.stderr)], final=True)
        return out.merged(parsed)
    except (CallbackFailed, KeyboardInterrupt):
        _kill_quietly(guest, pending)
        raise


def _kill_quietly(guest: GuestClient, pending: Pending, *, wait: bool = True) -> None:
    """SIGKILL a streamed command's process group and (with ``wait``) wait, bounded, for its end."""
    try:
        guest.signal(pending.id, signals.SIGKILL, timeout=KILL_GRACE)
        if wait:
            guest.finish_exec(pending, timeout=KILL_GRACE)
    except Exception:
        if wait:
            guest.forget(pending)


class Process:
    """A command running in the background in the guest: what :meth:`SmolVM.spawn` returns.

    Its output is collected as it arrives (each stream capped at ``max_output``; ``stdout``,
    ``stderr`` and their ``_bytes`` forms give what came so far). ``exit_code`` is None while
    it runs. Spawned processes are killed when the VM closes. Usable as a context manager
    that kills the process on exit.
    """

    def __init__(self, session: GuestSession, call: ExecCall, finish: Finish, redact: Callable[[str], str],
                 on_output: OutputCallback | None = None, live: Callable[[int], OutputCallback] | None = None) -> None:
        self.command = call.shown
        self._session = session
        self._finish = finish
        self._redact = redact
        self._call = call
        self._on_output = on_output
        self._live = live
        self._out = Output(call.max_output, deliver=on_output is not None or live is not None)
        self._pump: threading.Thread | None = None
        self._callback_error: Exception | None = None
        self._collect_lock = threading.Lock()
        self._guest: GuestClient | None = None
        self._pending: Pending | None = None
        self._result: RunResult | None = None
        self._t0 = time.monotonic()
        self._stdin_lock = threading.Lock()

    def __repr__(self) -> str:
        state = ("running" if not self._out.finished else "ended" if self._result is None
                 else f"exit {self._result.exit_code}")  # never collects: a repr must not raise
        return f"<Process {self._session.name} pid={self.pid} {self.command!r} {state}>"

    def __enter__(self) -> Process:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._session.alive and self.exit_code is None:
            self.kill()

    # ------------------------------------------------------------------ start

    def start(self, timeout: float) -> None:
        """Send the spawn and wait until it runs (or failed to start: then it has its result)."""
        def start(guest: GuestClient) -> Pending:
            self._guest = guest
            call = self._call
            return guest.start_exec(call.argv, timeout=None, max_output=call.max_output, on_out=self._out.add,
                                    on_started=self._out.started, wake=self._out.finish, env=call.env,
                                    cwd=call.cwd, stdin=call.stdin)

        self._pending = self._session.call(f"spawn({self.command!r})", start)
        deadline = time.monotonic() + timeout
        with self._out.cond:
            while self._out.pid is None and not self._out.finished and time.monotonic() < deadline:
                self._out.cond.wait(POLL)
        if self._out.pid is None and not self._out.finished:
            assert self._guest is not None
            self._guest.forget(self._pending)
            raise GuestError(f"{self._session.name}: spawn({self.command!r}): the guest agent did not start it "
                             f"within {timeout:g}s (the guest is overloaded or its agent was stopped)")
        if self._out.deliver:
            live = self._live(self._out.pid) if self._live is not None and self._out.pid else None
            callbacks = [cb for cb in (self._on_output, live) if cb is not None]
            self._pump = threading.Thread(target=self._deliver, args=(callbacks,), daemon=True,
                                          name=f"smolvm-spawn-{self._out.pid}")
            self._pump.start()
        if self._out.finished:  # it could not start (exit 126/127, why in stderr) or ended at once
            self._collect()

    def _deliver(self, callbacks: list[OutputCallback]) -> None:
        """The spawn's own thread: output to ``callbacks`` as it arrives, until the end. A
        callback that raises gets the process killed; wait() raises its exception."""
        deliver = Deliverer(callbacks)
        try:
            while True:
                chunks = self._out.take(POLL)
                deliver.feed(chunks)
                if not chunks and self._out.finished:
                    break
            deliver.feed([], final=True)
        except CallbackFailed as exc:
            self._callback_error = exc.error
            if self._guest is not None and self._pending is not None:
                _kill_quietly(self._guest, self._pending, wait=False)

    # ------------------------------------------------------------------ state

    @property
    def pid(self) -> int | None:
        """The process id in the guest (the leader of its own process group)."""
        return self._out.pid

    @property
    def exit_code(self) -> int | None:
        """None while it runs; else as :attr:`RunResult.exit_code` (-N: killed by signal N)."""
        return self.poll()

    @property
    def stdout_bytes(self) -> bytes:
        return self._out.bytes("stdout")

    @property
    def stderr_bytes(self) -> bytes:
        return self._out.bytes("stderr")

    @property
    def stdout(self) -> str:
        """Its standard output so far, decoded as UTF-8 (errors replaced)."""
        return self.stdout_bytes.decode(errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_bytes.decode(errors="replace")

    def poll(self) -> int | None:
        """The exit code if it has exited, else None (never blocks)."""
        if self._result is None and self._out.finished:
            self._collect()
        return self._result.exit_code if self._result is not None else None

    def _collect(self) -> None:
        """The final reply is in (or the channel ended): build the result, or raise why not."""
        pending = self._pending
        assert pending is not None
        if pending.failure is not None and not self._session.alive:
            raise SmolVMError(f"{self._session.name}: spawn({self.command!r}) was killed with the VM")
        with self._collect_lock:
            if self._result is not None:
                return
            parsed = self._session.call(f"spawn({self.command!r})",
                                    lambda guest: guest.finish_exec(pending, timeout=0.0))
            if isinstance(parsed, replies.ExecReply):
                parsed = self._out.merged(parsed)
            self._result = self._finish(self.command, 0.0, parsed, time.monotonic() - self._t0, False)

    def wait(self, timeout: float | None = None) -> RunResult:
        """Wait for it to exit and return its result (as ``run()`` would). If it is still
        running after ``timeout`` seconds, raise :class:`CommandTimeout` and leave it running
        (as :meth:`subprocess.Popen.wait` does): :meth:`kill` it if it must stop."""
        if timeout is not None and not (isinstance(timeout, (int, float)) and timeout >= 0):
            raise ConfigError(f"invalid timeout={timeout!r} for wait() of spawn({self.command!r}): "
                              f"expected seconds >= 0")
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._out.cond:
            while not self._out.finished:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._out.cond.wait(POLL if left is None else min(POLL, left))
        if self._pump is not None and self._out.finished:  # everything given to on_output first
            self._pump.join(KILL_GRACE)
        if self._callback_error is not None:
            raise self._callback_error
        if self.poll() is None:
            raise CommandTimeout(self._redact(
                f"{self._session.name}: spawn({self.command!r}) still runs after wait(timeout={timeout!r}); it was "
                f"not killed (call kill())"), command=self.command, timeout=float(timeout or 0),
                stdout=self.stdout, stderr=self.stderr)
        assert self._result is not None
        return self._result

    # ------------------------------------------------------------------ control

    def send_signal(self, signum: int) -> None:
        """Send ``signum`` to its whole process group. Does nothing once it has exited."""
        if isinstance(signum, bool) or not isinstance(signum, int) or not 1 <= signum <= 64:
            raise ConfigError(f"invalid signal {signum!r} for spawn({self.command!r}): expected 1..64")
        if self._out.finished:  # it exited, or died with its VM
            return
        assert self._pending is not None
        target = self._pending.id
        error = self._session.call(f"signal spawn({self.command!r})",
                               lambda guest: guest.signal(target, int(signum), timeout=KILL_GRACE))
        if error is not None and error.errno != errno.ESRCH:  # it exited meanwhile
            raise GuestError(f"{self._session.name}: cannot signal spawn({self.command!r}): {error.message}")

    def kill(self, signal: int = signals.SIGKILL) -> None:
        """Send ``signal`` (default SIGKILL) to its process group; see :meth:`send_signal`."""
        self.send_signal(signal)

    def terminate(self) -> None:
        """Send SIGTERM to its process group."""
        self.send_signal(signals.SIGTERM)

    def write_stdin(self, data: bytes | str, *, close: bool = False, timeout: float = 60.0) -> None:
        """Write ``data`` (str: as UTF-8) to its standard input and return once the process
        has taken all of it (a process that does not read makes this wait, up to ``timeout``
        seconds, then :class:`GuestError`); with ``close`` close stdin afterwards (EOF).
        Writing to a process that exited or whose stdin is closed is a GuestError."""
        payload = data.encode() if isinstance(data, str) else bytes(data)
        if len(payload) > MAX_STDIN:
            raise ConfigError(f"write_stdin() of spawn({self.command!r}): {len(payload)} bytes is over the "
                              f"{MAX_STDIN}-byte limit of one write")
        error = self._stdin(payload, close, timeout)
        if error is not None:
            why = {errno.ESRCH: "it has exited", errno.EPIPE: "its stdin is closed"}.get(error.errno, error.message)
            raise GuestError(f"{self._session.name}: write_stdin() of spawn({self.command!r}) failed: {why}")

    def close_stdin(self) -> None:
        """Close its standard input: the process reads EOF. Nothing happens if it is closed
        already or the process has exited."""
        error = self._stdin(b"", True, 60.0)
        if error is not None and error.errno not in (errno.ESRCH, errno.EPIPE):
            raise GuestError(f"{self._session.name}: close_stdin() of spawn({self.command!r}) failed: {error.message}")

    def _stdin(self, payload: bytes, close: bool, timeout: float) -> replies.AgentError | None:
        assert self._pending is not None
        target = self._pending.id
        what = f"stdin of spawn({self.command!r})"
        with self._stdin_lock:
            return self._session.call(
                what, lambda guest: guest.write_stdin(target, payload, close=close, timeout=timeout),
                on_timeout=lambda: GuestError(f"{self._session.name}: {what}: the process did not take the data "
                                              f"within {timeout:g}s"))
