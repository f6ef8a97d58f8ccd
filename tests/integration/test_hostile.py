"""Hostile code stays contained. Every case asserts (a) a clear, specific outcome for the
test, (b) the host is unaffected, (c) the next VM is healthy (autouse fixture)."""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import REAL_CACHE, qemu_processes

from pytest_smolvm import CommandTimeout, GuestDied, ProtocolError, SmolVM


def _rss_mib() -> int:
    return int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]) // 1024


def _qemu_pids() -> set[int]:
    return set(qemu_processes())


@pytest.fixture(autouse=True)
def host_unaffected_and_next_vm_healthy(request: pytest.FixtureRequest) -> Iterator[None]:
    vm: SmolVM | None = request.getfixturevalue("smolvm") if "smolvm" in request.fixturenames else None
    pid = vm.pid if vm else None
    yield
    # (b) nothing of the hostile VM survives its close (the smolvm fixture closes it again
    # after this one, harmlessly: close() is idempotent); (c) a fresh VM works.
    if vm is not None:
        vm.close()
        assert pid not in _qemu_pids(), "the hostile VM's VMM outlived its test"
        assert not vm.workdir.exists()
    with SmolVM() as fresh:
        assert fresh.run("echo healthy", timeout=60).stdout == "healthy\n"


def test_fork_bomb_in_foreground_times_out_and_vm_recovers(smolvm: SmolVM) -> None:
    t0 = time.monotonic()
    with pytest.raises(CommandTimeout, match="process group was killed"):
        smolvm.run("f(){ f|f& }; f; sleep 100", timeout=5)
    assert time.monotonic() - t0 < 30
    assert smolvm.run("echo alive", timeout=30).stdout == "alive\n"
    # every bomb process is gone once init has reaped the last of them: what is left in the
    # cgroup is the agent (a few threads) and this command
    r = smolvm.run("for i in $(seq 50); do [ $(cat /sys/fs/cgroup/smolvm/pids.current) -le 8 ] && break; "
                   "sleep 0.2; done; cat /sys/fs/cgroup/smolvm/pids.current", timeout=30)
    assert int(r.stdout) <= 8


def test_background_fork_bomb_hits_pids_max_and_agent_stays_responsive(smolvm: SmolVM) -> None:
    smolvm.run("f(){ f|f& }; f")                       # returns at once: the bomb is in the background
    assert smolvm.get("/sys/fs/cgroup/smolvm/pids.max") == b"1024\n"
    deadline = time.monotonic() + 120
    while True:
        t0 = time.monotonic()
        # get() is served by the agent itself (nothing to spawn): it answers at nice -20
        events = smolvm.get("/sys/fs/cgroup/smolvm/pids.events").decode()
        assert time.monotonic() - t0 < 10, "the agent starved under the fork bomb"
        if int(events.split()[1]) > 0:                  # the limit was hit: forks were refused
            break
        assert time.monotonic() < deadline, f"the bomb never reached pids.max: {events}"
        time.sleep(1)


def test_memory_hog_is_oom_killed_not_the_agent(smolvm: SmolVM) -> None:
    r = smolvm.run("python3 -c 'x=[]\nwhile True: x.append(bytearray(1<<20))'", timeout=120)
    assert r.exit_code in (137, -9), (r.exit_code, r.stderr)
    assert "Out of memory" in smolvm.console_log or "oom" in smolvm.console_log.lower()
    assert smolvm.run("echo alive").stdout == "alive\n"


def test_filling_the_disk_gets_enospc_and_host_disk_is_bounded(smolvm: SmolVM) -> None:
    r = smolvm.run("dd if=/dev/zero of=/root/fill bs=4M", timeout=300)
    assert r.exit_code == 1 and "No space left on device" in r.stderr
    assert smolvm.disk_path is not None
    overlay_mib = smolvm.disk_path.stat().st_size >> 20
    assert overlay_mib < 1024 + 64, f"host overlay grew to {overlay_mib} MiB"   # <= the disk's virtual size
    assert smolvm.run("rm /root/fill && echo freed").stdout == "freed\n"


