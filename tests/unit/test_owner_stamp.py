"""Owner records stay readable by older versions running beside this one on the same host."""

from __future__ import annotations

import os
import subprocess
import sys

from pytest_smolvm.host import owner_stamp, process_start_ticks, stamp_alive


def test_stamp_keeps_the_legacy_ticks_older_reapers_compare() -> None:
    stamp = owner_stamp(os.getpid())
    # An older reaper compares pid_start with /proc ticks by equality: a float here made it
    # judge a live run dead and reap its VMs and namespaces.
    assert stamp["pid_start"] == process_start_ticks(os.getpid())
    assert isinstance(stamp["create_time"], float)
    assert stamp_alive(stamp)


def test_a_dead_or_reused_pid_is_not_alive() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    stamp = owner_stamp(child.pid)
    child.wait()
    assert not stamp_alive(stamp)
    reused = {**owner_stamp(os.getpid()), "create_time": owner_stamp(os.getpid())["create_time"] - 3600}
    assert not stamp_alive(reused)
    assert not stamp_alive({"pid": True})
    assert not stamp_alive({})


def test_legacy_records_are_still_understood() -> None:
    assert stamp_alive({"pid": os.getpid(), "pid_start": process_start_ticks(os.getpid())})
    assert not stamp_alive({"pid": os.getpid(), "pid_start": -5})
