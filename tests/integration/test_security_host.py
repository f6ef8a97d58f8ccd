"""Host files and the reaper against another local user and dead owners, with real
processes, real directories and real VMs: the runtime directory is private and verified,
the reaper never follows a planted symlink, and a VMM whose owner died is found by its
argv and killed before its directory goes."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from helpers import REAL_CACHE, qemu_processes

from pytest_smolvm import ConfigError, SmolVM, VMConfig
from pytest_smolvm.paths import runtime_dir
from pytest_smolvm.reaper import reap

NOBODY = 65534
REPO = Path(__file__).resolve().parents[2]

def _try(path: str) -> str:
    try:
        if path.endswith(".sock"):
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(path)
        elif path.endswith("/"):
            os.listdir(path)
        else:
            with open(path, "rb") as f:
                f.read(1)
        return "ok"
    except OSError as exc:
        return type(exc).__name__


def _as_nobody(paths: list[str]) -> dict[str, str]:
    """What user ``nobody`` gets when it tries to read, list or connect to ``paths`` (a forked
    child that drops to nobody: no exec, so no interpreter nobody may not be allowed to run)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            os.write(w, json.dumps({p: _try(p) for p in paths}).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read()
    os.waitpid(pid, 0)
    return dict(json.loads(out))


pytestmark = pytest.mark.skipif(os.getuid() != 0, reason="acts as another user (needs root)")


def test_vm_files_are_private_to_their_user(smolvm: SmolVM) -> None:
    wd = smolvm.workdir
    private = [f"{runtime_dir()}/", f"{wd}/", str(wd / "console.log"), str(wd / "owner.json"),
               str(wd / "ctl.sock")]
    assert all(Path(p).exists() for p in private)
    assert _as_nobody(private) == dict.fromkeys(private, "PermissionError")
    for d in (runtime_dir(), wd.parent, wd):
        assert os.lstat(d).st_mode & 0o077 == 0, f"{d} is open to others"


@pytest.mark.parametrize("plant", ["owned by nobody", "symlink to a nobody-owned dir"])
def test_engine_refuses_a_planted_runtime_dir(plant: str, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # What another user can do to /tmp/smolvm-<uid> before our first run.
    target = tmp_path / "attacker"
    target.mkdir(mode=0o777)
    os.chmod(target, 0o777)
    os.chown(target, NOBODY, NOBODY)
    planted = target if plant == "owned by nobody" else tmp_path / "link"
    if planted != target:
        planted.symlink_to(target)
    monkeypatch.setenv("SMOLVM_RUNTIME_DIR", str(planted))
    monkeypatch.setenv("SMOLVM_CACHE_DIR", str(REAL_CACHE))
    with pytest.raises(ConfigError) as info, SmolVM(VMConfig(memory_mib=256)):
        pass
    assert str(planted) in str(info.value) and "SMOLVM_RUNTIME_DIR" in str(info.value)
    assert list(target.iterdir()) == []


def _old_tree(base: Path) -> list[Path]:
    victims = []
    old = time.time() - 3600
    for name in ("etc", "home", "usr"):   # like the entries of / (old, no owner.json)
        d = base / name / "sub"
        d.mkdir(parents=True)
        (d / "precious").write_text("x")
        os.utime(d, (old, old))
        os.utime(d.parent, (old, old))
        victims.append(d / "precious")
    return victims


def test_cli_reap_never_follows_a_planted_symlink(tmp_path: Path) -> None:
    rt, scratch = tmp_path / "rt", tmp_path / "scratch"
    rt.mkdir(mode=0o700)
    victims = _old_tree(scratch)
    (rt / "x").symlink_to(scratch)                         # as `/tmp/smolvm-0/x -> /`
    dead = subprocess.Popen(["true"])
    dead.wait()
    left = rt / "deadrun" / "vm1-abcd"
    left.mkdir(parents=True)
    (left / "owner.json").write_text(json.dumps({"pid": dead.pid, "pid_start": 1.0}))
    env = {**os.environ, "SMOLVM_RUNTIME_DIR": str(rt), "SMOLVM_CACHE_DIR": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-m", "pytest_smolvm", "reap"], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"removed {left} (run deadrun" in r.stdout
    assert all(v.read_text() == "x" for v in victims)
    assert not left.exists() and (rt / "x").is_symlink()


OWNER = textwrap.dedent("""
    import sys, time
    from pytest_smolvm import SmolVM, VMConfig
    from pytest_smolvm.drivers.qemu import QemuDriver
    driver = QemuDriver()
    driver.die_with_parent = False   # the VMM outlives its owner, as measured after kill -9
    vm = SmolVM(VMConfig(memory_mib=256), driver=driver).start()
    print(vm.workdir, vm.pid, flush=True)
    time.sleep(600)
""")


def _gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


@pytest.fixture
def private_runtime(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A runtime directory of this test's own, so no other run's reaper gets there first."""
    rt = Path(tempfile.mkdtemp(prefix="smolvm-hf-", dir="/tmp"))
    monkeypatch.setenv("SMOLVM_RUNTIME_DIR", str(rt))
    monkeypatch.setenv("SMOLVM_CACHE_DIR", str(REAL_CACHE))
    yield rt
    shutil.rmtree(rt, ignore_errors=True)


def test_vmm_of_a_killed_owner_is_reaped_but_a_live_owners_is_not(private_runtime: Path) -> None:
    run_id = f"ko{secrets.token_hex(3)}"
    env = {**os.environ, "SMOLVM_RUN_ID": run_id}
    with SmolVM(VMConfig(memory_mib=256)) as live:
        owner = subprocess.Popen([sys.executable, "-c", OWNER], env=env, cwd=REPO, stdout=subprocess.PIPE,
                                 text=True)
        vmm_pid = None
        try:
            assert owner.stdout is not None
            workdir_s, pid_s = owner.stdout.readline().split()
            workdir, vmm_pid = Path(workdir_s), int(pid_s)
            # Whatever else guards the VMM dies with the owner (as under kill -9 of the whole
            # process group, or the OOM killer): only the reaper is left to find the VMM.
            for guard in psutil.Process(owner.pid).children(recursive=True):
                if guard.pid != vmm_pid:
                    guard.kill()
            owner.send_signal(signal.SIGKILL)
            owner.wait(10)
            time.sleep(3)
            for name in ("qemu.pid", "vmm.json"):       # as if killed before the pid file existed
                (workdir / name).unlink(missing_ok=True)
            assert psutil.pid_exists(vmm_pid) and workdir.is_dir()
            removed = reap(root=runtime_dir())
            assert [x.path for x in removed] == [workdir]
            assert _gone(vmm_pid), f"VMM {vmm_pid} of the dead owner still runs: {qemu_processes().get(vmm_pid)}"
            assert not workdir.exists() and not (private_runtime / run_id).exists()
            assert live.run("echo alive").stdout == "alive\n" and (live.workdir / "owner.json").exists()
        finally:
            owner.kill()
            owner.wait(10)
            if vmm_pid is not None and not _gone(vmm_pid, 0):
                os.kill(vmm_pid, signal.SIGKILL)


def test_pytest_run_stops_with_a_usage_error_on_a_planted_runtime_dir(tmp_path: Path) -> None:
    target = tmp_path / "attacker"
    target.mkdir()
    (tmp_path / "link").symlink_to(target)
    (tmp_path / "test_x.py").write_text("def test_x(smolvm):\n    pass\n")
    env = {**os.environ, "SMOLVM_RUNTIME_DIR": str(tmp_path / "link"), "SMOLVM_CACHE_DIR": str(REAL_CACHE),
           "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                       env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == pytest.ExitCode.USAGE_ERROR, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"{tmp_path / 'link'}" in r.stderr and "symlink" in r.stderr and "Traceback" not in r.stderr
    assert list(target.iterdir()) == []