def test_one_gib_of_stdout_is_capped_and_host_memory_stays_flat(smolvm: SmolVM) -> None:
    before = _rss_mib()
    r = smolvm.run("head -c 1073741824 /dev/zero; echo done >&2", timeout=300)
    assert r.stdout_truncated and len(r.stdout_bytes) == 16 * 1024 * 1024
    assert r.stderr == "done\n" and r.exit_code == 0
    assert _rss_mib() - before < 200, "host memory grew with the guest's output"


def test_command_ignoring_sigterm_is_killed_at_timeout(smolvm: SmolVM) -> None:
    with pytest.raises(CommandTimeout):
        smolvm.run("trap '' TERM INT HUP; while :; do sleep 1; done", timeout=2)
    assert smolvm.run("pgrep -x sleep || echo none").stdout.strip() == "none"


def test_guest_kernel_panic_is_guest_died(smolvm: SmolVM) -> None:
    with pytest.raises(GuestDied) as info:
        smolvm.run("echo c > /proc/sysrq-trigger")
    assert "Kernel panic" in info.value.console_tail or "sysrq" in info.value.console_tail.lower()


def test_guest_poweroff_mid_command_is_guest_died(smolvm: SmolVM) -> None:
    with pytest.raises(GuestDied, match="stopped during run"):
        smolvm.run("sleep 0.5; echo o > /proc/sysrq-trigger; sleep 60")


