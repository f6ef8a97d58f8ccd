"""Unit tests of the static guest agent's requests, run on the host with harmless commands:
the binary the guest boots, serving a socketpair (tests/agentproc.py). ``setup`` is a no-op
in that mode (it would set the host's clock and hostname); real VMs test it.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agentproc import AgentProcess, recv_frame

from pytest_smolvm.guest import protocol

BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProcess]:
    with AgentProcess(cwd=tmp_path) as proc:
        yield proc


@pytest.fixture
def run(agent: AgentProcess) -> Any:
    def run(argv: list[str], stdin: bytes = b"", **req: Any) -> tuple[dict[str, Any], bytes, bytes]:
        t0 = time.monotonic()
        header, body = agent.call({"op": "exec", "argv": argv, **req}, stdin)
        header["elapsed"] = time.monotonic() - t0
        if header["op"] == "error":
            return header, b"", b""
        n = header["stdout_len"]
        return header, body[:n], body[n:]

    return run


SH = "/bin/sh"

# ---------------------------------------------------------------- exec: results


def test_exit_code_and_stream_split(run: Any, tmp_path: Path) -> None:
    header, out, err = run([SH, "-c", "echo out; echo err >&2; echo more; exit 3"], cwd=str(tmp_path))
    assert header["op"] == "result"
    assert header["id"] == 1
    assert header["exit_code"] == 3
    assert header["timed_out"] is False
    assert header["stdout_truncated"] is False
    assert header["stderr_truncated"] is False
    assert out == b"out\nmore\n"
    assert err == b"err\n"
    assert header["duration"] >= 0


@pytest.mark.parametrize(("cmd", "code"), [("true", 0), ("false", 1)])
def test_true_false(run: Any, cmd: str, code: int) -> None:
    header, out, err = run([cmd])
    assert header["exit_code"] == code
    assert (out, err) == (b"", b"")


def test_binary_output_is_kept_exactly(run: Any) -> None:
    header, out, _ = run([SH, "-c", r"printf 'a\000b\377\n'"])
    assert header["exit_code"] == 0
    assert out == b"a\x00b\xff\n"


def test_command_not_found(run: Any) -> None:
    header, out, err = run(["smolvm-no-such-command-xyz", "arg"])
    assert header["exit_code"] == 127
    assert header["stdout_len"] == 0
    assert out == b""
    assert b"smolvm-no-such-command-xyz" in err
    assert b"not found" in err


def test_absolute_path_not_found(run: Any, tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    header, _, err = run([str(missing)])
    assert header["exit_code"] == 127
    assert str(missing).encode() in err


def test_not_executable(run: Any, tmp_path: Path) -> None:
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)
    header, out, err = run([str(script)])
    assert header["exit_code"] == 126
    assert out == b""
    assert err.startswith(b"smolvm: cannot execute")


def test_bad_cwd_is_named(run: Any, tmp_path: Path) -> None:
    bad = tmp_path / "no" / "such" / "dir"
    header, out, err = run(["true"], cwd=str(bad))
    assert header["exit_code"] == 127
    assert out == b""
    assert f"cwd {bad}".encode() in err


def test_cwd_is_applied(run: Any, tmp_path: Path) -> None:
    work = tmp_path / "work dir"
    work.mkdir()
    _, out, _ = run(["pwd"], cwd=str(work))
    assert out.decode().strip() == str(work)


def test_relative_command_resolved_in_cwd(run: Any, tmp_path: Path) -> None:
    script = tmp_path / "tool.sh"
    script.write_text("#!/bin/sh\necho from-tool\n")
    script.chmod(0o755)
    header, out, _ = run(["./tool.sh"], cwd=str(tmp_path))
    assert header["exit_code"] == 0
    assert out == b"from-tool\n"


def test_killed_by_signal_reports_negative_signal(run: Any) -> None:
    header, _, _ = run([SH, "-c", "kill -9 $$"])
    assert header["exit_code"] == -signal.SIGKILL
    assert header["timed_out"] is False


def test_sigpipe_default_in_child(run: Any) -> None:
    # The agent (like Python) ignores SIGPIPE, but commands must get the default action:
    # `yes | head -1` ends because `yes` dies of SIGPIPE.
    header, out, _ = run([SH, "-c", "yes | head -n 1"])
    assert header["exit_code"] == 0
    assert out == b"y\n"


# ---------------------------------------------------------------- exec: env


def test_env_is_visible_and_base_path_used(run: Any) -> None:
    _, out, _ = run([SH, "-c", 'printf "%s|%s|%s" "$FOO" "$PATH" "$HOME"'], env={"FOO": "bar baz"})
    foo, path, home = out.decode().split("|")
    assert foo == "bar baz"
    assert path == BASE_PATH
    assert home == "/root"


def test_env_overrides_base(run: Any, tmp_path: Path) -> None:
    _, out, _ = run([SH, "-c", 'printf "%s" "$HOME"'], env={"HOME": str(tmp_path)})
    assert out.decode() == str(tmp_path)


def test_host_environment_does_not_leak(run: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMOLVM_AGENT_SECRET", "leaked")
    _, out, _ = run([SH, "-c", 'printf "%s" "${SMOLVM_AGENT_SECRET-unset}"'])
    assert out == b"unset"


def test_command_path_is_searched_on_its_own_path(run: Any, tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    tool = bindir / "mytool"
    tool.write_text("#!/bin/sh\necho mytool ran\n")
    tool.chmod(0o755)
    header, out, _ = run(["mytool"], env={"PATH": str(bindir)})
    assert header["exit_code"] == 0
    assert out == b"mytool ran\n"
    # ... and not on the agent's: with only an empty dir on PATH, even `sh` is not found.
    empty = tmp_path / "empty"
    empty.mkdir()
    header, _, err = run(["sh", "-c", "true"], env={"PATH": str(empty)})
    assert header["exit_code"] == 127
    assert b"sh" in err


# ---------------------------------------------------------------- exec: stdin


def test_stdin_is_delivered(run: Any) -> None:
    header, out, _ = run(["cat"], stdin=b"hello\x00world\n")
    assert header["exit_code"] == 0
    assert out == b"hello\x00world\n"


def test_large_stdin_and_stdout_do_not_deadlock(run: Any) -> None:
    data = os.urandom(3 << 20)  # far larger than a pipe buffer in both directions
    header, out, _ = run(["cat"], stdin=data)
    assert header["exit_code"] == 0
    assert out == data


def test_no_stdin_reads_eof(run: Any) -> None:
    header, out, _ = run(["cat"], timeout=10)
    assert header["exit_code"] == 0
    assert header["timed_out"] is False
    assert out == b""


def test_stdin_not_read_by_command(run: Any) -> None:
    header, out, _ = run([SH, "-c", "exec 0<&-; echo closed"], stdin=os.urandom(1 << 20))
    assert header["exit_code"] == 0
    assert out == b"closed\n"


# ---------------------------------------------------------------- exec: limits


def test_max_output_truncates_each_stream(run: Any) -> None:
    header, out, err = run([SH, "-c", "printf 0123456789ABCDEF; printf errerrerrerrerr >&2"], max_output=10)
    assert out == b"0123456789"
    assert err == b"errerrerre"
    assert header["stdout_len"] == 10
    assert header["stdout_truncated"] is True
    assert header["stderr_truncated"] is True
    assert header["exit_code"] == 0


def test_max_output_exact_fit_is_not_truncated(run: Any) -> None:
    header, out, _ = run([SH, "-c", "printf 0123456789"], max_output=10)
    assert out == b"0123456789"
    assert header["stdout_truncated"] is False


def test_big_output_truncated_without_blocking_the_command(run: Any) -> None:
    # 4 MiB of output with a 1 KiB cap: the rest must be read and dropped, or the command
    # would block on a full pipe and never exit.
    header, out, _ = run([SH, "-c", "head -c 4194304 /dev/zero; echo done >&2"], max_output=1024, timeout=20)
    assert header["timed_out"] is False
    assert header["exit_code"] == 0
    assert out == bytes(1024)
    assert header["stdout_truncated"] is True


def test_timeout_kills_command(run: Any) -> None:
    header, _, _ = run(["sleep", "30"], timeout=0.5)
    assert header["elapsed"] < 3
    assert header["timed_out"] is True
    assert header["exit_code"] == -signal.SIGKILL


def gone(pid: int, within: float = 5.0) -> bool:
    """Whether process ``pid`` is dead (or a zombie) within ``within`` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


