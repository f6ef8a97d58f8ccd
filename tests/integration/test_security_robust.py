"""Fail closed under pressure, with real VMs: an interrupt stops the run and tears its VMs
down, the warm-pool thread outlives any failure, and one stalled forwarded connection never
stalls another. Signals go to real pytest processes (the python binary itself)."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import qemu_processes

from pytest_smolvm import CommandTimeout, SmolVM, VMConfig
from pytest_smolvm.drivers.qemu import QemuDriver, QemuMachine
from pytest_smolvm.network import netns
from pytest_smolvm.paths import runtime_dir
from pytest_smolvm.pool import VMPool

REPO = Path(__file__).resolve().parents[2]
GUEST_SLEEP = 25
STARTED_TIMEOUT = 180.0


def _leftovers(run_id: str) -> tuple[list[int], list[Path]]:
    """QEMU processes and VM directories of ``run_id`` still on the host."""
    run_dir = runtime_dir() / run_id
    procs = [pid for pid, cmd in qemu_processes().items() if f"{run_dir}/" in cmd]
    dirs = sorted(run_dir.iterdir()) if run_dir.is_dir() else []
    return procs, dirs


def _wait_gone(run_id: str, timeout: float) -> tuple[list[int], list[Path]]:
    deadline = time.monotonic() + timeout
    while (left := _leftovers(run_id)) != ([], []) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


class PytestRun:
    """``python3 -m pytest`` on one test file, in its own directory, with its own run id."""

    def __init__(self, tmp_path: Path, body: str, *args: str, sigint_ignored: bool = False) -> None:
        self.dir = tmp_path
        self.run_id = f"sig{secrets.token_hex(3)}"
        (tmp_path / "test_victim.py").write_text(textwrap.dedent(body))
        env = {**os.environ, "PYTHONPATH": str(REPO), "SMOLVM_RUN_ID": self.run_id}
        env.pop("SMOLVM_NETWORK", None)
        argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "test_victim.py", *args]
        if sigint_ignored:
            # What a shell does to a background job (`pytest … &` in a script): SIGINT starts
            # ignored. exec keeps the pid, so the signal still goes to the python binary.
            argv = [sys.executable, "-c", "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
                    "os.execv(sys.executable, sys.argv[1:])", *argv]
        self.proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def wait_started(self) -> None:
        """Until the test says its guest command is about to run."""
        deadline = time.monotonic() + STARTED_TIMEOUT
        while not (self.dir / "started").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                pytest.fail(f"the victim run never started its command:\n{self.output()}")
            time.sleep(0.1)
        time.sleep(1.0)  # the request is on its way into the guest

    def output(self) -> str:
        out, _ = self.proc.communicate(timeout=120)
        return out.decode(errors="replace")

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        subprocess.run([sys.executable, "-m", "pytest_smolvm", "reap"], env={**os.environ, "PYTHONPATH": str(REPO)},
                       capture_output=True, timeout=120)


SLEEPER = f"""
    from pathlib import Path

    def test_sleeper(smolvm):
        smolvm.run("true")
        Path("started").write_text("yes")
        smolvm.run("sleep {GUEST_SLEEP}", timeout=120)
