#!/usr/bin/env python3
"""Checkpoints of a prepared VM vs set-up in every test, measured side by side in one run;
ratios printed last.

    python benchmarks/checkpoint.py [--tests 30] [--clones 10] [--memory 256,512] [--no-xdist]
                                    [--prepared-only]

- checkpoint(): how long the prepared VM is paused, and the whole call, per guest memory size
- clone of a checkpoint -> first run("true") vs clone of the golden snapshot -> first run("true")
  (interleaved, medians), and host PSS of an idle clone of each
- a suite of N tests that each need the set-up (python3 writes and compiles a small project,
  seeds an SQLite database, starts ``python3 -m http.server``, no network), then query the
  server: ``smolvm`` doing the set-up in every test vs a session fixture that sets up once and
  returns ``vm.checkpoint()`` with each test a clone (``smolvm_factory(checkpoint=...)``);
  and the checkpoint suite under ``-n 2`` (each xdist worker prepares its own checkpoint)
- prepared state that lasts (``smolvm_prepared``, a fresh key each invocation): run 1 (builds)
  vs run 2 (reuses; the set-up's host-side marker proves it never ran), ``-n 2`` vs ``-n 0``
  sharing the cached checkpoint (run 1 under ``-n 2`` builds once for both workers), and the
  size of ``checkpoint export`` of it (``--prepared-only``: just these)
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from pytest_smolvm import SmolVM, VMConfig
from pytest_smolvm.drivers import default_driver

SETUP = r"""
set -e
mkdir -p /srv/app && cd /srv/app
python3 - <<'PY'
import pathlib, sqlite3
for i in range(150):
    pathlib.Path(f"mod{i}.py").write_text("".join(f"def f{j}(x):\n    return x * {j} + {i}\n" for j in range(20)))
db = sqlite3.connect("app.db")
db.execute("create table items (id integer primary key, name text)")
db.executemany("insert into items (name) values (?)", [(f"item{i}",) for i in range(5000)])
db.commit()
PY
python3 -m compileall -q /srv/app
(python3 -m http.server 8000 --directory /srv/app >/dev/null 2>&1 &)
for i in $(seq 100); do
  python3 -c "import socket; socket.create_connection(('127.0.0.1', 8000))" 2>/dev/null && exit 0
  sleep 0.1
