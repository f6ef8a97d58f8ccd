"""The VMM watchdog with real processes (stand-in VMMs: sleeping pythons with a VM dir in argv)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil

ENGINE = textwrap.dedent("""
    import subprocess, sys, time
    from pathlib import Path
    from pytest_smolvm.drivers.watchdog import WATCHDOG
    guarded, other, done = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    SLEEP = ["qemu-system-standin", "-c", "import time; time.sleep(300)"]  # argv[0] names a VMM
    def spawn(*argv):
        return subprocess.Popen([*argv], executable=sys.executable, start_new_session=True)
    WATCHDOG.register(guarded, None)
    vmm = spawn(*SLEEP, f"{guarded}/ctl.sock")
    WATCHDOG.register(done, None)
    finished = spawn(*SLEEP, f"{done}/ctl.sock")
    WATCHDOG.unregister(done)  # its VMM was reaped (here: it lives on, but is no longer ours)
    bystander = spawn(*SLEEP, f"{other}/ctl.sock")
    # Not a VMM, though it names the guarded VM's directory (an admin's `tail -f`): spared.
    viewer = spawn("tail-standin", "-c", "import time; time.sleep(300)", f"{guarded}/console.log")
    print(WATCHDOG.pid, vmm.pid, finished.pid, bystander.pid, viewer.pid, flush=True)
    time.sleep(300)
""")


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_engine_killed_takes_only_its_registered_vmms(tmp_path: Path) -> None:
    dirs = [tmp_path / n for n in ("vm1", "vm10", "vm2")]
    engine = subprocess.Popen([sys.executable, "-c", ENGINE, *map(str, dirs)], stdout=subprocess.PIPE, text=True)
    pids: list[int] = []
    try:
        assert engine.stdout is not None
        pids = [int(p) for p in engine.stdout.readline().split()]
        watchdog, vmm, finished, bystander, viewer = pids
        time.sleep(0.3)
        assert all(map(_alive, pids))
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            os.kill(watchdog, sig)
        assert os.getsid(watchdog) == watchdog != os.getsid(engine.pid)  # its own session
        assert _alive(watchdog), "the watchdog must ignore SIGTERM/SIGINT"
        engine.kill()
        engine.wait()
        deadline = time.monotonic() + 15
        while _alive(vmm) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(vmm), "the registered VMM outlived its engine"
        assert _alive(finished), "an unregistered directory's process was killed"
        assert _alive(bystander), "a directory that merely starts like a registered one was killed"
        assert _alive(viewer), "a process that is not a VMM was killed for naming a VM directory"
        deadline = time.monotonic() + 15
        while _alive(watchdog) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(watchdog), "the watchdog exits once it has acted"
    finally:
        if engine.poll() is None:
            engine.kill()
        for pid in pids:
            if _alive(pid):
                os.kill(pid, 9)

