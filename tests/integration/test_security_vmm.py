"""The VMM process: it never outlives the engine, never stays root, and what a guest prints
never grows a host file or a report without bound (security issue 10)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest

from pytest_smolvm import SmolVM, VMConfig
from pytest_smolvm.drivers import consolelog
from pytest_smolvm.paths import runtime_dir
from pytest_smolvm.reporting import sanitize, tail

ENGINE = textwrap.dedent("""
    import os, sys, time
    from pytest_smolvm import SmolVM, VMConfig
    vm = SmolVM(VMConfig(memory_mib=256)).start()
    print(vm.pid, vm.workdir, flush=True)
    if sys.argv[1] == "os_exit":
        os._exit(3)
    time.sleep(600)
""")

WAIT_LISTEN = """
import socket, sys, time
for _ in range(600):
    try:
        socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1).close()
        break
    except OSError:
        time.sleep(0.1)
"""


def _gone(pid: int, created: float, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            proc = psutil.Process(pid)
            if proc.create_time() != created or proc.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("how", ["kill9", "os_exit"])
def test_vmm_dies_with_the_engine_process_without_a_reap(how: str) -> None:
    run_id = f"wd{secrets.token_hex(3)}"
    env = {**os.environ, "SMOLVM_RUN_ID": run_id}
    engine = subprocess.Popen([sys.executable, "-c", ENGINE, how], stdout=subprocess.PIPE, text=True, env=env)
    pid = created = None
    try:
        assert engine.stdout is not None
        pid_s, workdir = engine.stdout.readline().split()
        pid = int(pid_s)
        created = psutil.Process(pid).create_time()
        assert workdir + "/" in " ".join(psutil.Process(pid).cmdline())
        if how == "kill9":
            engine.kill()
        assert engine.wait(timeout=30) == (-9 if how == "kill9" else 3)
        assert _gone(pid, created, within=10), f"QEMU {pid} outlived its engine ({how})"
    finally:
        if engine.poll() is None:
            engine.kill()
            engine.wait()
        if pid is not None and created is not None and not _gone(pid, created, 0):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(runtime_dir() / run_id, ignore_errors=True)


def test_vm_started_by_a_thread_that_ended_keeps_running() -> None:
    box: dict[str, SmolVM] = {}

    def start() -> None:
        box["vm"] = SmolVM(VMConfig(memory_mib=256)).start()

    t = threading.Thread(target=start)
    t.start()
    t.join()
    vm = box["vm"]
    try:
        time.sleep(0.5)  # PR_SET_PDEATHSIG fired at the thread's end: give it time to show
        assert vm.run("echo alive", timeout=60).stdout == "alive\n"
    finally:
        vm.close()


# ---------------------------------------------------------------- privilege drop


def _proc_ids(pid: int) -> tuple[set[int], set[int]]:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    uids = next(line for line in status if line.startswith("Uid:")).split()[1:]
    gids = next(line for line in status if line.startswith("Gid:")).split()[1:]
    return set(map(int, uids)), set(map(int, gids))


def _assert_unprivileged(vm: SmolVM) -> None:
    assert vm.pid is not None
    uids, gids = _proc_ids(vm.pid)
    assert 0 not in uids and 0 not in gids, (uids, gids)
    assert os.readlink(f"/proc/{vm.pid}/root") == str(vm.workdir)
    assert json.loads((vm.workdir / "vmm.json").read_text())["uid"] in uids


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the VMM drops privileges only when started as root")


@needs_root
def test_clone_on_an_isolated_network_runs_unprivileged_in_its_vm_dir() -> None:
    with SmolVM(VMConfig(memory_mib=256, network="isolated")) as vm:
        assert vm.boot_mode == "snapshot"
        _assert_unprivileged(vm)
        assert vm.run("echo ok", timeout=60).stdout == "ok\n"
        vm.put(b"payload", "/root/f")
        assert vm.get("/root/f") == b"payload"
        # The inherited TAP works: a forwarded TCP connection reaches a guest server.
        vm.run("mkdir -p /srv && echo page > /srv/i && cd /srv && (python3 -m http.server 8080 >/dev/null 2>&1 &)",
               check=True, timeout=60)
        vm.run(["python3", "-c", WAIT_LISTEN, "8080"], check=True, timeout=90)
        with socket.create_connection(("127.0.0.1", vm.forward(8080)), timeout=60) as conn:
            conn.sendall(b"GET /i HTTP/1.0\r\n\r\n")
            reply = b"".join(iter(lambda: conn.recv(4096), b""))
        assert reply.startswith(b"HTTP/1.0 200") and reply.endswith(b"\npage\n"), reply


@needs_root
@pytest.mark.parametrize("config", [
    VMConfig(memory_mib=256, disk_size_mib=1536),  # its own template (grown root), then a clone
    VMConfig(memory_mib=256, disk_mode="shared"),  # cold boot on the shared raw disk
], ids=["grown-disk-clone", "shared-disk"])
def test_disks_work_unprivileged(config: VMConfig) -> None:
    with SmolVM(config) as vm:
        _assert_unprivileged(vm)
        # The guest writes reach the disk QEMU can no longer open by path.
        r = vm.run("dd if=/dev/urandom of=/root/blob bs=1M count=16 2>&1 && sync && md5sum /root/blob && df -m /",
                   timeout=120)
        assert r.ok, r.stdout
        if config.disk_size_mib:
            assert int(r.stdout.splitlines()[-1].split()[1]) > 1200  # the root was grown


# ---------------------------------------------------------------- bounded console


def test_console_flood_is_capped_and_the_vm_still_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    # Small caps, so that a few seconds of flooding under TCG (~100-300 KB/s) go past them.
    head = tail_cap = 64 * 1024
    monkeypatch.setattr(consolelog, "HEAD", head)
    monkeypatch.setattr(consolelog, "TAIL", tail_cap)
    with SmolVM(VMConfig(memory_mib=256)) as vm:
        r = vm.run("timeout 5 sh -c 'yes $(head -c 200 /dev/zero | tr \"\\0\" y) > /dev/console';"
                   " head -c 20000 /dev/zero | tr '\\0' x > /dev/console; echo > /dev/console; echo done",
                   timeout=60)
        assert r.stdout == "done\n"
        assert vm.run("echo still here", timeout=60).stdout == "still here\n"
        time.sleep(0.6)  # the rolling tail is rewritten every 0.25 s
        data = (vm.workdir / "console.log").read_bytes()
        assert len(data) <= head + tail_cap + 200, len(data)
        assert b" bytes of console output cut ...]" in data
        assert b"xxxx [... " in data and b" bytes of this line cut ...]" in data
        log = vm.console_log
        prefix = log.index("restored from snapshot") + 200 if vm.boot_mode == "snapshot" else 0
        assert len(log) <= prefix + head + tail_cap + 200
        assert max(map(len, log.splitlines())) <= consolelog.MAX_LINE + 100
        section = sanitize(tail(log, 40))  # what plugin.py puts in a failure report
        assert len(section) <= 40 * (consolelog.MAX_LINE + 100)
    assert len(vm.console_log) <= prefix + head + tail_cap + 200  # after close: the cached copy
