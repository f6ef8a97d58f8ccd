"""``--smolvm-group-by-shape`` with real VMs: under ``-n 2 --dist loadgroup`` the tests of one
VM shape run on one worker, whose warm pool then has their VMs ready. (The measured effect on
a larger mixed suite: benchmarks/shapes.py.)"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from helpers import REAL_CACHE, qemu_processes

SUITE = """
import json, os, pytest

def record(request, vm):
    (request.config.rootpath / f"ran-{request.node.name}.json").write_text(json.dumps(
        {"worker": os.environ.get("PYTEST_XDIST_WORKER"), "nodeid": request.node.nodeid,
         "mem": int(vm.run("awk '/MemTotal/ {print $2}' /proc/meminfo").stdout)}))

@pytest.mark.parametrize("i", range(3))
def test_small(smolvm, request, i):
    record(request, smolvm)

@pytest.mark.smolvm(memory_mib=384)
@pytest.mark.parametrize("i", range(3))
def test_big(smolvm, request, i):
    record(request, smolvm)
"""


def test_each_shape_runs_on_one_worker_from_its_pool(pytester: pytest.Pytester,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("xdist")
    run_id = f"sg{os.getpid():x}"
    monkeypatch.setenv("SMOLVM_RUN_ID", run_id)
    monkeypatch.setenv("SMOLVM_CACHE_DIR", str(REAL_CACHE))
    # Interleaved, as modules that mix shapes would be: without groups, xdist's chunks mix them.
    pytester.makepyfile(test_mixed=SUITE)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "xdist", "-p", "no:randomly",
                                           "-n", "2", "--dist", "loadgroup", "--smolvm-group-by-shape")
    result.assert_outcomes(passed=6)
    runs = [json.loads(p.read_text()) for p in Path(pytester.path).glob("ran-*.json")]
    assert len(runs) == 6
    for kind, low, high in (("test_small", 200, 256), ("test_big", 300, 384)):
        mine = [r for r in runs if r["nodeid"].startswith(f"test_mixed.py::{kind}[")]
        assert len({r["worker"] for r in mine}) == 1, mine            # one shape, one worker
        assert len({r["nodeid"].rpartition("@")[2] for r in mine}) == 1
        assert all(low * 1024 < r["mem"] <= high * 1024 for r in mine)  # and the shape it asked for
    m = re.search(r"smolvm: host \S+ \(gw0, gw1\): 6 VM\(s\), pool hits (\d+)/6", result.stdout.str())
    assert m, result.stdout.str()
    # A shape's first VM is the worker's own; after it the pool has the next one started
    # while the test runs (or is starting it, and the test waits for it): 4 hits, of which one
    # may be lost to a loaded host (the pool never starts a VM the host cannot afford).
    assert int(m[1]) >= 3, m[0]
    assert not [c for c in qemu_processes().values() if f"/{run_id}/" in c]
