"""Unit tests of the agent's streamed execs and spawned processes (``"stream"``/``"spawn"``,
the ``signal`` and ``stdin`` ops), on the host with harmless commands (tests/agentproc.py)."""

from __future__ import annotations

import errno
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agentproc import AgentProcess, recv_frame

SH = "/bin/sh"


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProcess]:
    with AgentProcess(cwd=tmp_path) as proc:
        yield proc


def gone(pid: int, within: float = 5.0) -> bool:
    """Whether ``pid`` is dead (or a zombie nobody reaped yet) within ``within`` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.02)
    return False


def frames_until_end(agent: AgentProcess, rid: int) -> list[tuple[dict[str, Any], bytes, float]]:
    """Every frame for ``rid`` (with its arrival time) up to its result or error."""
    got = []
    while True:
        header, body = recv_frame(agent.sock)
        if header["id"] != rid:
            continue
        got.append((header, body, time.monotonic()))
        if header["op"] in ("result", "error"):
            return got


def test_stream_sends_output_before_the_result(agent: AgentProcess) -> None:
    t0 = time.monotonic()
    rid = agent.send({"op": "exec", "argv": [SH, "-c", "echo one; echo err >&2; sleep 0.5; echo two"],
                      "stream": True})
    got = frames_until_end(agent, rid)
    outs = [(h["stream"], b) for h, b, _ in got if h["op"] == "out"]
    assert b"".join(b for s, b in outs if s == "stdout") == b"one\ntwo\n"
    assert b"".join(b for s, b in outs if s == "stderr") == b"err\n"
    first_at = got[0][2] - t0
    end_at = got[-1][2] - t0
    assert got[0][0]["op"] == "out" and first_at < end_at - 0.3   # live, not at the end
    result, body, _ = got[-1]
    assert (result["op"], result["exit_code"], result["stdout_len"], body) == ("result", 0, 0, b"")


def test_stream_cap_counts_streamed_bytes(agent: AgentProcess) -> None:
    rid = agent.send({"op": "exec", "argv": [SH, "-c", "head -c 300000 /dev/zero"], "stream": True,
                      "max_output": 1000})
    got = frames_until_end(agent, rid)
    assert sum(len(b) for h, b, _ in got if h["op"] == "out") == 1000
    assert got[-1][0]["stdout_truncated"] is True


def test_spawn_started_then_signal_kills_its_group(agent: AgentProcess) -> None:
    rid = agent.send({"op": "exec", "argv": [SH, "-c", "sleep 60 & echo $!; wait"], "spawn": True})
    started, _ = recv_frame(agent.sock)
    assert (started["op"], started["id"]) == ("started", rid)
    pid = started["pid"]
    assert isinstance(pid, int) and pid > 0
    out, body = recv_frame(agent.sock)
    assert out["op"] == "out"
    sleeper = int(body)
    # other requests are answered while it runs
    ping = agent.send({"op": "ping"})
    assert recv_frame(agent.sock)[0] == {"op": "pong", "id": ping}
    sig = agent.send({"op": "signal", "target": rid, "signal": int(signal.SIGTERM)})
    frames = {}
    while len(frames) < 2:
        header, _ = recv_frame(agent.sock)
        frames[header["id"]] = header
    assert frames[sig]["op"] == "ok"
    assert frames[rid]["op"] == "result" and frames[rid]["exit_code"] == -signal.SIGTERM
    assert gone(sleeper)   # the backgrounded sleep died with its group
    again = agent.send({"op": "signal", "target": rid, "signal": 9})
    reply, _ = recv_frame(agent.sock)
    assert (reply["id"], reply["op"], reply["errno"]) == (again, "error", errno.ESRCH)


def test_spawn_stdin_writes_and_close(agent: AgentProcess) -> None:
    rid = agent.send({"op": "exec", "argv": ["cat"], "spawn": True})
    assert recv_frame(agent.sock)[0]["op"] == "started"
    w1 = agent.send({"op": "stdin", "target": rid}, b"hello ")
    got: dict[int, list[Any]] = {}
    out = b""
    while out != b"hello " or w1 not in got:
        header, body = recv_frame(agent.sock)
        got.setdefault(header["id"], []).append(header)
        if header["op"] == "out":
            out += body
    assert got[w1][0]["op"] == "ok"
    w2 = agent.send({"op": "stdin", "target": rid, "close": True}, b"world")
    ends: dict[int, dict[str, Any]] = {}
    out = b""
    while rid not in ends or w2 not in ends:
        header, body = recv_frame(agent.sock)
        if header["op"] == "out":
            out += body
        else:
            ends[header["id"]] = header
    assert out == b"world"
    assert ends[rid]["exit_code"] == 0 and ends[w2]["op"] == "ok"
    late = agent.send({"op": "stdin", "target": rid}, b"x")
    reply, _ = recv_frame(agent.sock)
    assert (reply["id"], reply["op"], reply["errno"]) == (late, "error", errno.ESRCH)


def test_stdin_to_a_process_that_never_reads_does_not_block_the_agent(agent: AgentProcess) -> None:
    rid = agent.send({"op": "exec", "argv": ["sleep", "60"], "spawn": True})
    assert recv_frame(agent.sock)[0]["op"] == "started"
    agent.send({"op": "stdin", "target": rid}, b"x" * (1 << 20))    # more than a pipe holds
    # One write in progress and one queued behind it: a third is refused (EBUSY) at once.
    time.sleep(0.3)
    agent.sock.settimeout(0.5)
    for accepted in range(1, 6):  # noqa: B007 - read after the loop
        busy = agent.send({"op": "stdin", "target": rid}, b"y")
        try:
            reply, _ = recv_frame(agent.sock)
            break
        except TimeoutError:
            continue
    agent.sock.settimeout(30)
    assert (reply["id"], reply["errno"]) == (busy, errno.EBUSY)
    assert accepted <= 2
    ping = agent.send({"op": "ping"})
    assert recv_frame(agent.sock)[0] == {"op": "pong", "id": ping}
    agent.send({"op": "signal", "target": rid, "signal": 9})
    ends = {}
    while rid not in ends or len(ends) < 2 + accepted:   # the result, the signal, the writes
        header, _ = recv_frame(agent.sock)
        ends[header["id"]] = header
    assert ends[rid]["exit_code"] == -9
    # the write in progress and the queued one both fail
    assert [h["errno"] for h in ends.values() if h["op"] == "error"] == [errno.EPIPE] * accepted


def test_spawn_failure_is_a_result_not_started(agent: AgentProcess) -> None:
    rid = agent.send({"op": "exec", "argv": ["smolvm-no-such-command"], "spawn": True})
    header, body = recv_frame(agent.sock)
    assert (header["id"], header["op"], header["exit_code"]) == (rid, "result", 127)
    assert b"command not found" in body


@pytest.mark.parametrize(("req", "why"), [
    ({"target": "1", "signal": 9}, "target"),
    ({"target": 1, "signal": 0}, "signal"),
    ({"target": 1, "signal": True}, "signal"),
    ({"target": 1, "signal": 65}, "signal"),
])
def test_signal_op_validates(agent: AgentProcess, req: dict[str, Any], why: str) -> None:
    reply, _ = agent.call({"op": "signal", **req})
    assert reply["op"] == "error" and why in reply["error"] and reply["errno"] == errno.EINVAL


def test_spawn_needs_integer_id(agent: AgentProcess) -> None:
    agent.sock.sendall(__import__("pytest_smolvm.guest.protocol", fromlist=["encode"]).encode(
        {"op": "exec", "argv": ["true"], "spawn": True, "id": "x"}))
    reply, _ = recv_frame(agent.sock)
    assert reply["op"] == "error" and "integer id" in reply["error"]


def test_hang_up_kills_spawned_processes(tmp_path: Path) -> None:
    agent = AgentProcess(cwd=tmp_path)
    rid = agent.send({"op": "exec", "argv": ["sleep", "60"], "spawn": True})
    started, _ = recv_frame(agent.sock)
    assert started["id"] == rid
    assert agent.close() == 0
    if not gone(started["pid"]):
        os.kill(started["pid"], signal.SIGKILL)
        pytest.fail("the spawned sleep outlived the agent's connection")


def test_streamed_exec_with_integer_id_can_be_signalled(agent: AgentProcess) -> None:
    rid = agent.send({"op": "exec", "argv": ["sleep", "60"], "stream": True})
    time.sleep(0.3)
    sig = agent.send({"op": "signal", "target": rid, "signal": 9})
    stdin = agent.send({"op": "stdin", "target": rid}, b"x")   # a run's stdin is not open
    got = {}
    while len(got) < 3:
        header, _ = recv_frame(agent.sock)
        got[header["id"]] = header
    assert got[sig]["op"] == "ok" and got[rid]["exit_code"] == -9
    assert got[stdin]["errno"] in (errno.EPIPE, errno.ESRCH)
