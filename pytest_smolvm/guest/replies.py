"""Typed parsers of the guest agent's replies (host side).

A reply header is guest-controlled JSON: every field the host uses is checked here, once,
for type and range, so a hostile or broken agent can only cause a :class:`ProtocolError`,
never a ``KeyError``/``OverflowError``/``TypeError`` deep in the host.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..errors import ProtocolError
from ..reporting import clip

#: Exit codes as ``os.waitstatus_to_exitcode`` gives them: -signal, or 0..255.
EXIT_CODES = range(-128, 256)
MAX_ERROR = 2000


@dataclasses.dataclass(frozen=True)
class GuestUsage:
    """What the agent's ``wait4`` said a command used (it and every descendant it waited for).
    Guest-reported: telemetry, never a decision; a value a guest could not have sent is None."""

    cpu_user_s: float
    cpu_system_s: float
    peak_rss_bytes: int  # the largest resident set of one process of the command's tree


@dataclasses.dataclass(frozen=True)
class ExecReply:
    exit_code: int
    timed_out: bool
    stdout: bytes
    stderr: bytes
    stdout_truncated: bool
    stderr_truncated: bool
    usage: GuestUsage | None = None  # agents before evidence (issue 25) do not send it


@dataclasses.dataclass(frozen=True)
class AgentError:
    """An ``error`` reply: ``message`` is sanitised and bounded, ``errno`` in 0..4095."""

    message: str
    errno: int


def _bad(op: str, field: str, value: object, why: str) -> ProtocolError:
    return ProtocolError(f"the guest agent sent a malformed {op} reply: {field}={clip(repr(value), 80)} {why}")


def _int(header: dict[str, Any], op: str, field: str, allowed: range, default: int | None = None) -> int:
    value = header.get(field, default)
    if type(value) is not int:  # bool and float are not accepted either
        raise _bad(op, field, value, "is not an integer" if field in header else "is missing")
    if value not in allowed:
        raise _bad(op, field, value, f"is outside {allowed.start}..{allowed.stop - 1}")
    return value


def _flag(header: dict[str, Any], op: str, field: str) -> bool:
    value = header.get(field, False)
    if type(value) is not bool:
        raise _bad(op, field, value, "is not true or false")
    return value


def _op(header: dict[str, Any], what: str, expected: tuple[str, ...]) -> str:
    op = header.get("op")
    if op not in (*expected, "error"):
        raise _bad(what, "op", op, f"is not one of {', '.join(expected)}, error")
    assert isinstance(op, str)
    return op


def parse_error(header: dict[str, Any], what: str) -> AgentError:
    message = header.get("error")
    if not isinstance(message, str):
        raise _bad(what, "error", message, "is not a string")
    return AgentError(clip(message, MAX_ERROR), _int(header, what, "errno", range(4096), default=0))


def parse_exec(header: dict[str, Any], body: bytes) -> ExecReply | AgentError:
    """The reply to ``exec``: its result (stdout is the body's first ``stdout_len`` bytes)."""
    if _op(header, "exec", ("result",)) == "error":
        return parse_error(header, "exec")
    split = _int(header, "exec", "stdout_len", range(len(body) + 1))
    return ExecReply(
        exit_code=_int(header, "exec", "exit_code", EXIT_CODES),
        timed_out=_flag(header, "exec", "timed_out"),
        stdout=body[:split], stderr=body[split:],
        stdout_truncated=_flag(header, "exec", "stdout_truncated"),
        stderr_truncated=_flag(header, "exec", "stderr_truncated"),
        usage=_usage(header),
    )


def _usage(header: dict[str, Any]) -> GuestUsage | None:
    """The ``exec`` result's resource figures, or None when any is absent or not a sane
    integer: they are evidence only, so a lie drops them instead of failing the command."""
    values = [header.get(k) for k in ("cpu_user_us", "cpu_system_us", "peak_rss_kib")]
    if not all(type(v) is int and 0 <= v < 1 << 53 for v in values):
        return None
    user, system, rss = (int(v) for v in values)  # type: ignore[arg-type]
    return GuestUsage(user / 1e6, system / 1e6, rss * 1024)


#: The two streams an ``out`` frame may name.
STREAMS = ("stdout", "stderr")
#: Process ids a ``started`` frame may carry (Linux's pid_max is at most 2**22).
PIDS = range(1, (1 << 22) + 1)


def parse_out(header: dict[str, Any]) -> str:
    """The stream of an ``out`` frame (its body is the bytes): ``stdout`` or ``stderr``."""
    stream = header.get("stream")
    if stream not in STREAMS:
        raise _bad("out", "stream", stream, "is not stdout or stderr")
    assert isinstance(stream, str)
    return stream


def parse_started(header: dict[str, Any]) -> int:
    """The guest pid in a spawn's ``started`` frame."""
    return _int(header, "started", "pid", PIDS)


def parse_file(header: dict[str, Any], what: str) -> AgentError | None:
    """The reply to ``put``/``get`` (or ``signal``/``stdin``): None when it succeeded (a
    get's data is the body)."""
    if _op(header, what, ("ok",)) == "error":
        return parse_error(header, what)
    return None


@dataclasses.dataclass(frozen=True)
class StepResult:
    """One step the agent ran at ``setup`` (NIC configuration, root filesystem growth)."""

    exit_code: int
    output: str


def parse_step(header: dict[str, Any], field: str) -> StepResult | None:
    """``header[field]`` of a ``setup`` reply: absent, or ``{"exit_code": int, "output": str}``."""
    step = header.get(field)
    if step is None:
        return None
    if not isinstance(step, dict):
        raise _bad("setup", field, step, "is not an object")
    output = step.get("output", "")
    if not isinstance(output, str):
        raise _bad("setup", f"{field}.output", output, "is not a string")
    return StepResult(_int(step, "setup", "exit_code", EXIT_CODES, default=0), clip(output, MAX_ERROR))


@dataclasses.dataclass(frozen=True)
class SetupReply:
    """The reply to ``setup``: an error, or the steps the agent ran (each absent if not run)."""

    error: AgentError | None
    net: StepResult | None
    resize: StepResult | None
    volumes: StepResult | None = None


def parse_setup(header: dict[str, Any]) -> SetupReply:
    if "error" in header:
        return SetupReply(parse_error(header, "setup"), None, None)
    return SetupReply(None, parse_step(header, "net"), parse_step(header, "resize"), parse_step(header, "volumes"))