"""


@pytest.fixture
def victim(tmp_path: Path) -> Iterator[Callable[..., PytestRun]]:
    runs: list[PytestRun] = []

    def start(body: str, *args: str, sigint_ignored: bool = False) -> PytestRun:
        run = PytestRun(tmp_path, body, *args, sigint_ignored=sigint_ignored)
        runs.append(run)
        return run

    yield start
    for run in runs:
        run.cleanup()


@pytest.mark.parametrize(("sig", "sigint_ignored"), [(signal.SIGINT, False), (signal.SIGTERM, False),
                                                     (signal.SIGINT, True)],
                         ids=["SIGINT", "SIGTERM", "SIGINT-inherited-ignore"])
def test_signal_stops_the_run_and_tears_the_vms_down(victim: Callable[..., PytestRun], sig: signal.Signals,
                                                     sigint_ignored: bool) -> None:
    run = victim(SLEEPER, sigint_ignored=sigint_ignored)
    run.wait_started()
    t0 = time.monotonic()
    run.proc.send_signal(sig)
    out = run.output()
    elapsed = time.monotonic() - t0
    assert run.proc.returncode == pytest.ExitCode.INTERRUPTED, out
    assert "KeyboardInterrupt" in out or "Terminated" in out, out
    assert "passed" not in out, out
    assert elapsed < GUEST_SLEEP / 2, f"the run went on for {elapsed:.1f}s after {sig.name}:\n{out}"
    # The run unwound its fixtures: nothing of it is left, without waiting for a reaper.
    assert _leftovers(run.run_id) == ([], []), out


def test_pytest_timeout_thread_method_leaves_nothing_after_reap(victim: Callable[..., PytestRun]) -> None:
    run = victim(SLEEPER.replace("def test_sleeper", "@__import__('pytest').mark.timeout(8)\n"
                                             "    def test_sleeper"),
                            "--timeout-method=thread")
    out = run.output()
    assert "Timeout" in out and "passed" not in out, out
    assert run.proc.returncode != 0, out
    # os._exit skipped every teardown: the VMMs die with their owner within seconds...
    procs, _ = _wait_gone(run.run_id, 10.0)
    assert procs == [], f"VMMs of the timed-out run survived: {procs}"
    # ...and the next reap removes the rest.
    subprocess.run([sys.executable, "-m", "pytest_smolvm", "reap"], env={**os.environ, "PYTHONPATH": str(REPO)},
                   check=True, capture_output=True, timeout=120)
    assert _leftovers(run.run_id) == ([], [])


# ------------------------------------------------------------------ the warm-pool thread


class FlakyDriver(QemuDriver):
    """The real QEMU driver, except that the pool thread's next launches raise ``failures``
    (a driver bug, a MemoryError: anything, not only SmolVMError)."""

    def __init__(self, failures: list[BaseException]) -> None:
        super().__init__()
        self.failures = failures
        #: Every VM directory this driver was asked to launch in (other tests' VMs of the
        #: same run, e.g. module-scoped ones or the plugin's spares, are not this test's).
        self.workdirs: set[Path] = set()

    def _maybe_fail(self, workdir: Path) -> None:
        self.workdirs.add(workdir)
        if threading.current_thread().name == "smolvm-pool" and self.failures:
            raise self.failures.pop(0)

    def launch(self, *args: Any, **kw: Any) -> QemuMachine:
        self._maybe_fail(args[2])
        return super().launch(*args, **kw)

    def launch_clone(self, *args: Any, **kw: Any) -> QemuMachine:
        self._maybe_fail(args[3])
        return super().launch_clone(*args, **kw)

    def state(self) -> tuple[set[int], set[str]]:
        """QEMU processes and VM directories of the VMs this driver launched."""
        procs = {pid for pid, cmd in qemu_processes().items() if any(f"{w}/" in cmd for w in self.workdirs)}
        return procs, {w.name for w in self.workdirs if w.exists()}


def test_pool_thread_survives_any_warmup_failure_and_leaks_nothing() -> None:
    cfg = VMConfig(timeout=3.0)
    driver = FlakyDriver([])
    pool = VMPool(size=1, warmup="sleep 60")  # a warm-up that times out (until changed below)
    try:
        for failure in (None, RuntimeError("a driver bug"), MemoryError()):
            driver.failures = [failure] if failure else []
            with pool.acquire(cfg, driver) as vm:  # a miss: the test's own VM, started now
                assert vm.run("echo ok").stdout == "ok\n"
                assert pool.wait_idle(timeout=90), f"the pool is stuck after {pool.errors!r}"
                assert pool._thread is not None and pool._thread.is_alive()
                assert isinstance(pool.errors[-1], type(failure) if failure else CommandTimeout)
                # The failed warm-up left nothing: only the test's own VM exists.
                assert driver.state() == ({vm.pid}, {vm.name})
        assert pool.stats == {"hits": 0, "misses": 3, "prestarted": 0}
        pool.warmup = "true"
        with pool.acquire(cfg, driver):
            assert pool.wait_idle(timeout=90)
        with pool.acquire(cfg, driver) as vm:  # the spare the pool started after all that
            assert vm.run("echo ok").stdout == "ok\n"
        assert pool.stats["hits"] == 1
    finally:
        pool.close()
    assert driver.state() == (set(), set())


# ------------------------------------------------------------------ port forwards

GUEST_PORT = 9000
#: In the guest: a connection that starts with "S" is never read again (its receive buffer
#: fills); any other is echoed.
GUEST_SERVER = f"""
import socket, threading, time
def handle(c):
    if (first := c.recv(1)) == b"S":
        time.sleep(3600)
    c.sendall(first)
    while (d := c.recv(65536)):
        c.sendall(d)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", {GUEST_PORT}))
s.listen(64)
while True:
    threading.Thread(target=handle, args=(s.accept()[0],), daemon=True).start()
