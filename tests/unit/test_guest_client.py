"""GuestClient against a scripted agent over a socketpair: the requests it builds for each
operation, the replies it decodes, and what a malformed or missing reply raises."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sockpeer import recv_exact

from pytest_smolvm.errors import ProtocolError
from pytest_smolvm.guest import protocol
from pytest_smolvm.guest.channel import Channel, ChannelClosed
from pytest_smolvm.guest.client import GuestClient, exec_body_limit
from pytest_smolvm.guest.replies import AgentError, ExecReply, SetupReply, StepResult

Reply = tuple[dict[str, Any], bytes]


class ScriptedAgent:
    """Answers each request with the next scripted reply (built from the request, whose id
    it copies), recording what it was sent; hangs up when the script runs out."""

    def __init__(self, *script: Callable[[dict[str, Any], bytes], Reply]) -> None:
        self.host, self.sock = socket.socketpair()
        self.sock.settimeout(10)
        self.script = list(script)
        self.requests: list[tuple[dict[str, Any], bytes]] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            for answer in self.script:
                req, body = protocol.decode(lambda n: recv_exact(self.sock, n), 1 << 24)
                self.requests.append((req, body))
                header, data = answer(req, body)
                self.sock.sendall(protocol.encode({**header, "id": req["id"]}, data))
            self.sock.shutdown(socket.SHUT_WR)
        except (OSError, EOFError):
            pass

    def close(self) -> None:
        for s in (self.host, self.sock):
            s.close()
        self.thread.join(5)


Talk = Callable[..., tuple[GuestClient, ScriptedAgent]]


@pytest.fixture
def talk() -> Iterator[Talk]:
    agents: list[ScriptedAgent] = []

    def start(*script: Callable[[dict[str, Any], bytes], Reply]) -> tuple[GuestClient, ScriptedAgent]:
        agent = ScriptedAgent(*script)
        agents.append(agent)
        return GuestClient(Channel(agent.host, lambda: True, max_body=1 << 20)), agent

    yield start
    for agent in agents:
        agent.close()


def reply(header: dict[str, Any], body: bytes = b"") -> Callable[[dict[str, Any], bytes], Reply]:
    return lambda req, data: (header, body)


def test_hello(talk: Talk) -> None:
    guest, agent = talk(reply({"op": "hello", "version": 1}))
    guest.hello(timeout=5)
    assert agent.requests[0][0]["op"] == "hello"


def test_setup_sends_only_given_fields_and_decodes_steps(talk: Talk) -> None:
    guest, agent = talk(
        reply({"op": "ok", "net": {"exit_code": 0, "output": ""}, "resize": {"exit_code": 1, "output": "no space"}}),
        reply({"op": "ok"}),
    )
    got = guest.setup(time_ns=5, hostname="smolvm-x", machine_id="ab" * 16, grow_root=True,
                      net={"ip": "10.0.0.2"}, entropy=b"r" * 64, timeout=5)
    assert got == SetupReply(None, StepResult(0, ""), StepResult(1, "no space"))
    req, body = agent.requests[0]
    assert {k: v for k, v in req.items() if k != "id"} == {
        "op": "setup", "time_ns": 5, "hostname": "smolvm-x", "machine_id": "ab" * 16, "grow_root": True,
        "net": {"ip": "10.0.0.2"}}
    assert body == b"r" * 64
    assert guest.setup(timeout=5) == SetupReply(None, None, None)
    assert set(agent.requests[1][0]) == {"op", "id"}


def test_setup_error_reply(talk: Talk) -> None:
    guest, _ = talk(reply({"op": "error", "error": "read-only file system", "errno": 30}))
    assert guest.setup(timeout=5) == SetupReply(AgentError("read-only file system", 30), None, None)


def test_exec_builds_the_request_and_splits_the_body(talk: Talk) -> None:
    guest, agent = talk(reply({"op": "result", "exit_code": 3, "stdout_len": 3, "stdout_truncated": True},
                              b"outerr"))
    got = guest.exec(["ls", "-l"], timeout=2, wait=12, max_output=64, env={"A": "1"}, cwd="/tmp", stdin=b"in")
    assert got == ExecReply(3, False, b"out", b"err", True, False)
    req, body = agent.requests[0]
    assert {k: v for k, v in req.items() if k != "id"} == {
        "op": "exec", "argv": ["ls", "-l"], "env": {"A": "1"}, "cwd": "/tmp", "timeout": 2.0, "max_output": 64}
    assert body == b"in"


def test_exec_agent_error(talk: Talk) -> None:
    guest, _ = talk(reply({"op": "error", "error": "no such file"}))
    assert guest.exec(["x"], timeout=1, wait=5, max_output=64) == AgentError("no such file", 0)


def test_exec_reply_body_is_bounded_by_max_output(talk: Talk) -> None:
    guest, _ = talk(reply({"op": "result", "exit_code": 0, "stdout_len": 0}, b"x" * (exec_body_limit(64) + 1)))
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        guest.exec(["x"], timeout=1, wait=5, max_output=64)


def test_put_sends_path_mode_and_data(talk: Talk) -> None:
    guest, agent = talk(reply({"op": "ok"}), reply({"op": "error", "error": "denied", "errno": 13}))
    assert guest.put("/root/f", b"data", mode=0o600, timeout=5) is None
    req, body = agent.requests[0]
    assert (req["op"], req["path"], req["mode"], body) == ("put", "/root/f", 0o600, b"data")
    assert guest.put("/etc/f", b"", timeout=5) == AgentError("denied", 13)
    assert "mode" not in agent.requests[1][0]


def test_get_returns_the_body_or_the_error(talk: Talk) -> None:
    guest, agent = talk(reply({"op": "ok"}, b"content"), reply({"op": "error", "error": "missing", "errno": 2}))
    assert guest.get("/etc/hostname", max_size=100, timeout=5) == b"content"
    assert agent.requests[0][0]["max"] == 100
    assert guest.get("/nope", max_size=100, timeout=5) == AgentError("missing", 2)


def test_get_refuses_a_body_over_max_size(talk: Talk) -> None:
    guest, _ = talk(reply({"op": "ok"}, b"x" * 11))
    with pytest.raises(ProtocolError):
        guest.get("/f", max_size=10, timeout=5)


def test_sync(talk: Talk) -> None:
    guest, agent = talk(reply({"op": "ok"}))
    guest.sync(timeout=5)
    assert agent.requests[0][0]["op"] == "sync"


def test_malformed_reply_is_a_protocol_error_and_poisons_the_channel(talk: Talk) -> None:
    guest, _ = talk(reply({"op": "result", "exit_code": "0", "stdout_len": 0}), reply({"op": "ok"}))
    with pytest.raises(ProtocolError, match="exit_code"):
        guest.exec(["true"], timeout=1, wait=5, max_output=64)
    with pytest.raises(ProtocolError, match="unusable"):
        guest.sync(timeout=5)


def test_channel_errors_pass_through(talk: Talk) -> None:
    guest, _ = talk()  # hangs up at once
    with pytest.raises(ChannelClosed):
        guest.hello(timeout=5)
