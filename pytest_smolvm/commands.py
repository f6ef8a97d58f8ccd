"""Commands in a running guest: ``run()`` and ``spawn()`` of :class:`~pytest_smolvm.vm.SmolVM`.

:class:`Commands` checks a call's arguments against the VM's config (a ConfigError names the
bad one), sends it through the guest session, turns the agent's reply into a
:class:`~pytest_smolvm.results.RunResult` or our error, and records every call in the VM's
:class:`Transcript`, which masks the VM's secrets (its env values) wherever they appear.
"""

from __future__ import annotations

import dataclasses
import shlex
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

from .config import VMConfig, check_field
from .errors import CommandFailed, CommandTimeout, ConfigError, GuestDied, GuestError, ImageError, SmolVMError
from .guest import replies
from .guest.client import GuestClient, WireEnv
from .process import CallbackFailed, ExecCall, OutputCallback, Process, run_streamed
from .reporting import redact
from .results import RunResult
from .session import GuestSession
from .timeouts import scaled

#: Extra seconds the host waits past a command's timeout for the agent's (killed) reply.
REPLY_GRACE = 10.0
#: How much of each stream a transcript entry keeps.
TRANSCRIPT_HEAD = 1024
#: How the guest agent reports that ``/bin/sh`` could not be executed (exit status 127).
NO_SHELL = b"smolvm: cannot execute /bin/sh:"
#: Live output for a command: called with its label, returns its ``on_output`` (or None: off).
LiveOutput = Callable[[str], OutputCallback] | None


@dataclasses.dataclass(frozen=True)
class TranscriptEntry:
    """One ``run()`` call as shown in a failing test's report."""

    command: str
    outcome: str
    duration: float
    stdout_head: str
    stderr_head: str
    usage: replies.GuestUsage | None = None  # guest-reported (the agent's wait4)

    def render(self) -> str:
        lines = [f"$ {self.command}    [{self.outcome}, {self.duration * 1000:.0f} ms]"]
        for label, head in (("stdout", self.stdout_head), ("stderr", self.stderr_head)):
            if head:
                lines.append(f"  {label}: " + head.replace("\n", "\n          ").rstrip())
        return "\n".join(lines)


class Transcript:
    """What a VM's commands did (``entries``), with the VM's secrets masked: the env values of
    its config and of every ``run(env=...)``, in messages and transcripts alike."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self.entries: list[TranscriptEntry] = []
        self.secrets: set[str] = set(secrets)

    def redact(self, text: str) -> str:
        """``text`` with the secrets masked as ``***``."""
        return redact(text, self.secrets)

    def record(self, shown: str, outcome: str, duration: float, out: bytes, err: bytes,
               usage: replies.GuestUsage | None = None) -> None:
        self.entries.append(TranscriptEntry(
            self.redact(shown), outcome, duration,
            self.redact(out[:TRANSCRIPT_HEAD].decode(errors="replace")),
            self.redact(err[:TRANSCRIPT_HEAD].decode(errors="replace")), usage))


def command_argv(command: object) -> tuple[list[str], str]:
    """``run()``'s command as an argv and as shown: a string goes to ``/bin/sh -c``."""
    if isinstance(command, str):
        return ["/bin/sh", "-c", command], command
    if isinstance(command, Sequence) and command and all(isinstance(a, str) for a in command):
        return list(command), shlex.join(command)
    raise ConfigError(f"invalid command {command!r}: expected a shell string or a non-empty list of str")


