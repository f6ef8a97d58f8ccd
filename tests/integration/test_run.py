"""vm.run / put / get semantics in a real microVM (one shared session VM: these tests do
not depend on isolation from each other)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pytest_smolvm import CommandFailed, CommandTimeout, ConfigError, GuestFileError, SmolVM


def test_shell_string_and_argv(smolvm_session: SmolVM) -> None:
    r = smolvm_session.run("python3 -c 'print(6*7)'")
    assert (r.exit_code, r.stdout, r.stderr, r.ok) == (0, "42\n", "", True)
    r = smolvm_session.run(["python3", "-c", "import sys; print(sys.argv[1:])", "a b", "$HOME"])
    assert r.stdout == "['a b', '$HOME']\n"          # no shell: no splitting, no expansion


def test_stdout_stderr_exit_code(smolvm_session: SmolVM) -> None:
    r = smolvm_session.run("echo out; echo err >&2; exit 7")
    assert (r.exit_code, r.stdout, r.stderr, r.ok) == (7, "out\n", "err\n", False)
    assert r.duration > 0


def test_env_cwd_and_input(smolvm_session: SmolVM) -> None:
    r = smolvm_session.run("echo $GREETING; pwd; cat", env={"GREETING": "hi"}, cwd="/tmp", input=b"from stdin")
    assert r.stdout == "hi\n/tmp\nfrom stdin"
    assert smolvm_session.run("echo ${GREETING:-unset}").stdout == "unset\n"   # env is per call
    assert smolvm_session.run(["cat"], input="text in").stdout == "text in"
    assert smolvm_session.run("pwd").stdout == "/root\n"


def test_check_raises_command_failed_with_result(smolvm_session: SmolVM) -> None:
    with pytest.raises(CommandFailed) as info:
        smolvm_session.run("echo nope >&2; exit 3", check=True)
    assert info.value.result.exit_code == 3
    assert "nope" in str(info.value)


def test_missing_command_and_bad_cwd(smolvm_session: SmolVM) -> None:
    r = smolvm_session.run(["no-such-program"])
    assert r.exit_code == 127 and "no-such-program" in r.stderr
    r = smolvm_session.run(["true"], cwd="/does/not/exist")
    assert r.exit_code == 127 and "/does/not/exist" in r.stderr


def test_timeout_kills_process_group_and_vm_stays_healthy(smolvm_session: SmolVM) -> None:
    t0 = time.monotonic()
    with pytest.raises(CommandTimeout) as info:
        smolvm_session.run("echo started; sleep 60 & sleep 60", timeout=1)
    assert time.monotonic() - t0 < 5
    assert info.value.stdout == "started\n" and info.value.timeout == 1
    assert smolvm_session.run("true").ok
    # the whole group died, the backgrounded sleep too
    assert smolvm_session.run("pgrep -x sleep").exit_code == 1


def test_timeout_on_command_ignoring_sigterm(smolvm_session: SmolVM) -> None:
    with pytest.raises(CommandTimeout):
        smolvm_session.run("trap '' TERM; sleep 30", timeout=1)
    assert smolvm_session.run("true").ok


def test_background_process_never_blocks_run(smolvm_session: SmolVM) -> None:
    t0 = time.monotonic()
    r = smolvm_session.run("sleep 300 > /dev/null 2>&1 & echo $!; sleep 300 & echo bg")
    assert time.monotonic() - t0 < 5
    assert r.stdout.splitlines()[-1] == "bg"
    pid = r.stdout.split()[0]
    assert smolvm_session.run(f"kill -0 {pid}").ok           # still running after run() returned
    smolvm_session.run("pkill -x sleep")


def test_output_cap_truncates_and_flags(smolvm_session: SmolVM) -> None:
    r = smolvm_session.run("head -c 100000 /dev/zero; echo done >&2", max_output=1000)
    assert len(r.stdout_bytes) == 1000 and r.stdout_truncated and r.truncated
    assert r.stderr == "done\n" and not r.stderr_truncated


def test_binary_output_is_kept_raw_and_decoded_with_replacement(smolvm_session: SmolVM) -> None:
    r = smolvm_session.run(["printf", "\\377\\376ok"])
    assert r.stdout_bytes == b"\xff\xfeok"
    assert r.stdout == "\ufffd\ufffdok"


def test_put_get_roundtrip(smolvm_session: SmolVM, tmp_path: Path) -> None:
    blob = bytes(range(256)) * 12_000  # ~3 MiB, every byte value
    smolvm_session.put(blob, "/root/sub/dir/blob.bin")
    assert smolvm_session.get("/root/sub/dir/blob.bin") == blob
    assert smolvm_session.run("sha256sum /root/sub/dir/blob.bin").stdout.split()[0] == \
        __import__("hashlib").sha256(blob).hexdigest()
    local = tmp_path / "script.sh"
    local.write_text("#!/bin/sh\necho from script\n")
    smolvm_session.put(local, "/usr/local/bin/hello", mode=0o755)
    assert smolvm_session.run("hello").stdout == "from script\n"


def test_put_get_errors(smolvm_session: SmolVM) -> None:
    with pytest.raises(GuestFileError, match="/root/nope"):
        smolvm_session.get("/root/nope")
    with pytest.raises(TypeError, match="not str"):
        smolvm_session.put("content", "/root/x")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="absolute"):
        smolvm_session.put(b"x", "relative/path")
    smolvm_session.run("head -c 5000 /dev/zero > /root/big", check=True)
    with pytest.raises(GuestFileError, match="over the limit"):
        smolvm_session.get("/root/big", max_size=1000)


def test_guest_is_made_current_and_unique(smolvm_session: SmolVM) -> None:
    guest_now = int(smolvm_session.run("date +%s").stdout)
    assert abs(guest_now - time.time()) < 3
    assert smolvm_session.run("hostname").stdout.strip() == f"smolvm-{smolvm_session.name}"


def test_console_and_transcript(smolvm_session: SmolVM) -> None:
    assert "smolvm-agent: ready" in smolvm_session.console_log
    smolvm_session.run("echo transcript-check")
    last = smolvm_session.transcript[-1]
    assert last.command == "echo transcript-check" and last.outcome == "exit 0"
    assert last.stdout_head == "transcript-check\n"
