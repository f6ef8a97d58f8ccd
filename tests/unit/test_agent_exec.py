"""Unit tests of the guest agent's request handlers, run on the host with harmless commands.

``do_exec`` spawns real processes here (``sh``, ``echo``, ``cat``, ``sleep``...). It changes
the process's working directory around each spawn, so every test restores it through
``monkeypatch.chdir``. ``do_setup`` (clock, hostname) is never called.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pytest_smolvm.guest import agent, protocol


class FakeChan:
    """Records what the agent sends."""

    def __init__(self) -> None:
        self.sent: list[tuple[dict[str, Any], bytes]] = []
        self.event = threading.Event()

    def send(self, header: dict[str, Any], body: bytes = b"") -> None:
        self.sent.append((header, bytes(body)))
        self.event.set()


class Exec:
    """One do_exec run in a thread; the reply is awaited, not the thread (which keeps
    draining pipes held by background children)."""

    def __init__(self, req: dict[str, Any], stdin: bytes = b"") -> None:
        self.chan = FakeChan()
        self.req = {"op": "exec", "id": 41, **req}
        self.error: BaseException | None = None
        self.started = time.monotonic()
        self.thread = threading.Thread(target=self._run, args=(stdin,), daemon=True)
        self.thread.start()

    def _run(self, stdin: bytes) -> None:
        try:
            agent.do_exec(self.chan, self.req, stdin)  # type: ignore[arg-type]
        except BaseException as exc:
            self.error = exc
            self.chan.event.set()

    def reply(self, wait: float = 15.0) -> tuple[dict[str, Any], bytes, bytes]:
        assert self.chan.event.wait(wait), "no reply from do_exec"
        self.elapsed = time.monotonic() - self.started
        if self.error is not None:
            raise self.error
        assert len(self.chan.sent) == 1
        header, body = self.chan.sent[0]
        n = header["stdout_len"]
        return header, body[:n], body[n:]


@pytest.fixture(autouse=True)
def restore_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # undone at teardown, whatever do_exec did to the cwd


def run(argv: list[str], stdin: bytes = b"", **req: Any) -> tuple[dict[str, Any], bytes, bytes]:
    ex = Exec({"argv": argv, **req}, stdin)
    header, out, err = ex.reply()
    ex.thread.join(10)
    assert not ex.thread.is_alive(), "do_exec did not finish after a plain command"
    return header, out, err


SH = "/bin/sh"

# ---------------------------------------------------------------- exec: results


def test_exit_code_and_stream_split(tmp_path: Path) -> None:
    header, out, err = run([SH, "-c", "echo out; echo err >&2; echo more; exit 3"], cwd=str(tmp_path))
    assert header["op"] == "result"
    assert header["id"] == 41
    assert header["exit_code"] == 3
    assert header["timed_out"] is False
    assert header["stdout_truncated"] is False
    assert header["stderr_truncated"] is False
    assert out == b"out\nmore\n"
    assert err == b"err\n"
    assert header["duration"] >= 0


@pytest.mark.parametrize(("cmd", "code"), [("true", 0), ("false", 1)])
def test_true_false(cmd: str, code: int) -> None:
    header, out, err = run([cmd])
    assert header["exit_code"] == code
    assert (out, err) == (b"", b"")


def test_binary_output_is_kept_exactly() -> None:
    header, out, _ = run([SH, "-c", r"printf 'a\000b\377\n'"])
    assert header["exit_code"] == 0
    assert out == b"a\x00b\xff\n"


def test_command_not_found() -> None:
    header, out, err = run(["smolvm-no-such-command-xyz", "arg"])
    assert header["exit_code"] == 127
    assert header["stdout_len"] == 0
    assert out == b""
    assert b"smolvm-no-such-command-xyz" in err
    assert b"not found" in err


def test_absolute_path_not_found(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    header, _, err = run([str(missing)])
    assert header["exit_code"] == 127
    assert str(missing).encode() in err


def test_not_executable(tmp_path: Path) -> None:
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)
    header, out, err = run([str(script)])
    assert header["exit_code"] == 126
    assert out == b""
    assert err.startswith(b"smolvm: cannot execute")


def test_bad_cwd_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "no" / "such" / "dir"
    header, out, err = run(["true"], cwd=str(bad))
    assert header["exit_code"] == 127
    assert out == b""
    assert f"cwd {bad}".encode() in err


def test_cwd_is_applied(tmp_path: Path) -> None:
    work = tmp_path / "work dir"
    work.mkdir()
    _, out, _ = run(["pwd"], cwd=str(work))
    assert out.decode().strip() == str(work)


def test_relative_command_resolved_in_cwd(tmp_path: Path) -> None:
    script = tmp_path / "tool.sh"
    script.write_text("#!/bin/sh\necho from-tool\n")
    script.chmod(0o755)
    header, out, _ = run(["./tool.sh"], cwd=str(tmp_path))
    assert header["exit_code"] == 0
    assert out == b"from-tool\n"


def test_killed_by_signal_reports_negative_signal() -> None:
    header, _, _ = run([SH, "-c", "kill -9 $$"])
    assert header["exit_code"] == -signal.SIGKILL
    assert header["timed_out"] is False


def test_sigpipe_default_in_child() -> None:
    # The agent (like Python) ignores SIGPIPE, but commands must get the default action:
    # `yes | head -1` ends because `yes` dies of SIGPIPE.
    header, out, _ = run([SH, "-c", "yes | head -n 1"])
    assert header["exit_code"] == 0
    assert out == b"y\n"


# ---------------------------------------------------------------- exec: env


def test_env_is_visible_and_base_path_used() -> None:
    _, out, _ = run([SH, "-c", 'printf "%s|%s|%s" "$FOO" "$PATH" "$HOME"'], env={"FOO": "bar baz"})
    foo, path, home = out.decode().split("|")
    assert foo == "bar baz"
    assert path == agent.BASE_ENV["PATH"]
    assert home == agent.BASE_ENV["HOME"]


def test_env_overrides_base(tmp_path: Path) -> None:
    _, out, _ = run([SH, "-c", 'printf "%s" "$HOME"'], env={"HOME": str(tmp_path)})
    assert out.decode() == str(tmp_path)


def test_host_environment_does_not_leak(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMOLVM_AGENT_SECRET", "leaked")
    _, out, _ = run([SH, "-c", 'printf "%s" "${SMOLVM_AGENT_SECRET-unset}"'])
    assert out == b"unset"


def test_command_path_is_searched_on_its_own_path(tmp_path: Path) -> None:
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


def test_stdin_is_delivered() -> None:
    header, out, _ = run(["cat"], stdin=b"hello\x00world\n")
    assert header["exit_code"] == 0
    assert out == b"hello\x00world\n"


def test_large_stdin_and_stdout_do_not_deadlock() -> None:
    data = os.urandom(3 << 20)  # far larger than a pipe buffer in both directions
    header, out, _ = run(["cat"], stdin=data)
    assert header["exit_code"] == 0
    assert out == data


def test_no_stdin_reads_eof() -> None:
    header, out, _ = run(["cat"], timeout=10)
    assert header["exit_code"] == 0
    assert header["timed_out"] is False
    assert out == b""


def test_stdin_not_read_by_command() -> None:
    header, out, _ = run([SH, "-c", "exec 0<&-; echo closed"], stdin=os.urandom(1 << 20))
    assert header["exit_code"] == 0
    assert out == b"closed\n"


# ---------------------------------------------------------------- exec: limits


def test_max_output_truncates_each_stream() -> None:
    header, out, err = run([SH, "-c", "printf 0123456789ABCDEF; printf errerrerrerrerr >&2"], max_output=10)
    assert out == b"0123456789"
    assert err == b"errerrerre"
    assert header["stdout_len"] == 10
    assert header["stdout_truncated"] is True
    assert header["stderr_truncated"] is True
    assert header["exit_code"] == 0


def test_max_output_exact_fit_is_not_truncated() -> None:
    header, out, _ = run([SH, "-c", "printf 0123456789"], max_output=10)
    assert out == b"0123456789"
    assert header["stdout_truncated"] is False


def test_big_output_truncated_without_blocking_the_command() -> None:
    # 4 MiB of output with a 1 KiB cap: the rest must be read and dropped, or the command
    # would block on a full pipe and never exit.
    header, out, _ = run([SH, "-c", "head -c 4194304 /dev/zero; echo done >&2"], max_output=1024, timeout=20)
    assert header["timed_out"] is False
    assert header["exit_code"] == 0
    assert out == bytes(1024)
    assert header["stdout_truncated"] is True


def test_timeout_kills_command() -> None:
    ex = Exec({"argv": ["sleep", "30"], "timeout": 0.5})
    header, _, _ = ex.reply()
    assert ex.elapsed < 3
    assert header["timed_out"] is True
    assert header["exit_code"] < 0
    assert header["exit_code"] == -signal.SIGKILL
    ex.thread.join(5)
    assert not ex.thread.is_alive()


def test_timeout_kills_whole_process_group() -> None:
    ex = Exec({"argv": [SH, "-c", "sleep 30 & sleep 30 & wait"], "timeout": 0.5})
    header, _, _ = ex.reply()
    assert header["timed_out"] is True
    assert ex.elapsed < 3
    # The background sleep was in the command's process group, so it died too and the
    # drain thread could finish.
    ex.thread.join(5)
    assert not ex.thread.is_alive()


# ---------------------------------------------------------------- exec: background children


def test_background_child_does_not_hold_reply(request: pytest.FixtureRequest) -> None:
    ex = Exec({"argv": [SH, "-c", "sleep 30 & echo $!; echo started"]})
    header, out, _ = ex.reply(wait=10)
    lines = out.decode().split()
    bg_pid = int(lines[0])

    def cleanup() -> None:
        try:
            os.kill(bg_pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        ex.thread.join(5)

    request.addfinalizer(cleanup)
    assert ex.elapsed < 2
    assert header["exit_code"] == 0
    assert "started" in lines
    # The agent is still draining the pipe the child holds ...
    assert ex.thread.is_alive()
    cleanup()
    # ... and stops once the child is gone, without sending anything else.
    assert not ex.thread.is_alive()
    assert len(ex.chan.sent) == 1


# ---------------------------------------------------------------- put / get


def test_put_get_round_trip(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "c.bin"
    data = os.urandom(300_000)
    assert agent.do_put({"path": str(target), "mode": 0o600}, data) == {"size": len(data)}
    assert target.read_bytes() == data
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    header, got = agent.do_get({"path": str(target)})
    assert header == {"size": len(data)}
    assert got == data


def test_put_overwrites_and_applies_mode_to_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "f"
    agent.do_put({"path": str(target), "mode": 0o600}, b"long original content")
    agent.do_put({"path": str(target), "mode": 0o755}, b"short")
    assert target.read_bytes() == b"short"
    assert stat.S_IMODE(target.stat().st_mode) == 0o755


def test_put_without_mode_keeps_umask_default(tmp_path: Path) -> None:
    target = tmp_path / "plain"
    agent.do_put({"path": str(target)}, b"")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o644 & ~umask
    assert target.read_bytes() == b""


def test_put_into_a_file_as_directory_fails(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises((NotADirectoryError, FileExistsError)):
        agent.do_put({"path": str(tmp_path / "file" / "child")}, b"data")


def test_get_over_max(tmp_path: Path) -> None:
    target = tmp_path / "big"
    target.write_bytes(b"x" * 101)
    with pytest.raises(OSError, match="over the limit of 100") as info:
        agent.do_get({"path": str(target), "max": 100})
    assert info.value.errno == errno.EFBIG
    assert info.value.filename == str(target)
    _, data = agent.do_get({"path": str(target), "max": 101})
    assert data == b"x" * 101


def test_get_limit_holds_when_size_lies() -> None:
    # procfs reports st_size 0; the limit must still apply to what is actually read.
    assert os.stat("/proc/self/status").st_size == 0
    with pytest.raises(OSError, match="limit of 10") as info:
        agent.do_get({"path": "/proc/self/status", "max": 10})
    assert info.value.errno == errno.EFBIG
    header, data = agent.do_get({"path": "/proc/self/status", "max": 1 << 20})
    assert data.startswith(b"Name:")
    assert header["size"] == len(data)


def test_get_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        agent.do_get({"path": str(tmp_path / "missing")})


# ---------------------------------------------------------------- which


def test_which_finds_sh() -> None:
    assert agent.which("sh", "/nonexistent-dir:/bin") == "/bin/sh"


def test_which_not_found() -> None:
    with pytest.raises(FileNotFoundError) as info:
        agent.which("sh", "/nonexistent-dir")
    assert info.value.errno == errno.ENOENT
    assert info.value.filename == "sh"


def test_which_skips_directories_and_non_executables(tmp_path: Path) -> None:
    d1, d2 = tmp_path / "d1", tmp_path / "d2"
    (d1 / "sh").mkdir(parents=True)  # a directory named sh
    d2.mkdir()
    (d2 / "sh").write_text("not executable")
    (d2 / "sh").chmod(0o644)
    assert agent.which("sh", f"{d1}:{d2}:/bin") == "/bin/sh"


def test_which_keeps_paths_with_slash() -> None:
    assert agent.which("/bin/sh", "") == "/bin/sh"
    assert agent.which("./x", "/bin") == "./x"


# ---------------------------------------------------------------- the request loop


@pytest.fixture
def served() -> Iterator[socket.socket]:
    host, guest = socket.socketpair()
    fd = os.dup(guest.fileno())
    guest.close()
    chan = agent.Channel(fd, wait_on_eof=False)
    done = threading.Event()

    def loop() -> None:
        try:
            agent.serve(chan)
        except (EOFError, OSError, SystemExit):  # SystemExit: stopped on a bad frame
            pass
        finally:
            done.set()

    threading.Thread(target=loop, daemon=True).start()
    host.settimeout(5)
    yield host
    host.close()
    assert done.wait(5), "serve() did not stop at EOF"
    os.close(fd)


def read_reply(sock: socket.socket) -> tuple[dict[str, Any], bytes]:
    def read_exact(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return buf

    return protocol.decode(read_exact, 1 << 30)


def test_serve_ping_put_get_exec(served: socket.socket, tmp_path: Path) -> None:
    sock = served
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


def test_serve_errors_are_replies(served: socket.socket, tmp_path: Path) -> None:
    sock = served
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

    sock.sendall(protocol.encode({"op": "put", "id": 7}))  # no path: a KeyError inside
    header, _ = read_reply(sock)
    assert (header["op"], header["id"]) == ("error", 7)

    sock.sendall(protocol.encode({"op": "ping", "id": 8}))  # still serving
    assert read_reply(sock)[0] == {"op": "pong", "id": 8}


def test_serve_does_not_execute_frames_inside_rejected_body(served: socket.socket) -> None:
    sock = served
    hdr = protocol.dumps({"op": "put", "id": 1, "path": "/nonexistent/never"}).encode()
    # Pad so the smuggled frame starts where the desynchronised reader will look for a frame.
    pad = b" " * (-len(hdr) % protocol.PREFIX.size)
    smuggled = protocol.encode({"op": "ping", "id": 666})
    prefix = protocol.PREFIX.pack(protocol.MAGIC, len(hdr), agent.MAX_REQUEST_BODY + 1)
    sock.sendall(prefix + hdr + pad + smuggled)
    sock.settimeout(1.0)
    try:
        header, _ = read_reply(sock)
    except (TimeoutError, EOFError, OSError):
        header = None
    assert header is None or header.get("id") != 666, f"smuggled request was executed: {header}"