"""


@pytest.fixture(scope="module")
def server_vm() -> Iterator[SmolVM]:
    with SmolVM(VMConfig(network="isolated")) as vm:
        vm.put(GUEST_SERVER.encode(), "/root/server.py")
        vm.run("(python3 /root/server.py >/dev/null 2>&1 &)", check=True)
        vm.run(["python3", "-c", f"""
import socket, time
for _ in range(600):
    try:
        socket.create_connection(("127.0.0.1", {GUEST_PORT}), timeout=1).close(); break
    except OSError:
        time.sleep(0.05)
"""], check=True, timeout=60)
        yield vm


def _echo(sock: socket.socket, text: bytes, timeout: float = 30.0) -> bytes:
    sock.settimeout(timeout)
    sock.sendall(text)
    got = b""
    try:
        while len(got) < len(text) and (chunk := sock.recv(len(text) - len(got))):
            got += chunk
    except TimeoutError:
        pass
    return got


def _flood(sock: socket.socket) -> int:
    """Write into ``sock`` until nothing more goes in for a second; bytes written."""
    sock.setblocking(False)
    sent, idle_since = 0, time.monotonic()
    while time.monotonic() - idle_since < 1.0:
        try:
            sent += sock.send(b"x" * 65536)
            idle_since = time.monotonic()
        except BlockingIOError:
            time.sleep(0.02)
    return sent


def test_forward_guest_that_never_reads_stalls_only_its_own_connection(server_vm: SmolVM) -> None:
    port = server_vm.forward(GUEST_PORT)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as stalled:
        stalled.sendall(b"S")
        assert _flood(stalled) > 0  # the guest's buffers and the forwarder's are full now
        with socket.create_connection(("127.0.0.1", port), timeout=30) as other:
            assert _echo(other, b"Ehello\n") == b"Ehello\n"
            assert _echo(other, b"again\n") == b"again\n"


def test_forward_connect_that_hangs_blocks_no_other_connection(server_vm: SmolVM) -> None:
    port = server_vm.forward(GUEST_PORT)
    ns, guest = server_vm.network.netns, server_vm.network.guest_ip
    assert ns and guest
    table = f"robust{secrets.token_hex(3)}"
    with socket.create_connection(("127.0.0.1", port), timeout=30) as first:
        assert _echo(first, b"E1\n") == b"E1\n"
        # From now on the guest never sees a SYN to the port: the next upstream connect hangs.
        # (A table of our own in the run's namespace, in front of the guest only.)
        netns.run(ns, ["nft", "-f", "-"], input=(
            f"table ip {table} {{\n chain out {{\n type filter hook output priority 0; policy accept;\n"
            f" ip daddr {guest} tcp dport {GUEST_PORT} tcp flags & (syn | ack) == syn drop\n }}\n}}\n"))
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as hanging:
                time.sleep(0.5)  # the forwarder is inside its upstream connect now
                assert _echo(first, b"2\n") == b"2\n"
                # ...and answered while the hanging connect is still pending (not after it
                # gave up and closed the connection).
                hanging.settimeout(0.2)
                with pytest.raises(TimeoutError):
                    hanging.recv(1)
        finally:
            netns.run(ns, ["nft", "delete", "table", "ip", table])


def test_vm_from_the_pool_outlives_the_pool_thread() -> None:
    cfg = VMConfig()
    pool = VMPool(size=1)
    driver = FlakyDriver([])
    try:
        with pool.acquire(cfg, driver):
            assert pool.wait_idle(timeout=90)
        vm = pool.acquire(cfg, driver)  # started by the pool thread
    finally:
        pool.close()
    with vm:
        assert pool.stats["hits"] == 1
        assert pool._thread is not None and not pool._thread.is_alive()
        time.sleep(1.0)
        assert vm.run("echo still here").stdout == "still here\n"
    assert driver.state() == (set(), set())


def test_close_interrupted_half_way_is_finished_by_the_next_close() -> None:
    """A Ctrl-C that lands inside teardown must not leave the VM marked closed with its VMM
    and directory still there: the next close() (finaliser, atexit) finishes it."""
    vm = SmolVM(VMConfig()).start()
    pid, workdir = vm.pid, vm.workdir
    assert pid is not None
    machine = vm._session.machine if vm._session else None
    assert machine is not None
    real_kill = machine.kill
    calls = []

    def interrupted_kill() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        real_kill()

    machine.kill = interrupted_kill  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        vm.close()
    assert workdir.exists()  # the teardown really was cut short
    vm.close()
    assert len(calls) >= 2
    assert not workdir.exists()
    assert pid not in qemu_processes()