done
exit 1
"""
CHECK = ("python3 -c \"import urllib.request; "
         "assert b'return x' in urllib.request.urlopen('http://127.0.0.1:8000/mod7.py').read()\"")

SUITE_EACH = '''
import pytest
SETUP = {setup!r}
CHECK = {check!r}

@pytest.mark.parametrize("n", range({n}))
def test_each(smolvm, n):
    smolvm.run(SETUP, check=True, timeout=600)
    smolvm.run(CHECK, check=True)
'''
SUITE_CHECKPOINT = '''
import pytest
SETUP = {setup!r}
CHECK = {check!r}

@pytest.fixture(scope="session")
def prepared(smolvm_session):
    smolvm_session.run(SETUP, check=True, timeout=600)
    return smolvm_session.checkpoint()

@pytest.mark.parametrize("n", range({n}))
def test_each(prepared, smolvm_factory, n):
    smolvm_factory(checkpoint=prepared).run(CHECK, check=True)
'''
SUITE_PREPARED = '''
import os, pytest
SETUP = {setup!r}
CHECK = {check!r}

def install(vm):
    vm.run(SETUP, check=True, timeout=600)
    with open(os.environ["BENCH_MARKER"], "a") as f:
        f.write("setup\\n")

@pytest.fixture(scope="session")
def prepared(smolvm_prepared):
    return smolvm_prepared(os.environ["BENCH_KEY"], setup=install)

@pytest.mark.parametrize("n", range({n}))
def test_each(prepared, smolvm_factory, n):
    smolvm_factory(checkpoint=prepared).run(CHECK, check=True)
'''


def pss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def suite_seconds(template: str, n: int, extra: list[str], env: dict[str, str] | None = None) -> float:
    with tempfile.TemporaryDirectory() as d:
        Path(d, "test_bench_cp.py").write_text(template.format(setup=SETUP, check=CHECK, n=n))
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
                              *extra, d], capture_output=True, text=True, env=None if env is None else
                             {**os.environ, **env})
        took = time.perf_counter() - t0
        if res.returncode != 0:
            raise SystemExit(f"benchmark suite failed:\n{res.stdout[-3000:]}")
        return took


def checkpoint_costs(memory_mib: int, driver: object, rounds: int) -> tuple[float, float, float, int]:
    """(set-up seconds, median pause, median checkpoint() seconds, checkpoint bytes on disk) for a
    prepared guest of ``memory_mib``."""
    with SmolVM(VMConfig(memory_mib=memory_mib), driver=driver) as vm:  # type: ignore[arg-type]
        t0 = time.perf_counter()
        vm.run(SETUP, check=True, timeout=600)
        setup = time.perf_counter() - t0
        cps = [vm.checkpoint() for _ in range(rounds)]
        try:
            return (setup, statistics.median(c.paused_s for c in cps), statistics.median(c.taken_s for c in cps),
                    cps[0].disk_usage)
        finally:
            for cp in cps:
                cp.remove()


def prepared_numbers(n: int) -> None:
    """Run 1 vs run 2 of a smolvm_prepared suite, -n 2 vs -n 0 on the shared checkpoint, and
    the exported size; prints one line each. Removes its cache entries afterwards."""
    from pytest_smolvm.cli import main as cli
    from pytest_smolvm.paths import cache_dir
    from pytest_smolvm.prepared import default_store

    key = f"bench-{uuid.uuid4().hex[:8]}"
    marker = cache_dir() / f"{key}.setups"
    env = {"BENCH_KEY": key, "BENCH_MARKER": str(marker)}
    setups = lambda: len(marker.read_text().splitlines()) if marker.exists() else 0  # noqa: E731
    try:
        run1 = suite_seconds(SUITE_PREPARED, n, [], env)
        after1 = setups()
        run2 = suite_seconds(SUITE_PREPARED, n, [], env)
        run2_n2 = suite_seconds(SUITE_PREPARED, n, ["-n", "2"], env)
        after2 = setups()
        env["BENCH_KEY"] = f"{key}-x"
        run1_n2 = suite_seconds(SUITE_PREPARED, n, ["-n", "2"], env)
        after3 = setups()
        out = cache_dir() / f"{key}.tgz"
        t0 = time.perf_counter()
        cli(["checkpoint", "export", key, str(out)])
        exported = time.perf_counter() - t0
        size = out.stat().st_size
        ram = sum((e.path / "mem").stat().st_blocks * 512 for e in default_store().match(key))
        out.unlink()
    finally:
        marker.unlink(missing_ok=True)
        for k in (key, f"{key}-x"):
            cli(["checkpoint", "rm", k])
    print(f"smolvm_prepared, {n} tests: run 1 (builds) {run1:.1f} s, run 2 (reuses) {run2:.1f} s; set-ups run: "
          f"{after1} in run 1, {after2 - after1} in run 2 and its -n 2 rerun")
    print(f"smolvm_prepared, shared checkpoint: -n 0 {run2:.1f} s, -n 2 {run2_n2:.1f} s; run 1 under -n 2 "
          f"{run1_n2:.1f} s with {after3 - after2} set-up for both workers")
    print(f"checkpoint export: {size / 2**20:.1f} MiB (tar.gz; RAM file {ram / 2**20:.0f} MiB on disk), "
          f"{exported:.1f} s")
    print(f"run 2 / run 1: {run2 / run1:.2f}x; shared checkpoint -n 2 / -n 0: {run2_n2 / run2:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tests", type=int, default=30)
    ap.add_argument("--clones", type=int, default=10)
    ap.add_argument("--memory", default="256,512", help="guest sizes (MiB) to time checkpoint() for")
    ap.add_argument("--no-xdist", action="store_true", help="skip the -n 2 checkpoint suite")
    ap.add_argument("--prepared-only", action="store_true", help="only the smolvm_prepared numbers")
    args = ap.parse_args()
    if args.prepared_only:
        prepared_numbers(args.tests)
        return
    cfg = VMConfig()
    driver = default_driver(cfg)
    med = statistics.median

    costs = {int(m): checkpoint_costs(int(m), driver, 3) for m in args.memory.split(",")}

    with SmolVM(cfg, driver=driver) as prepared:
        assert prepared.boot_mode == "snapshot", prepared.boot_mode
        accel = prepared.accel
        prepared.run(SETUP, check=True, timeout=600)
        cp = prepared.checkpoint()
        golden: list[float] = []
        clone: list[float] = []
        pss_golden: list[float] = []
        pss_clone: list[float] = []
        for _ in range(args.clones):
            for kind, times, pss in (("golden", golden, pss_golden), ("checkpoint", clone, pss_clone)):
                t0 = time.perf_counter()
                vm = SmolVM(cfg, driver=driver, checkpoint=cp if kind == "checkpoint" else None).start()
                try:
                    vm.run("true")
                    times.append(time.perf_counter() - t0)
                    if len(pss) < 3:
                        time.sleep(1)
                        pss.append(pss_mib(vm.pid or 0))
                finally:
                    vm.close()
        cp.remove()

    each = suite_seconds(SUITE_EACH, args.tests, [])
    once = suite_seconds(SUITE_CHECKPOINT, args.tests, [])
    once_n2 = None if args.no_xdist else suite_seconds(SUITE_CHECKPOINT, args.tests, ["-n", "2"])

    print(f"accelerator: {accel.name if accel else '?'}")
    for m, (setup, paused, taken, size) in costs.items():
        print(f"{m} MiB guest: set-up {setup:.1f} s; checkpoint() paused the VM {paused * 1000:.0f} ms, "
              f"took {taken:.2f} s in all, {size / 2**20:.0f} MiB on disk (medians of 3)")
    print(f"golden snapshot clone -> first command: median {med(golden) * 1000:.0f} ms of {len(golden)}")
    print(f"checkpoint clone -> first command: median {med(clone) * 1000:.0f} ms of {len(clone)} "
          f"(min {min(clone) * 1000:.0f}, max {max(clone) * 1000:.0f})")
    print(f"host PSS of an idle clone: golden {med(pss_golden):.0f} MiB, checkpoint {med(pss_clone):.0f} MiB")
    print(f"{args.tests} tests, set-up in each (smolvm): {each:.1f} s; set-up once + checkpoint clones: {once:.1f} s"
          + ("" if once_n2 is None else f"; the same under -n 2 (a checkpoint per worker): {once_n2:.1f} s"))
    print("--- ratios ---")
    print(f"checkpoint clone / golden clone (to first command): {med(clone) / med(golden):.2f}x")
    print(f"suite, set-up in each test / checkpoint clones: {each / once:.1f}x")
    if once_n2 is not None:
        print(f"checkpoint suite, -n 2 / -n 0: {once_n2 / once:.2f}x")
    prepared_numbers(args.tests)


if __name__ == "__main__":
    main()