class Commands:
    """``run()`` and ``spawn()`` for the VM ``name`` with ``config``, every call recorded in
    ``transcript``. Arguments are checked from the start; calls reach the guest once
    :meth:`attach` gave the running guest."""

    def __init__(self, name: str, config: VMConfig, transcript: Transcript) -> None:
        self.name = name
        self.config = config
        self.transcript = transcript
        self.image = config.image
        #: Added to every command's env under the config's: a networked VM's secret placeholders.
        self.guest_env: dict[str, str] = {}
        self._session: GuestSession | None = None

    def attach(self, session: GuestSession, image: str) -> None:
        """The VM is up: its guest is ``session``, booted from the image named ``image``."""
        self._session, self.image = session, image

    @property
    def session(self) -> GuestSession:
        if self._session is None:
            raise SmolVMError(f"{self.name} is not running (it was not started, or its start failed)")
        return self._session

    def run(self, command: str | Sequence[str], *, timeout: float | None, env: Mapping[str, str] | None,
            cwd: str | None, input: bytes | str | None, check: bool, max_output: int | None,
            on_output: OutputCallback | None, live: LiveOutput) -> RunResult:
        """:meth:`SmolVM.run <pytest_smolvm.vm.SmolVM.run>`; ``live`` adds the run's live output."""
        call = self.exec_call(command, timeout=timeout, env=env, cwd=cwd, input=input, max_output=max_output,
                              on_output=on_output)
        t0 = time.monotonic()
        callbacks = [cb for cb in (on_output, live and live(self.name)) if cb is not None]
        parsed = self._exec(call, t0, callbacks)
        if isinstance(command, str):
            self._check_shell(call.shown, parsed, time.monotonic() - t0)
        return self.result(call.shown, call.timeout, parsed, time.monotonic() - t0, check)

    def spawn(self, command: str | Sequence[str], *, env: Mapping[str, str] | None, cwd: str | None,
              input: bytes | str | None, max_output: int | None, on_output: OutputCallback | None,
              live: LiveOutput) -> Process:
        """:meth:`SmolVM.spawn <pytest_smolvm.vm.SmolVM.spawn>`."""
        call = self.exec_call(command, timeout=None, env=env, cwd=cwd, input=input, max_output=max_output,
                              on_output=on_output, what="spawn")
        proc = Process(self.session, call, self.result, self.transcript.redact, on_output,
                       None if live is None else lambda pid: live(f"{self.name}:{pid}"))
        proc.start(scaled(REPLY_GRACE) * 3)
        self.transcript.record(call.shown, f"spawned, pid {proc.pid}" if proc.pid else "spawn failed", 0.0, b"", b"")
        return proc

    def quiet(self, argv: list[str], stdin: bytes = b"", *, timeout: float = 20.0,
              max_output: int = 256 * 1024) -> bytes:
        """Run ``argv`` for the engine itself (:mod:`.evidence`): not in the transcript, no
        live output, no env but the config's. Its stdout (cut at ``max_output``, or what it
        printed before ``timeout`` killed it), or :class:`SmolVMError`."""
        wait = scaled(timeout)
        parsed = self.session.call("gather evidence", lambda guest: guest.exec(
            argv, timeout=wait, wait=wait + scaled(REPLY_GRACE), max_output=max_output, env=WireEnv(self.config.env),
            stdin=stdin))
        if isinstance(parsed, replies.AgentError):
            raise GuestError(f"{self.name}: the guest agent could not gather evidence: {parsed.message}")
        return parsed.stdout

    def exec_call(self, command: str | Sequence[str], *, timeout: float | None, env: Mapping[str, str] | None,
                  cwd: str | None, input: bytes | str | None, max_output: int | None,
                  on_output: object = None, what: str = "run") -> ExecCall:
        """``what``'s (run() or spawn()) arguments, checked (a ConfigError names the bad one)
        and merged with the config."""
        if on_output is not None and not callable(on_output):
            raise ConfigError(f"invalid on_output={on_output!r} for {what}(): expected a callable(stream, text)")
        argv, shown = command_argv(command)
        limit = self.config.timeout if timeout is None else timeout
        if not (isinstance(limit, (int, float)) and limit > 0):
            raise ConfigError(f"invalid timeout={timeout!r} for {what}({shown!r}): expected seconds > 0")
        cap = self.config.max_output if max_output is None else max_output
        if not (isinstance(cap, int) and cap > 0):
            raise ConfigError(f"invalid max_output={max_output!r} for {what}({shown!r}): expected bytes > 0")
        merged_env = WireEnv(self.config.env)
        merged_env.update(self.guest_env)
        if env:
            merged_env.update(check_field("env", env))
            self.transcript.secrets.update(merged_env.values())
        data = input.encode() if isinstance(input, str) else bytes(input or b"")
        return ExecCall(argv, shown, float(limit), cap, merged_env, cwd, data)

    def _exec(self, call: ExecCall, t0: float,
              callbacks: list[OutputCallback] | None = None) -> replies.ExecReply | replies.AgentError:
        """Send ``call`` to the guest and wait for its reply (its output streamed to
        ``callbacks`` if any). A guest that never confirms the kill is a CommandTimeout; it,
        a guest that died and a failing callback are recorded in the transcript."""
        grace = scaled(REPLY_GRACE)

        def op(guest: GuestClient) -> replies.ExecReply | replies.AgentError:
            if callbacks:
                return run_streamed(guest, call, call.timeout + grace, callbacks)
            return guest.exec(call.argv, timeout=call.timeout, wait=call.timeout + grace,
                              max_output=call.max_output, env=call.env, cwd=call.cwd, stdin=call.stdin)

        def no_reply() -> CommandTimeout:
            # No confirmation: the guest is overloaded or the test stopped its agent. Either
            # way it is the guest's doing, so the test fails (not an infrastructure ERROR).
            self.transcript.record(call.shown, "no reply", time.monotonic() - t0, b"", b"")
            return CommandTimeout(self.transcript.redact(
                f"{self.name}: run({call.shown!r}) timed out after {call.timeout:g}s and the guest agent did "
                f"not confirm the kill within {grace:g}s more (the guest is overloaded or its agent "
                f"was stopped)"), command=call.shown, timeout=call.timeout)

        try:
            return self.session.call(f"run({call.shown!r})", op, on_timeout=no_reply)
        except CallbackFailed as exc:
            self.transcript.record(call.shown, "killed: on_output raised", time.monotonic() - t0, b"", b"")
            raise exc.error from None
        except GuestDied:
            self.transcript.record(call.shown, "guest died", time.monotonic() - t0, b"", b"")
            raise

    def _check_shell(self, shown: str, parsed: replies.ExecReply | replies.AgentError, duration: float) -> None:
        """A shell string in an image without ``/bin/sh`` (the agent reports the failed exec
        as a shell would, 127) is the caller's mistake: say so, and what to do instead."""
        if (isinstance(parsed, replies.ExecReply) and parsed.exit_code == 127
                and parsed.stderr.startswith(NO_SHELL)):
            self.transcript.record(shown, "no /bin/sh", duration, b"", parsed.stderr)
            raise ImageError(self.transcript.redact(
                f"{self.name}: image {self.image!r} has no /bin/sh, so the shell string {shown!r} cannot run; "
                f"pass an argv list instead (run(['prog', 'arg'])) or add a shell to the image"))

    def result(self, shown: str, limit: float, parsed: replies.ExecReply | replies.AgentError,
               duration: float, check: bool) -> RunResult:
        """Turn a validated exec reply into run()'s result or error, and record it."""
        redact = self.transcript.redact
        if isinstance(parsed, replies.AgentError):
            self.transcript.record(shown, "agent error", duration, b"", b"")
            raise GuestError(redact(f"{self.name}: the guest agent could not run {shown!r}: {parsed.message}"))
        out_b, err_b = parsed.stdout, parsed.stderr
        if parsed.timed_out:
            self.transcript.record(shown, f"timeout after {limit:g}s", duration, out_b, err_b, parsed.usage)
            raise CommandTimeout(
                redact(f"{self.name}: run({shown!r}) timed out after {limit:g}s; its process group was killed"),
                command=shown, timeout=limit,
                stdout=out_b.decode(errors="replace"), stderr=err_b.decode(errors="replace"))
        result = RunResult(
            command=shown, exit_code=parsed.exit_code,
            stdout=out_b.decode(errors="replace"), stderr=err_b.decode(errors="replace"),
            duration=duration, stdout_bytes=out_b, stderr_bytes=err_b,
            stdout_truncated=parsed.stdout_truncated, stderr_truncated=parsed.stderr_truncated,
        )
        self.transcript.record(shown, f"exit {result.exit_code}" + (", truncated" if result.truncated else ""),
                               duration, out_b, err_b, parsed.usage)
        if check and result.exit_code != 0:
            raise CommandFailed(result, secrets=self.transcript.secrets)
        return result
