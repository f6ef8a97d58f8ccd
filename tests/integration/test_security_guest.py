"""A hostile guest against what reaches the terminal and the reports, the host side of the
control protocol, and how its failures are classified (real VMs).

The guest plays the attacker with GUEST_TOOL: it finds the agent (/run/smolvm/smolvm-agent), can stop
it (SIGSTOP) and can take a copy of its control-channel descriptor (pidfd_getfd) to write
forged frames to the host."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

import pytest
from helpers import REAL_CACHE

from pytest_smolvm import ProtocolError, SmolVM
from pytest_smolvm.guest import protocol

GUEST_TOOL = r"""
import ctypes, os, signal, sys

def cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""

agent = int(next(p for p in os.listdir("/proc") if p.isdigit() and cmdline(p) == b"/run/smolvm/smolvm-agent\0"))
if "stop" in sys.argv[1]:
    os.kill(agent, signal.SIGSTOP)
if "write" in sys.argv[1]:
    port = next(int(fd) for fd in os.listdir(f"/proc/{agent}/fd")
                if os.readlink(f"/proc/{agent}/fd/{fd}").startswith("/dev/vport"))
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(438, os.pidfd_open(agent), port, 0)          # pidfd_getfd
    assert fd >= 0, ctypes.get_errno()
    os.write(fd, bytes.fromhex(sys.argv[2]))
"""
CHECKOUT = Path(__file__).resolve().parents[2]
HOSTILE = "\x1b]0;pwned\x07\x1b[2J\u202eevil\u2066"


def frame(header_json: str, body: bytes = b"") -> str:
    raw = header_json.encode()
    return (protocol.PREFIX.pack(protocol.MAGIC, len(raw), len(body)) + raw + body).hex()


def assert_nothing_raw(out: str) -> None:
    for ch in ("\x1b", "\x07", "\u202e", "\u2066"):
        assert ch not in out, f"raw {ch!r} reached the terminal"


@pytest.fixture
def real(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    monkeypatch.setenv("SMOLVM_CACHE_DIR", str(REAL_CACHE))
    # The subprocess must import this checkout's package, not whichever one is installed.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(CHECKOUT), os.environ.get("PYTHONPATH")])))
    for var in ("SMOLVM_NETWORK", "SMOLVM_IMAGE", "SMOLVM_ACCEL"):
        monkeypatch.delenv(var, raising=False)
    pytester.makeconftest(f"GUEST_TOOL = {GUEST_TOOL!r}\nHOSTILE = {HOSTILE!r}\n"
                          f"import sys\nsys.path.insert(0, {str(pytester.path)!r})\n")
    return pytester


def test_hostile_guest_text_and_env_secrets_never_reach_the_terminal(
        real: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    mark, run = f"MARK{secrets.token_hex(10)}", f"RUN{secrets.token_hex(10)}"
    monkeypatch.setenv("CI_MARK", mark)
    monkeypatch.setenv("CI_RUN", run)
    real.makepyfile(r"""
        import json, os, pytest
        from conftest import GUEST_TOOL, HOSTILE
        from pytest_smolvm.guest import protocol

        @pytest.mark.smolvm(env={"MARK": os.environ["CI_MARK"]})
        def test_output(smolvm):
            smolvm.put(HOSTILE.encode(), "/root/h")
            r = smolvm.run("cat /root/h; cat /root/h >&2; echo $MARK $TOKEN >&2")
            assert r.stdout_bytes == HOSTILE.encode()            # raw bytes stay on the result
            smolvm.run("cat /root/h; echo $MARK $TOKEN >&2; exit 1", check=True,
                       env={"TOKEN": os.environ["CI_RUN"]})

        def test_cwd(smolvm):
            smolvm.run(["true"], cwd="/tmp/" + HOSTILE, check=True)

        def test_agent_error(smolvm):
            smolvm.put(GUEST_TOOL.encode(), "/root/tool.py")
            rid = smolvm._session.client.channel._next_id + 1
            raw = ('{"op":"error","id":%d,"error":%s}' % (rid, json.dumps(HOSTILE))).encode()
            forged = protocol.PREFIX.pack(protocol.MAGIC, len(raw), 0) + raw
            smolvm.run(["python3", "/root/tool.py", "write", forged.hex()])
    """)
    result = real.runpytest_subprocess("-p", "no:cacheprovider", "-vv", "-l")
    out = result.stdout.str() + result.stderr.str()
    result.assert_outcomes(failed=3)
    assert "CommandFailed" in out and "GuestError" in out
    assert "\\x1b]0;pwned\\x07" in out and "\\u202e" in out      # shown escaped
    assert_nothing_raw(out)
    assert mark not in out and run not in out


def test_malformed_reply_is_a_protocol_error_and_nothing_more_is_trusted(smolvm: SmolVM) -> None:
    smolvm.put(GUEST_TOOL.encode(), "/root/tool.py")
    rid = smolvm._session.client.channel._next_id + 1 if smolvm._session else 0
    header = json.dumps({"op": "result", "id": rid, "stdout_len": 999}).replace("}", ',"exit_code":1e309}')
    with pytest.raises(ProtocolError, match="malformed exec reply"):
        smolvm.run(["python3", "/root/tool.py", "write", frame(header)], timeout=60)
    with pytest.raises(ProtocolError):
        smolvm.run("true")


def test_silent_or_stalled_guest_fails_the_test_vmm_crash_is_an_error(real: pytest.Pytester) -> None:
    real.makeconftest(f"GUEST_TOOL = {GUEST_TOOL!r}\n"
                      "import pytest_smolvm.commands, pytest_smolvm.guest.channel\n"
                      "pytest_smolvm.commands.REPLY_GRACE = 1.0\n"          # keep the run short
                      "pytest_smolvm.guest.channel.FRAME_GRACE = 1.0\n")
    half = (protocol.PREFIX.pack(protocol.MAGIC, 100, 0) + b'{"op":"res').hex()
    real.makepyfile(f"""
        import os
        from conftest import GUEST_TOOL

        def test_agent_stopped(smolvm):
            smolvm.put(GUEST_TOOL.encode(), "/root/tool.py")
            smolvm.run(["python3", "/root/tool.py", "stop"], timeout=3)

        def test_half_frame_then_silence(smolvm):
            smolvm.put(GUEST_TOOL.encode(), "/root/tool.py")
            smolvm.run(["python3", "/root/tool.py", "stop+write", "{half}"], timeout=3)

        def test_vmm_crash(smolvm):
            os.kill(smolvm.pid, 9)
            smolvm.run("true")
    """)
    result = real.runpytest_subprocess("-p", "no:cacheprovider", "-rA")
    out = result.stdout.str()
    result.assert_outcomes(failed=2, errors=1)
    for line in ("ERROR (infrastructure) *::test_vmm_crash*", "FAILED *::test_agent_stopped*",
                 "FAILED *::test_half_frame_then_silence*", "E *CommandTimeout: *did not confirm the kill*",
                 "E *GuestDied: *the guest agent broke off its reply*"):
        result.stdout.fnmatch_lines([line])
    assert "test_agent_stopped ERROR" not in out
