"""A hostile guest agent, played by hypothesis over a socketpair, against the host's call
paths (Channel + GuestClient + SmolVM.run/put/get): whatever it answers, only SmolVMErrors escape."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sockpeer import recv_exact

from pytest_smolvm import RunResult, SmolVM, VMConfig
from pytest_smolvm.errors import GuestError, ProtocolError, SmolVMError
from pytest_smolvm.guest import protocol
from pytest_smolvm.guest.channel import Channel
from pytest_smolvm.session import GuestSession
from pytest_smolvm.vm import VMState

MAX_BODY = 1 << 20

# JSON text for reply fields: sane values, wrong types, and what Python's JSON reader turns
# into surprises (1e309 is inf, 5000 digits trip int's conversion limit, NaN is refused).
_RAW = st.sampled_from([
    "1e309", "-1e309", "1" * 5000, "NaN", "Infinity", "-0.0", "1.5", "true", "false", "null", '"3"',
    '"\\u001b]0;pwned\\u0007"', "[]", "{}", "-1", "-4096", "99999999999999999999", "2147483648",
    "[[[[[[[[[[1]]]]]]]]]]", '{"a":{"b":[1,{"c":null}]}}',
])
_JSON_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=8,
).map(json.dumps)
FIELD_VALUE = _RAW | _JSON_VALUE
FIELDS = ["exit_code", "stdout_len", "timed_out", "stdout_truncated", "stderr_truncated", "error", "errno",
          "size", "duration", "path"]


@st.composite
def replies(draw: st.DrawFn) -> tuple[str, bytes]:
    """(header JSON text with the placeholder ID for the request's id, body)."""
    fields = {name: draw(FIELD_VALUE) for name in draw(st.lists(st.sampled_from(FIELDS), unique=True))}
    op = draw(st.sampled_from(['"result"', '"error"', '"ok"', '"pong"', "1", "null"]) | _JSON_VALUE)
    fields["op"] = op
    fields["id"] = draw(st.sampled_from(["ID", "ID", "ID", "true", "ID.0", '"ID"']))
    text = "{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in fields.items()) + "}"
    return text, draw(st.binary(max_size=64))


class HostileAgent:
    """Reads one request and answers it with ``reply`` (raw frame bytes or header text),
    followed by a well-formed reply so a skipped frame never leaves the host waiting."""

    def __init__(self, reply: tuple[str, bytes] | bytes, *, silent: bool = False) -> None:
        self.host, self.sock = socket.socketpair()
        self.silent = silent
        self.sock.settimeout(10)
        self.reply = reply
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            req, _ = protocol.decode(lambda n: recv_exact(self.sock, n), 1 << 31)
            if isinstance(self.reply, bytes):
                self.sock.sendall(self.reply)
                if not self.silent:  # a cut frame ends in EOF, as when the VMM exits
                    self.sock.shutdown(socket.SHUT_WR)
                return
            text, body = self.reply
            raw = text.replace("ID", str(req["id"])).encode()
            self.sock.sendall(protocol.PREFIX.pack(protocol.MAGIC, len(raw), len(body)) + raw + body)
            self.sock.sendall(protocol.encode({"op": "error", "id": req["id"], "error": "fallback"}))
        except OSError:
            pass  # the host hung up first (it rejected the frame): fine

    def close(self) -> None:
        for s in (self.host, self.sock):
            s.close()
        self.thread.join(5)


def _talk_through(vm: SmolVM, sock: socket.socket) -> None:
    """Give ``vm`` a running guest whose control stream is ``sock`` (no VMM)."""
    session = vm._session = GuestSession.attach(vm.name, sock, max_body=MAX_BODY)
    vm._commands.attach(session, "default")
    vm._files.attach(session)


@contextmanager
def vm_talking_to(reply: tuple[str, bytes] | bytes) -> Iterator[SmolVM]:
    """A SmolVM whose control channel leads to a HostileAgent instead of a VMM."""
    agent = HostileAgent(reply)
    vm = SmolVM(VMConfig())
    _talk_through(vm, agent.host)
    vm._state = VMState.RUNNING
    try:
        yield vm
    finally:
        vm._state = VMState.CLOSED
        agent.close()


CALLS: dict[str, Callable[[SmolVM], object]] = {
    "run": lambda vm: vm.run("true", timeout=5),
    "run-check": lambda vm: vm.run(["false"], timeout=5, check=True, max_output=64),
    "put": lambda vm: vm.put(b"data", "/root/f"),
    "get": lambda vm: vm.get("/etc/hostname", max_size=1024),
}


