"""xdist over hosts: one suite of fresh-VM tests, networked and not, run by two simulated
hosts (execnet socket servers in namespaces of their own, tests/simhost.py) reached with
``pytest -d --tx socket=…``, as CI would reach real machines. Each host governs its own VMs:
runtime directory, network namespaces, pool and reaping are per host; the run id is one."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import REAL_CACHE, qemu_processes
from simhost import DROP_ENV, SimHost

import pytest_smolvm

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="simulated hosts need namespaces (root)"),
    pytest.mark.skipif(shutil.which("unshare") is None or shutil.which("nsenter") is None,
                       reason="needs unshare and nsenter (util-linux)"),
]

PACKAGE_ROOT = str(Path(pytest_smolvm.__file__).resolve().parent.parent)

# Networked (isolated and nat) and non-networked tests, ordered so that xdist's first chunks
# (two tests a worker) give each host an isolated and a nat VM at once: both hosts then set up
# the run's network at the same time, under one run id. Each host's nat traffic leaves through
# its own stand-in uplink and internet (tests/nettopo.py, SMOLVM_UPLINK set per host).
SUITE = '''
import socket, pytest

KINDS = ["isolated", "nat", "isolated", "nat", "none", "none", "isolated", "nat", "none", "none", "isolated", "none"]
FETCH = ["python3", "-c", "import urllib.request as u; "
         "print(u.urlopen('http://198.51.100.10/', timeout=20).read().decode())"]

@pytest.mark.parametrize("i", range(len(KINDS)))
def test_vm(i, smolvm_factory, record_property):
    net = KINDS[i]
    vm = smolvm_factory(network=net, allow=["198.51.100.0/24"] if net == "nat" else [])
    record_property("host", socket.gethostname())
    record_property("run", vm.run_id)
    record_property("workdir", str(vm.workdir))
    assert vm.run("echo $((6*7))").stdout == "42\\n"
    if net == "none":
        return
    record_property("netns", vm.network.netns)
    assert vm.network.guest_ip in vm.run("ip -4 addr show eth0").stdout
    # Dropped inside this host's run namespace by this host's policy.
    vm.run("bash -c 'echo x > /dev/udp/203.0.113.10/9'")
    assert ("203.0.113.10", 9, "udp") in vm.network.denied
    if net == "nat":
        record_property("uplink", vm.config.uplink)
        page = vm.run(FETCH)
        assert page.stdout.strip() == "allowed-host", page

def test_reports_its_host(smolvm):
    assert smolvm.run("false").ok, "failing on purpose: the report must name the host"
'''

# For the kill case: on simhost-b every test holds its (networked) VM until it is killed.
SLOW_ON_B = '''
import socket, pytest

@pytest.mark.smolvm(network="isolated")
@pytest.mark.parametrize("i", range(6))
def test_hold(smolvm, i):
    if socket.gethostname() == "simhost-b":
        smolvm.run("sleep 120", timeout=150)
    assert smolvm.run("true").ok
'''


def write_suite(path: Path, source: str) -> Path:
    path.mkdir()
    (path / "pytest.ini").write_text("[pytest]\naddopts = -p no:cacheprovider\n")
    (path / "test_suite.py").write_text(source)
    return path


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[list[SimHost]]:
    logs = tmp_path / "logs"
    logs.mkdir()
    # simhost-a uses the machine's cache (it "built" the images); simhost-b sees that image
    # cache only read-only (SMOLVM_IMAGE_PATH, like an NFS export) and has an empty one of its own.
    made = [SimHost("simhost-a", logs, PACKAGE_ROOT),
            SimHost("simhost-b", logs, PACKAGE_ROOT, shared_images=REAL_CACHE / "images")]
    try:
        yield made
    finally:
        for host in made:
            host.stop()


def controller_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DROP_ENV}
    env.update(SMOLVM_RUNTIME_DIR=str(tmp_path / "controller-rt"), SMOLVM_CACHE_DIR=str(REAL_CACHE),
               PYTHONPATH=PACKAGE_ROOT)
    return env


def run_over(hosts: list[SimHost], suite: Path, tmp_path: Path, *extra: str,
             timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """``pytest -d --tx socket=…`` per host from ``suite``, with no path argument (xdist would
    rewrite it against rsync roots)."""
    argv = [sys.executable, "-m", "pytest", "-p", "xdist", "-p", "no:randomly", "-d", "--max-worker-restart=0", "-rfE",
            f"--junitxml={tmp_path / 'junit.xml'}", *extra]
    for host in hosts:
        argv += ["--tx", host.tx]
    proc = subprocess.Popen(argv, cwd=suite, env=controller_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"the multi-host run did not finish in {timeout}s:\n{out[-4000:]}")
    return subprocess.CompletedProcess(argv, proc.returncode, out, "")


def properties(junit: Path) -> dict[str, dict[str, str]]:
    """test name -> its recorded properties and outcome."""
    found = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        props = {p.get("name", ""): p.get("value", "") for p in case.iter("property")}
        props["outcome"] = "failed" if case.find("failure") is not None or case.find("error") is not None else "passed"
        found[case.get("name", "")] = props
    return found


def assert_clean(host: SimHost, run_id: str) -> None:
    left = host.leftovers()
    assert left == {"vmms": [], "runtime": [], "netns": []}, (host.name, left)
    if host.uplink is not None:  # the run's masquerade table and veth left the uplink too
        res = host.run(["ip", "netns", "exec", host.uplink, "sh", "-c", "nft list tables; ip -o link"])
        assert res.returncode == 0 and "smolvm" not in res.stdout and "svu" not in res.stdout, res


def assert_no_trace_of_run(run_id: str) -> None:
    """Nothing of the run anywhere on the machine: no VMM naming it, no nft table of it."""
    assert not [c for c in qemu_processes().values() if f"/{run_id}/" in c]
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=False).stdout
    assert run_id not in tables, tables


def test_suite_runs_across_two_hosts_without_collision(hosts: list[SimHost], tmp_path: Path) -> None:
    suite = write_suite(tmp_path / "suite", SUITE)
    for host in hosts:
        host.start(suite, internet=True)
    t0 = time.monotonic()
    res = run_over(hosts, suite, tmp_path)
    elapsed = time.monotonic() - t0
    out = res.stdout
    assert res.returncode == 1, out[-4000:]
    assert re.search(r"1 failed, 12 passed", out), out[-4000:]
    props = properties(tmp_path / "junit.xml")
    vm_tests = {name: p for name, p in props.items() if name.startswith("test_vm")}
    assert len(vm_tests) == 12 and all(p["outcome"] == "passed" for p in vm_tests.values()), props

    # Both hosts got tests, networked ones included, all of one run.
    by_host: dict[str, list[dict[str, str]]] = {}
    for p in vm_tests.values():
        by_host.setdefault(p["host"], []).append(p)
    assert set(by_host) == {"simhost-a", "simhost-b"}, {h: len(v) for h, v in by_host.items()}
    assert all(any("netns" in p for p in ps) for ps in by_host.values()), by_host
    assert all(any("uplink" in p for p in ps) for ps in by_host.values()), by_host   # nat on both
    assert {p["uplink"] for p in vm_tests.values() if "uplink" in p} == {h.uplink for h in hosts}
    runs = {p["run"] for p in vm_tests.values()}
    assert len(runs) == 1, runs
    run_id = runs.pop()
    # One run namespace per host. Its name is per host too (the run's tag digests the host
    # name and runtime directory when that is not the default), though on real machines, and
    # here in each host's own /run/netns, even equal names would not meet.
    names = {h: {p["netns"] for p in ps if "netns" in p} for h, ps in by_host.items()}
    assert all(len(n) == 1 for n in names.values()) and names["simhost-a"] != names["simhost-b"], names
    assert all(p["workdir"].startswith(f"/tmp/smolvm-rt/{run_id}/") for p in vm_tests.values())

    # The failure report says where its VM ran; the summary says what each host did.
    where = rf"host simhost-[ab], worker gw[01], run {run_id}, VM directory /tmp/smolvm-rt/{run_id}/"
    assert re.search(where, out), out
    for host in ("simhost-a", "simhost-b"):
        assert re.search(rf"smolvm: host {host} \(gw[01]\): \d+ VM\(s\), pool hits \d+/\d+", out), out

    # simhost-b found its image in the read-only shared cache: it built no image, locked and
    # wrote nothing there (a write would fail: read-only), and made its snapshots in its own.
    own = hosts[1].run(["sh", "-c", "find /tmp/smolvm-cache/images -name manifest.json | wc -l; "
                                    "ls /tmp/smolvm-cache/snapshots | wc -l"]).stdout.split()
    assert own[0] == "0" and int(own[1]) >= 2, own

    for host in hosts:
        assert_clean(host, run_id)
    assert_no_trace_of_run(run_id)
    print(f"13 tests over two simulated hosts in {elapsed:.1f}s "
          f"({ {h: len(v) for h, v in by_host.items()} })")


def test_killed_host_is_cleaned_by_reap_and_its_next_run(hosts: list[SimHost], tmp_path: Path) -> None:
    suite = write_suite(tmp_path / "suite", SLOW_ON_B)
    for host in hosts:
        host.start(suite)
    a, b = hosts
    argv_extra = ["-p", "no:randomly"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "xdist", "-d", "--max-worker-restart=0", *argv_extra,
         "--tx", a.tx, "--tx", b.tx],
        cwd=suite, env=controller_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    try:
        # Wait until simhost-b has a networked VM up (its run namespace exists), then kill its
        # server, and with it the worker it runs, with SIGKILL: no teardown runs.
        deadline = time.monotonic() + 120
        while not (left := b.leftovers())["netns"] or not left["vmms"]:
            assert proc.poll() is None and time.monotonic() < deadline, (left, proc.poll())
            time.sleep(0.3)
        b.kill_server()
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert "crashed" in out or "node down" in out, out[-3000:]

    # What the dead worker left on simhost-b: its VM directories, the run namespace, the slot
    # table. Its VMMs are gone already (the watchdog saw its engine die).
    deadline = time.monotonic() + 15
    while (left := b.leftovers())["vmms"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left["vmms"], left
    assert left["runtime"] and left["netns"], left
    run_id = left["runtime"][0].split(".")[0]
    dry = b.run([sys.executable, "-m", "pytest_smolvm", "reap", "--dry-run"])
    assert f"run {run_id}" in dry.stdout and "network namespace smolvm-" in dry.stdout, dry.stdout + dry.stderr
    assert b.leftovers() == left  # a dry run removes nothing

    # The host's next run (its worker, not the controller, which cannot see it) reaps it.
    b.start_server()
    # A new module name: simhost-a's server process ran the old one and still has it imported.
    (suite / "test_suite.py").unlink()
    (suite / "test_next.py").write_text("def test_quick(smolvm):\n    assert smolvm.run('true').ok\n")
    for host in hosts:
        res = host.run(["sh", "-c", "rm /tmp/suite/test_suite.py && cat > /tmp/suite/test_next.py"],
                       stdin=(suite / "test_next.py").read_bytes())
        assert res.returncode == 0, res.stderr
    res = run_over(hosts, suite, tmp_path)
    assert res.returncode == 0, res.stdout[-4000:]
    assert re.search(r"smolvm: host simhost-b \(gw1\): .*, \d+ leftover\(s\) of dead runs reaped", res.stdout), \
        res.stdout[-3000:]
    for host in hosts:
        assert_clean(host, run_id)
    after = b.run([sys.executable, "-m", "pytest_smolvm", "reap"])
    assert after.returncode == 0 and "0 leftover VM(s) reaped" in after.stdout, after.stdout + after.stderr
    assert_no_trace_of_run(run_id)