@pytest.mark.smolvm(vcpus=2)
def test_busy_loop_on_every_vcpu_leaves_agent_responsive_and_host_bounded(smolvm: SmolVM) -> None:
    smolvm.run("for i in 1 2; do (while :; do :; done) & done")
    assert smolvm.pid is not None
    def cpu_ticks() -> int:
        fields = Path(f"/proc/{smolvm.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    t0, c0 = time.monotonic(), cpu_ticks()
    t1 = time.monotonic()
    assert smolvm.run("echo alive", timeout=30).stdout == "alive\n"
    assert time.monotonic() - t1 < 10
    time.sleep(2)
    cores = (cpu_ticks() - c0) / os.sysconf("SC_CLK_TCK") / (time.monotonic() - t0)
    assert cores < 2.5, f"the VMM used {cores:.1f} cores for 2 vCPUs"


def test_binary_garbage_and_escapes_are_sanitised_in_reports(pytester: pytest.Pytester,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMOLVM_CACHE_DIR", str(REAL_CACHE))
    pytester.makepyfile(r"""
        def test_garbage(smolvm):
            r = smolvm.run(r"printf '\033]0;pwned\007\033[2J\033[31mred\000\377\376 end'; head -c 64 /dev/urandom")
            assert r.stdout_bytes.startswith(b"\x1b]0;pwned\x07\x1b[2J")      # raw bytes kept for the test
            assert False, "fail to get the report"
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "\\x1b]0;pwned\\x07" in out                 # shown, not executed
    assert "\x1b]0;" not in out and "\x1b[2J" not in out and "\x00" not in out


def test_guest_cannot_see_host_files(smolvm: SmolVM, tmp_path: Path) -> None:
    marker = tmp_path / f"host-secret-{secrets.token_hex(8)}"
    marker.write_text("host only")
    r = smolvm.run(f"find / -xdev -name {marker.name} 2>/dev/null; ls /dev/vd* /dev/sd* 2>/dev/null; "
                   f"grep -c ' 9p \\| virtiofs ' /proc/mounts", timeout=120)
    lines = r.stdout.split()
    assert marker.name not in r.stdout
    assert lines[:-1] == ["/dev/vda"] and lines[-1] == "0"   # one disk, no host shares


STEAL_PORT = r"""
import ctypes, os, sys

def cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:  # the process exited while we looked
        return b""

agent = next(p for p in os.listdir("/proc") if p.isdigit() and cmdline(p) == b"/run/smolvm/smolvm-agent\0")
port_fd = next(int(fd) for fd in os.listdir(f"/proc/{agent}/fd")
               if os.readlink(f"/proc/{agent}/fd/{fd}").startswith("/dev/vport"))
libc = ctypes.CDLL(None, use_errno=True)
pidfd = os.pidfd_open(int(agent))
fd = libc.syscall(438, pidfd, port_fd, 0)          # pidfd_getfd: the agent's channel, stolen
assert fd >= 0, ctypes.get_errno()
os.write(fd, bytes.fromhex(sys.argv[1]))
import time; time.sleep(30)
"""


@pytest.mark.parametrize("frame", [
    pytest.param(b"XX" + b"\xff" * 64, id="bad-magic"),
    pytest.param(b"SV" + (7).to_bytes(4, "big") + (2**31).to_bytes(4, "big") + b'{"op":1}', id="oversize-body"),
    pytest.param(b"SV" + (5).to_bytes(4, "big") + (0).to_bytes(4, "big") + b"[1,2]", id="not-an-object"),
])
def test_malformed_frames_from_guest_are_rejected_without_hanging(smolvm: SmolVM, frame: bytes) -> None:
    smolvm.put(STEAL_PORT.encode(), "/root/steal.py")
    t0 = time.monotonic()
    with pytest.raises(ProtocolError, match="invalid frame"):
        smolvm.run(["python3", "/root/steal.py", frame.hex()], timeout=60)
    assert time.monotonic() - t0 < 30
    with pytest.raises(ProtocolError):      # the channel stays closed: nothing more is trusted
        smolvm.run("true")


def test_secrets_in_env_never_reach_the_disk_or_report(pytester: pytest.Pytester,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    secret_run, secret_marker = f"RUNSECRET{secrets.token_hex(12)}", f"MARKSECRET{secrets.token_hex(12)}"
    monkeypatch.setenv("SMOLVM_CACHE_DIR", str(REAL_CACHE))
    # As in real CI, the secrets come from the environment, not from the test's source
    # (pytest prints failing tests' source, which is the user's to keep clean).
    monkeypatch.setenv("CI_TOKEN", secret_run)
    monkeypatch.setenv("CI_MARK", secret_marker)
    pytester.makepyfile("""
        import os
        import pytest
        DISKS = []

        @pytest.mark.smolvm(env={"MARK": os.environ["CI_MARK"]}, retain_disk_on_delete=True)
        def test_uses_secrets(smolvm):
            r = smolvm.run('test -n "$MARK" && test -n "$TOKEN" && sha256sum /etc/hostname && sync',
                           env={"TOKEN": os.environ["CI_TOKEN"]})
            assert r.ok
            DISKS.append(smolvm)
            assert False, "fail so the report is written"

        def test_disk_path():
            print("DISK=" + str(DISKS[0].disk_path))
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-s")
    result.assert_outcomes(failed=1, passed=1)
    out = result.stdout.str()
    assert secret_run not in out and secret_marker not in out
    disk = Path(next(ln for ln in result.stdout.lines if "DISK=" in ln).split("DISK=", 1)[1].split()[0])
    try:
        data = disk.read_bytes()
        assert data[:4] == b"QFI\xfb"
        assert secret_run.encode() not in data and secret_marker.encode() not in data
    finally:
        disk.unlink(missing_ok=True)


@pytest.mark.smolvm(lifetime=4)
def test_lifetime_caps_the_wall_clock_a_test_may_use_its_vm(smolvm: SmolVM) -> None:
    assert smolvm.run("echo within budget").ok
    t0 = time.monotonic()
    with pytest.raises(GuestDied, match="exceeded its lifetime of 4s"):
        smolvm.run("sleep 60", timeout=120)
    assert time.monotonic() - t0 < 15
    with pytest.raises(GuestDied, match="lifetime"):
        smolvm.run("true")