def _only_smolvm_errors(vm: SmolVM, call: str) -> object:
    try:
        return CALLS[call](vm)
    except SmolVMError:
        return None
    except BaseException as exc:  # what the guest must never be able to cause
        pytest.fail(f"{call}: a hostile reply raised {type(exc).__name__}: {exc!r:.300}")


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(reply=replies(), call=st.sampled_from(sorted(CALLS)))
def test_malformed_replies_raise_only_smolvm_errors(reply: tuple[str, bytes], call: str) -> None:
    with vm_talking_to(reply) as vm:
        out = _only_smolvm_errors(vm, call)
    if isinstance(out, RunResult):  # a reply that was accepted is well-typed all through
        assert type(out.exit_code) is int and -128 <= out.exit_code <= 255
        assert isinstance(out.stdout_bytes, bytes) and isinstance(out.stderr_bytes, bytes)
        assert type(out.stdout_truncated) is bool and type(out.stderr_truncated) is bool
    elif call == "get" and out is not None:
        assert isinstance(out, bytes)


@settings(max_examples=150, deadline=None)
@given(frame=st.binary(max_size=80), call=st.sampled_from(sorted(CALLS)))
def test_garbage_frames_raise_only_smolvm_errors(frame: bytes, call: str) -> None:
    with vm_talking_to(protocol.MAGIC + frame if frame[:1] == b"\0" else frame) as vm:
        _only_smolvm_errors(vm, call)


@pytest.mark.parametrize(("field", "value"), [
    ("exit_code", '"0"'), ("exit_code", "1.0"), ("exit_code", "true"), ("exit_code", "1e309"),
    ("exit_code", "99999999999999999999"), ("stdout_len", "-1"), ("stdout_len", "65"),
    ("stdout_len", "1e309"), ("timed_out", '"yes"'), ("stdout_truncated", "[]"),
])
def test_each_bad_exec_field_is_a_protocol_error_naming_it(field: str, value: str) -> None:
    fields = {"op": '"result"', "id": "ID", "exit_code": "0", "stdout_len": "0", "timed_out": "false"}
    fields[field] = value
    text = "{" + ",".join(f'"{k}":{v}' for k, v in fields.items()) + "}"
    with vm_talking_to((text, b"x" * 64)) as vm:
        with pytest.raises(ProtocolError, match=field):
            vm.run("true", timeout=5)
        with pytest.raises(ProtocolError):  # and nothing more from that guest is trusted
            vm.run("true", timeout=5)


def test_missing_exit_code_is_a_protocol_error() -> None:
    with vm_talking_to(('{"op":"result","id":ID,"stdout_len":0}', b"")) as vm, \
            pytest.raises(ProtocolError, match="exit_code"):
        vm.run("true", timeout=5)


def test_agent_error_string_is_sanitised_and_bounded() -> None:
    msg = json.dumps("\x1b]0;pwned\x07\u202e" * 20_000)
    with vm_talking_to(('{"op":"error","id":ID,"error":' + msg + "}", b"")) as vm, \
            pytest.raises(GuestError) as info:
        vm.run("true", timeout=5)
    text = str(info.value)
    assert "\x1b" not in text and "\u202e" not in text and len(text) < 10_000


@pytest.mark.parametrize("call", ["put", "get"])
def test_put_get_timeouts_are_smolvm_errors(call: str, monkeypatch: pytest.MonkeyPatch) -> None:
    original = Channel.call

    def quick(self: Channel, header: dict[str, Any], body: bytes = b"", **kw: Any) -> Any:
        return original(self, header, body, **{**kw, "timeout": 0.3})

    monkeypatch.setattr(Channel, "call", quick)
    agent = HostileAgent(b"", silent=True)  # reads the request, then says nothing
    vm = SmolVM(VMConfig())
    _talk_through(vm, agent.host)
    vm._state = VMState.RUNNING
    try:
        with pytest.raises(SmolVMError, match="did not answer") as info:
            CALLS[call](vm)
        assert isinstance(info.value, TimeoutError)
    finally:
        vm._state = VMState.CLOSED
        agent.close()


@pytest.mark.parametrize(("field", "step"), [
    ("net", "x"), ("net", {"exit_code": "1"}), ("resize", {"exit_code": 1e309}), ("resize", {"output": 7}),
    ("net", {"exit_code": True}),
])
def test_malformed_setup_steps_are_protocol_errors(field: str, step: object) -> None:
    from pytest_smolvm.guest import replies

    with pytest.raises(ProtocolError):
        replies.parse_step({"op": "setup", field: step}, field)


def test_setup_steps_parse() -> None:
    from pytest_smolvm.guest import replies

    step = replies.parse_step({"net": {"exit_code": 2, "output": "\x1b[2Jno"}}, "net")
    assert step is not None and step.exit_code == 2 and "\x1b" not in step.output
    assert replies.parse_step({}, "resize") is None
