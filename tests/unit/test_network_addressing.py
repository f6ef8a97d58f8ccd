"""Network addressing and the cross-process slot allocator (pure; no interface is created)."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_smolvm.errors import ConfigError, NetworkError
from pytest_smolvm.network.addressing import DEFAULT_BASE, IFNAMSIZ, addressing, slot_count
from pytest_smolvm.network.allocator import SlotTable


def test_slots_are_disjoint_30s_with_host_and_guest_addresses() -> None:
    seen: set[ipaddress.IPv4Address] = set()
    for slot in range(64):
        a = addressing(slot, "run1")
        assert a.subnet.prefixlen == 30 and a.subnet.subnet_of(DEFAULT_BASE)
        assert (a.host_ip, a.guest_ip) == (a.subnet.network_address + 1, a.subnet.network_address + 2)
        assert not seen & set(a.subnet)
        seen |= set(a.subnet)


def test_mac_is_locally_administered_unicast_and_unique_per_run_and_slot() -> None:
    macs = {addressing(s, r).mac for s in range(300) for r in ("run1", "run2")}
    assert len(macs) == 600
    first = int(addressing(0, "run1").mac.split(":")[0], 16)
    assert first & 0x02 and not first & 0x01


def test_tap_names_fit_ifnamsiz_and_differ() -> None:
    names = {addressing(s, "a1b2c3d4").tap for s in range(slot_count())}
    assert len(names) == slot_count()
    assert all(len(n) <= IFNAMSIZ for n in names)


def test_slot_out_of_range_and_tiny_base_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="slot 16384"):
        addressing(16384, "r")
    with pytest.raises(ConfigError, match="/31"):
        slot_count(ipaddress.IPv4Network("10.0.0.0/31"))
    assert slot_count(ipaddress.IPv4Network("10.0.0.0/28")) == 4


def test_lease_release_and_next_fit_slot(tmp_path: Path) -> None:
    table = SlotTable(tmp_path / "slots.json", "run1", slots=4)
    a, b = table.lease("vm-a"), table.lease("vm-b")
    assert (a.slot, b.slot) == (0, 1)
    table.release(a)
    table.release(a)  # idempotent
    # Next-fit: a freed slot is not handed out again until the others have been used.
    assert table.lease("vm-c").slot == 2
    assert table.lease("vm-d").slot == 3
    assert table.lease("vm-e").slot == 0
    entry = table.leases()[1]
    assert (entry["run_id"], entry["vm"], entry["pid"]) == ("run1", "vm-b", os.getpid())


def test_exhaustion_is_a_network_error(tmp_path: Path) -> None:
    table = SlotTable(tmp_path / "slots.json", "run1", slots=2)
    table.lease("a")
    table.lease("b")
    with pytest.raises(NetworkError, match="all 2 network slots"):
        table.lease("c")


def test_slots_of_dead_owners_are_reclaimed(tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    path = tmp_path / "slots.json"
    path.write_text(json.dumps({"0": {"run_id": "r", "worker": "gw0", "vm": "v", "pid": dead.pid,
                                      "pid_start": None, "at": 0}}))
    assert SlotTable(path, "r", slots=1).lease("new").slot == 0


def test_release_never_frees_another_owners_slot(tmp_path: Path) -> None:
    table = SlotTable(tmp_path / "slots.json", "r", slots=2)
    mine = table.lease("mine")
    forged = type(mine)(mine.slot, "r", "gw9", "someone-else", mine.pid)
    table.release(forged)
    assert 0 in table.leases()


def test_concurrent_processes_never_collide(tmp_path: Path) -> None:
    path = tmp_path / "slots.json"
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from pytest_smolvm.network.allocator import SlotTable\n"
        f"t = SlotTable(Path({str(path)!r}), 'run', slots=64)\n"
        "got = [t.lease(f'{sys.argv[1]}-{i}', worker=sys.argv[1]).slot for i in range(20)]\n"
        "print(' '.join(map(str, got)))\n"
        "time.sleep(1)\n"  # hold the leases while the other process allocates
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, f"gw{i}"], stdout=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=60)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    slots = [int(s) for out in outs for s in out]
    assert len(slots) == 40 and len(set(slots)) == 40


def test_corrupt_table_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "slots.json"
    path.write_text("{not json")
    with pytest.raises(NetworkError, match=r"slots\.json is corrupt"):
        SlotTable(path, "r", slots=2).lease("x")


def test_shared_lock_excludes_threads_even_when_the_file_lock_does_not(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # filelock < 3.11 (Debian 12 ships 3.9) shares a lock object's state between threads: a
    # second thread "acquired" a lock the first held. thread_local=False reproduces that here.
    import functools
    import threading

    import filelock

    from pytest_smolvm.network import allocator

    monkeypatch.setattr(allocator, "FileLock", functools.partial(filelock.FileLock, thread_local=False))
    lock = allocator.SharedLock(tmp_path / "net.lock")
    entered = threading.Event()
    results: list[str] = []

    def other() -> None:
        try:
            lock.acquire(timeout=0.2)
        except filelock.Timeout:
            results.append("timeout")
        else:
            results.append("entered")
            lock.release()
        entered.set()

    with lock, lock:  # re-entrant in its own thread
        t = threading.Thread(target=other)
        t.start()
        assert entered.wait(5)
    t.join()
    assert results == ["timeout"]
    other()  # free again: the other thread gets it
    assert results == ["timeout", "entered"]
    assert allocator.shared_lock(tmp_path / "x") is allocator.shared_lock(tmp_path / "x")