def test_timeout_kills_whole_process_group(run: Any) -> None:
    header, out, _ = run([SH, "-c", "sleep 30 & echo $!; sleep 30 & wait"], timeout=0.5)
    assert header["timed_out"] is True
    assert header["elapsed"] < 3
    assert gone(int(out.split()[0])), "the background sleep in the command's process group survived"


# ---------------------------------------------------------------- exec: background children


def test_background_child_does_not_hold_reply(run: Any, agent: AgentProcess, tmp_path: Path) -> None:
    marker = tmp_path / "survived"
    script = f"(sleep 1; echo late output; echo late >&2; echo yes > {marker}) & echo $!; echo started"
    header, out, _ = run([SH, "-c", script])
    bg_pid = int(out.split()[0])
    try:
        assert header["elapsed"] < 1, "run() waited for the background child"
        assert header["exit_code"] == 0
        assert b"started" in out
        assert agent.call({"op": "ping"})[0]["op"] == "pong"  # the agent serves meanwhile
        # The child's late output is read and dropped: it is not killed by SIGPIPE ...
        assert gone(bg_pid, within=10)
        assert marker.read_text() == "yes\n"
        # ... and nothing else is sent for that request.
        agent.sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            agent.sock.recv(1)
    finally:
        try:
            os.kill(bg_pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ---------------------------------------------------------------- put / get


def put(agent: AgentProcess, path: Path | str, data: bytes, **extra: Any) -> dict[str, Any]:
    return agent.call({"op": "put", "path": str(path), **extra}, data)[0]


def get(agent: AgentProcess, path: Path | str, **extra: Any) -> tuple[dict[str, Any], bytes]:
    return agent.call({"op": "get", "path": str(path), **extra})


def test_put_get_round_trip(agent: AgentProcess, tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "c.bin"
    data = os.urandom(300_000)
    assert put(agent, target, data, mode=0o600) == {"op": "ok", "id": agent._next, "size": len(data)}
    assert target.read_bytes() == data
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    header, got = get(agent, target)
    assert (header["op"], header["size"]) == ("ok", len(data))
    assert got == data


def test_put_overwrites_and_applies_mode_to_existing_file(agent: AgentProcess, tmp_path: Path) -> None:
    target = tmp_path / "f"
    put(agent, target, b"long original content", mode=0o600)
    put(agent, target, b"short", mode=0o755)
    assert target.read_bytes() == b"short"
    assert stat.S_IMODE(target.stat().st_mode) == 0o755


def test_put_without_mode_keeps_umask_default(agent: AgentProcess, tmp_path: Path) -> None:
    target = tmp_path / "plain"
    put(agent, target, b"")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o644 & ~umask
    assert target.read_bytes() == b""


def test_put_into_a_file_as_directory_fails(agent: AgentProcess, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    header = put(agent, tmp_path / "file" / "child", b"data")
    assert header["op"] == "error"
    assert header["errno"] in (errno.ENOTDIR, errno.EEXIST)
    assert header["path"] == str(tmp_path / "file" / "child")


@pytest.mark.parametrize(("req", "why"), [
    ({}, "path"), ({"path": ""}, "path"), ({"path": 7}, "path"), ({"path": "/tmp/x\0y"}, "path"),
    ({"path": "/tmp/smolvm-never", "mode": "0644"}, "mode"), ({"path": "/tmp/smolvm-never", "mode": 1 << 20}, "mode"),
])
def test_put_bad_fields_are_error_replies(agent: AgentProcess, req: dict[str, Any], why: str) -> None:
    header, _ = agent.call({"op": "put", **req}, b"data")
    assert header["op"] == "error" and why in header["error"]
    assert not Path("/tmp/smolvm-never").exists()


def test_get_over_max(agent: AgentProcess, tmp_path: Path) -> None:
    target = tmp_path / "big"
    target.write_bytes(b"x" * 101)
    header, data = get(agent, target, max=100)
    assert header["op"] == "error" and "over the limit of 100" in header["error"]
    assert header["errno"] == errno.EFBIG
    assert header["path"] == str(target)
    assert data == b""
    _, data = get(agent, target, max=101)
    assert data == b"x" * 101


def test_get_limit_holds_when_size_lies(agent: AgentProcess) -> None:
    # procfs reports st_size 0; the limit must still apply to what is actually read.
    assert os.stat("/proc/self/status").st_size == 0
    header, _ = get(agent, "/proc/self/status", max=10)
    assert header["op"] == "error" and "limit of 10" in header["error"]
    assert header["errno"] == errno.EFBIG
    header, data = get(agent, "/proc/self/status", max=1 << 20)
    assert data.startswith(b"Name:")
    assert header["size"] == len(data)


def test_get_missing(agent: AgentProcess, tmp_path: Path) -> None:
    header, _ = get(agent, tmp_path / "missing")
    assert (header["op"], header["errno"], header["error"]) == ("error", errno.ENOENT, "No such file or directory")


def test_get_directory(agent: AgentProcess, tmp_path: Path) -> None:
    header, _ = get(agent, tmp_path)
    assert (header["op"], header["errno"]) == ("error", errno.EISDIR)


# ---------------------------------------------------------------- the command's PATH


def test_path_search_skips_directories_and_non_executables(run: Any, tmp_path: Path) -> None:
    d1, d2 = tmp_path / "d1", tmp_path / "d2"
    (d1 / "sh").mkdir(parents=True)  # a directory named sh
    d2.mkdir()
    (d2 / "sh").write_text("not executable")
    (d2 / "sh").chmod(0o644)
    header, out, _ = run(["sh", "-c", "echo found"], env={"PATH": f"{d1}:{d2}:/bin:/usr/bin"})
    assert (header["exit_code"], out) == (0, b"found\n")


def test_missing_interpreter_path_is_named(run: Any) -> None:
    """(A missing /bin/sh, what run("a string") needs, is tested in a real VM: it says so.)"""
    header, _, err = run(["/nonexistent/sh", "-c", "true"])
    assert header["exit_code"] == 127
    assert err == b"smolvm: cannot execute /nonexistent/sh: No such file or directory\n"


# ---------------------------------------------------------------- the request loop


def read_reply(sock: Any) -> tuple[dict[str, Any], bytes]:
    return recv_frame(sock)


def test_serve_ping_put_get_exec(agent: AgentProcess, tmp_path: Path) -> None:
    sock = agent.sock
    sock.sendall(protocol.encode({"op": "ping", "id": 1}))
    assert read_reply(sock)[0] == {"op": "pong", "id": 1}

    target = tmp_path / "x" / "f.txt"
    sock.sendall(protocol.encode({"op": "put", "id": 2, "path": str(target), "mode": 0o640}, b"content"))
    assert read_reply(sock)[0] == {"op": "ok", "id": 2, "size": 7}

    sock.sendall(protocol.encode({"op": "get", "id": 3, "path": str(target)}))
    header, body = read_reply(sock)
    assert (header["id"], header["size"], body) == (3, 7, b"content")

    sock.sendall(protocol.encode({"op": "exec", "id": 4, "argv": ["echo", "hi"], "cwd": str(tmp_path)}))
    header, body = read_reply(sock)
    assert (header["op"], header["id"], header["exit_code"], body) == ("result", 4, 0, b"hi\n")

    sock.sendall(protocol.encode({"op": "hello", "id": 5}))
    header, _ = read_reply(sock)
    assert (header["op"], header["version"], header["pid"]) == ("hello", protocol.PROTOCOL_VERSION, agent.proc.pid)
    sock.sendall(protocol.encode({"op": "sync", "id": 6}))
    assert read_reply(sock)[0] == {"op": "ok", "id": 6}


def test_serve_errors_are_replies(agent: AgentProcess, tmp_path: Path) -> None:
    sock = agent.sock
    sock.sendall(protocol.encode({"op": "get", "id": 5, "path": str(tmp_path / "missing")}))
    header, _ = read_reply(sock)
    assert header["op"] == "error"
    assert header["id"] == 5
    assert header["errno"] == errno.ENOENT
    assert header["path"] == str(tmp_path / "missing")

    sock.sendall(protocol.encode({"op": "frobnicate", "id": 6}))
    header, _ = read_reply(sock)
    assert header["op"] == "error"
    assert "frobnicate" in header["error"]

    sock.sendall(protocol.encode({"op": "put", "id": 7}))  # no path
    header, _ = read_reply(sock)
    assert (header["op"], header["id"]) == ("error", 7)

    for bad in ({"argv": []}, {"argv": "ls"}, {"argv": ["a\0b"]}, {"argv": ["true"], "env": {"A=B": "1"}},
                {"argv": ["true"], "env": {"A": 1}}, {"argv": ["true"], "max_output": -1},
                {"argv": ["true"], "timeout": "1"}, {"argv": ["true"], "cwd": 3}):
        sock.sendall(protocol.encode({"op": "exec", "id": 8, **bad}))
        header, _ = read_reply(sock)
        assert (header["op"], header["id"]) == ("error", 8), bad
        assert header["error"].startswith("exec: "), bad

    sock.sendall(protocol.encode({"op": "ping", "id": 9}))  # still serving
    assert read_reply(sock)[0] == {"op": "pong", "id": 9}


def test_setup_is_a_no_op_in_host_test_mode(agent: AgentProcess) -> None:
    hostname = os.uname().nodename
    header, _ = agent.call({"op": "setup", "hostname": "smolvm-never", "time_ns": 1}, b"seed")
    assert header["op"] == "ok"
    assert os.uname().nodename == hostname and time.time() > 1e9


def test_serve_does_not_execute_frames_inside_rejected_body(agent: AgentProcess) -> None:
    sock = agent.sock
    hdr = protocol.dumps({"op": "put", "id": 1, "path": "/nonexistent/never"}).encode()
    # Pad so the smuggled frame starts where the desynchronised reader will look for a frame.
    pad = b" " * (-len(hdr) % protocol.PREFIX.size)
    smuggled = protocol.encode({"op": "ping", "id": 666})
    prefix = protocol.PREFIX.pack(protocol.MAGIC, len(hdr), (1 << 30) + 1)
    sock.sendall(prefix + hdr + pad + smuggled)
    sock.settimeout(5)
    with pytest.raises((EOFError, OSError)):  # the agent stops: EOF, never a reply
        read_reply(sock)
    assert agent.proc.wait(5) == 3


def test_commands_start_at_nice_0_and_own_session(run: Any) -> None:
    """The agent's threads may run at nice -20 (SCHED_RESET_ON_FORK); its commands never do."""
    header, out, _ = run([SH, "-c", "cut -d' ' -f6,19 /proc/self/stat; echo $$"])
    session, nice, pid = out.split()
    assert (header["exit_code"], nice) == (0, b"0")
    assert session == pid, "the command is not the leader of its own session"


def test_an_op_with_a_nul_inside_is_unknown(agent: AgentProcess) -> None:
    header, _ = agent.call({"op": "exec\0", "argv": ["true"]})
    assert header["op"] == "error" and header["error"] == 'unknown op "exec\\u0000"'
