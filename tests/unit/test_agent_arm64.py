"""The arm64 agent reports exec failures like the host's (issue 22, bug 5).

musl's aarch64 ``vfork()`` is a plain fork (and qemu-user runs every vfork as a fork), so an
agent that passes its child's exec error back through vfork-shared memory loses it: a missing
binary, a non-executable file and a bad cwd all gave exit 127 with an empty stderr. The agent
now reports through a close-on-exec pipe. Here the arm64 binary runs on the host (natively on
arm64, else through binfmt_misc and qemu-user) beside the host's own, and must answer the same
bytes. scripts/run-arm64 also runs every host-mode agent test on it (SMOLVM_TEST_AGENT_ARCH).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agentproc import AgentProcess, recv_frame
from test_agent_spawn import gone

from pytest_smolvm.errors import ImageError
from pytest_smolvm.images import agentbin, build


@pytest.fixture(scope="module")
def arm64_agent() -> Path:
    why = build.binfmt_problem("arm64")
    if why is not None:
        pytest.skip(f"this host cannot run arm64 programs: {why}")
    try:
        return agentbin.agent_binary("arm64")
    except ImageError as exc:
        pytest.skip(f"no compiler for the arm64 agent here: {exc}")


@pytest.fixture(params=["host", "arm64"])
def agent(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[AgentProcess]:
    binary = request.getfixturevalue("arm64_agent") if request.param == "arm64" else agentbin.agent_binary()
    with AgentProcess(binary, cwd=tmp_path) as proc:
        yield proc


def run(agent: AgentProcess, argv: list[str], **req: Any) -> tuple[int, bytes]:
    header, body = agent.call({"op": "exec", "argv": argv, **req})
    assert header["op"] == "result", header
    return int(header["exit_code"]), body[header["stdout_len"]:]


def test_exec_failures_are_reported_with_their_reason(agent: AgentProcess, tmp_path: Path) -> None:
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)
    bad = tmp_path / "no" / "such" / "dir"
    assert run(agent, ["/nonexistent/sh", "-c", "true"]) == \
        (127, b"smolvm: cannot execute /nonexistent/sh: No such file or directory\n")
    assert run(agent, [str(script)]) == (126, f"smolvm: cannot execute {script}: Permission denied\n".encode())
    assert run(agent, ["true"], cwd=str(bad)) == \
        (127, f"smolvm: cannot execute cwd {bad}: No such file or directory\n".encode())
    assert run(agent, ["smolvm-no-such-command"]) == \
        (127, b"smolvm: cannot execute smolvm-no-such-command: command not found\n")
    assert run(agent, ["/bin/sh", "-c", "exit 3"]) == (3, b"")


def test_a_spawned_process_has_its_own_group_before_it_is_answered(agent: AgentProcess) -> None:
    """The agent answers "started" only once the child has exec'd, after its setsid(): a
    hang-up's group kill always finds the group (with fork semantics it raced)."""
    for _ in range(5):
        rid = agent.send({"op": "exec", "argv": ["sleep", "60"], "spawn": True})
        started, _ = recv_frame(agent.sock)
        assert started["id"] == rid and started["op"] == "started", started
        pid = started["pid"]
        assert os.getpgid(pid) == pid and os.getsid(pid) == pid
        sid = agent.send({"op": "signal", "target": rid, "signal": signal.SIGKILL})
        replies = {}
        while len(replies) < 2:  # the signal's "ok" and the spawn's "result", in either order
            reply = recv_frame(agent.sock)[0]
            replies[reply["id"]] = reply
        assert replies[sid]["op"] == "ok" and replies[rid]["exit_code"] == -signal.SIGKILL
        assert gone(pid)
