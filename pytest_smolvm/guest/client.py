"""The host's client of the guest agent: one method per operation the host uses.

This is the only place that builds request headers and decodes replies; the VM handle, the
snapshot template and ``cli shell`` all talk to the agent through it. It raises the
channel's own exceptions (:class:`~pytest_smolvm.guest.channel.ReplyTimeout`,
:class:`~pytest_smolvm.guest.channel.ChannelClosed`,
:class:`~pytest_smolvm.errors.ProtocolError`); turning them into what a VM reports
(BootError, GuestDied, ...) is the caller's job. A malformed reply poisons the channel:
nothing more from that guest is trusted.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from ..errors import ProtocolError
from ..reporting import redacted_repr
from . import replies
from .channel import SEND_TIMEOUT, Channel, Pending

T = TypeVar("T")

#: Room in an exec reply's body beyond the two capped streams.
EXEC_BODY_SLACK = 4096


def exec_body_limit(max_output: int) -> int:
    """The largest exec reply body an agent capping each stream at ``max_output`` may send."""
    return 2 * max_output + EXEC_BODY_SLACK



class WireEnv(dict[str, str]):
    """The environment of one request to the guest: a plain dict for the JSON encoder, but
    shown redacted, like :class:`~pytest_smolvm.config.SecretEnv`, if a traceback prints it."""

    def __repr__(self) -> str:
        return redacted_repr(self)

class GuestClient:
    """Requests to one guest agent over ``channel``. Calls are serialised by the channel."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel

    def forget(self, pending: Pending) -> None:
        """Stop waiting for ``pending``'s reply (its frames are dropped when they come)."""
        self.channel.forget(pending)

    def close(self) -> None:
        self.channel.close()

    def _decode(self, parse: Callable[[], T]) -> T:
        try:
            return parse()
        except ProtocolError as exc:
            self.channel.poison(str(exc))
            raise

    def hello(self, *, timeout: float) -> None:
        """Wait until the agent answers (the reply's fields are informational)."""
        self.channel.call({"op": "hello"}, timeout=timeout)

    def setup(self, *, timeout: float, grow_root: bool = False, time_ns: int | None = None,
              hostname: str | None = None, machine_id: str | None = None,
              net: Mapping[str, object] | None = None, volumes: Sequence[Mapping[str, str]] = (),
              entropy: bytes = b"") -> replies.SetupReply:
        """Make the guest current (clock, hostname, machine-id, RNG reseed from ``entropy``),
        configure its NIC (``net``), mount read-only ``volumes`` and grow its root filesystem;
        fields left None (or empty) are not sent."""
        req: dict[str, Any] = {"op": "setup"}
        for key, value in (("time_ns", time_ns), ("hostname", hostname), ("machine_id", machine_id)):
            if value is not None:
                req[key] = value
        if grow_root:
            req["grow_root"] = True
        if net is not None:
            req["net"] = dict(net)
        if volumes:
            req["volumes"] = [dict(v) for v in volumes]
        reply, _ = self.channel.call(req, entropy, timeout=timeout)
        return self._decode(lambda: replies.parse_setup(reply))

    def exec(self, argv: Sequence[str], *, timeout: float, wait: float, max_output: int,
             env: Mapping[str, str] | None = None, cwd: str | None = None,
             stdin: bytes = b"") -> replies.ExecReply | replies.AgentError:
        """Run ``argv``; the agent kills its process group after ``timeout`` seconds, and the
        host waits ``wait`` seconds for the reply. Each stream is capped at ``max_output``."""
        req = {"op": "exec", "argv": list(argv), "env": WireEnv(env or {}), "cwd": cwd, "timeout": float(timeout),
               "max_output": max_output}
        reply, body = self.channel.call(req, stdin, timeout=wait, max_body=exec_body_limit(max_output))
        return self._decode(lambda: replies.parse_exec(reply, body))

    def start_exec(self, argv: Sequence[str], *, timeout: float | None, max_output: int,
                   on_out: Callable[[str, bytes], None], on_started: Callable[[int], None] | None = None,
                   wake: Callable[[], None] | None = None, env: Mapping[str, str] | None = None,
                   cwd: str | None = None, stdin: bytes = b"") -> Pending:
        """Start ``argv`` with its output streamed: ``on_out(stream, data)`` gets each chunk as
        it arrives (in the channel's reader thread; it must not block). With ``on_started`` it
        is a spawn: its stdin stays open for :meth:`write_stdin`, ``on_started(pid)`` is called
        once it runs, and ``timeout`` None means no time limit. :meth:`finish_exec` gets the result."""
        req: dict[str, Any] = {"op": "exec", "argv": list(argv), "env": WireEnv(env or {}), "cwd": cwd,
                               "max_output": max_output, "stream": True}
        if timeout is not None:
            req["timeout"] = float(timeout)
        if on_started is not None:
            req["spawn"] = True

        def on_frame(header: dict[str, Any], body: bytes) -> None:
            if header["op"] == "out":
                on_out(replies.parse_out(header), body)
            elif on_started is not None:
                on_started(replies.parse_started(header))
            else:
                raise ProtocolError("the guest agent sent 'started' for a command that is not a spawn")

        return self.channel.start(req, stdin, max_body=exec_body_limit(max_output), on_frame=on_frame, wake=wake,
                                  send_timeout=max(SEND_TIMEOUT, timeout or 0.0))

    def finish_exec(self, pending: Pending, *, timeout: float | None,
                    abandon: bool = True) -> replies.ExecReply | replies.AgentError:
        """The result of a :meth:`start_exec` (output it streamed is not in it; an exec that
        failed to start puts its message in ``stderr``)."""
        reply, body = self.channel.wait(pending, timeout, abandon=abandon)
        return self._decode(lambda: replies.parse_exec(reply, body))

    def signal(self, target: int, signum: int, *, timeout: float) -> replies.AgentError | None:
        """Send ``signum`` to the process group of the streamed exec or spawn ``target`` (its
        request id): None, or why not (ESRCH: it exited)."""
        reply, _ = self.channel.call({"op": "signal", "target": target, "signal": signum}, timeout=timeout)
        return self._decode(lambda: replies.parse_file(reply, "signal"))

    def write_stdin(self, target: int, data: bytes, *, close: bool, timeout: float) -> replies.AgentError | None:
        """Write ``data`` to the stdin of the spawn ``target`` (then close it if ``close``);
        returns once the process took it all: None, or why not (EPIPE: stdin is closed)."""
        reply, _ = self.channel.call({"op": "stdin", "target": target, "close": close}, data, timeout=timeout)
        return self._decode(lambda: replies.parse_file(reply, "stdin"))

    def put(self, path: str, data: bytes, *, timeout: float, mode: int | None = None) -> replies.AgentError | None:
        """Write ``data`` to ``path`` in the guest (parents created): None, or why not."""
        header: dict[str, Any] = {"op": "put", "path": path}
        if mode is not None:
            header["mode"] = mode
        reply, _ = self.channel.call(header, data, timeout=timeout)
        return self._decode(lambda: replies.parse_file(reply, "put"))

    def get(self, path: str, *, timeout: float, max_size: int) -> bytes | replies.AgentError:
        """The guest file ``path`` (the agent refuses one over ``max_size`` bytes), or why not."""
        reply, data = self.channel.call({"op": "get", "path": path, "max": max_size}, timeout=timeout,
                                        max_body=max_size)
        error = self._decode(lambda: replies.parse_file(reply, "get"))
        return data if error is None else error

    def sync(self, *, timeout: float) -> None:
        """Flush the guest's filesystems to its disk."""
        self.channel.call({"op": "sync"}, timeout=timeout)
