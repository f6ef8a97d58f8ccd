#!/usr/bin/env python3
"""Snapshot clones vs cold boot, measured side by side in one run; ratios printed last.

    python benchmarks/clone.py [--clones 30] [--tests 100] [--cold 3] [--clone-only]

A/B of two versions of the engine (e.g. of the guest agent) in one session: run this same
script with PYTHONPATH pointing at each checkout, one after the other, with --clone-only.

- cold boot -> first run("true") answered (snapshot=False)
- clone: restore -> first run("true") answered (snapshot exists, no pool)
- pooled: a test's acquire -> first run("true") when the pool had time to refill
- a suite of N function-scoped tests each doing run("true") vs the same N on one session VM
- host PSS per idle clone (256 MiB guests)
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pytest_smolvm import SmolVM, VMConfig
from pytest_smolvm.drivers import default_driver
from pytest_smolvm.pool import VMPool


def pss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def suite_seconds(body: str, fixture: str, n: int, extra: list[str]) -> float:
    with tempfile.TemporaryDirectory() as d:
        tests = "".join(f"def test_{i}({fixture}):\n    {body}\n\n" for i in range(n))
        Path(d, "test_bench.py").write_text(tests)
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *extra, d],
                             capture_output=True, text=True)
        took = time.perf_counter() - t0
        if res.returncode != 0:
            raise SystemExit(f"benchmark suite failed:\n{res.stdout[-3000:]}")
        return took


def clone_phases(cfg: VMConfig, driver: object, n: int) -> None:
    """Where a clone's time goes before its first command: the agent's calls timed by wrapping
    the host's client (the same for any agent), medians of ``n`` clones."""
    from pytest_smolvm.guest.client import GuestClient

    spent: dict[str, float] = {}
    originals = {name: getattr(GuestClient, name) for name in ("hello", "setup")}

    def timed(name: str) -> object:
        def call(self: GuestClient, *a: object, **kw: object) -> object:
            t0 = time.perf_counter()
            try:
                return originals[name](self, *a, **kw)
            finally:
                spent[name] = time.perf_counter() - t0
        return call

    rows = []
    try:
        for name in originals:
            setattr(GuestClient, name, timed(name))
        for _ in range(n):
            t0 = time.perf_counter()
            with SmolVM(cfg, driver=driver) as vm:  # type: ignore[arg-type]
                t1 = time.perf_counter()
                vm.run("true")
                t2 = time.perf_counter()
            rows.append((t1 - t0 - spent["hello"] - spent["setup"], spent["hello"], spent["setup"], t2 - t1, t2 - t0))
    finally:
        for name, fn in originals.items():
            setattr(GuestClient, name, fn)
    launch, hello, setup, first, total = (statistics.median(c) * 1000 for c in zip(*rows, strict=True))
    print(f"clone start -> first command answered: median {total:.0f} ms of {n} = launch+restore {launch:.0f} "
          f"+ agent hello {hello:.0f} + setup {setup:.0f} + first run('true') {first:.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--clones", type=int, default=30)
    ap.add_argument("--tests", type=int, default=100)
    ap.add_argument("--cold", type=int, default=3)
    ap.add_argument("--clone-only", action="store_true", help="only cold boot and clone -> first command")
    args = ap.parse_args()
    cfg = VMConfig()
    driver = default_driver(cfg)

    with SmolVM(cfg, driver=driver) as vm:  # make sure the snapshot exists
        assert vm.boot_mode == "snapshot", vm.boot_mode
        accel = vm.accel

    cold = []
    for _ in range(args.cold):
        t0 = time.perf_counter()
        with SmolVM(cfg.replace(snapshot=False), driver=driver) as vm:
            vm.run("true")
            cold.append(time.perf_counter() - t0)

    clone = []
    for _ in range(args.clones):
        t0 = time.perf_counter()
        with SmolVM(cfg, driver=driver) as vm:
            vm.run("true")
            clone.append(time.perf_counter() - t0)

    med = statistics.median
    if args.clone_only:
        print(f"engine: {Path(sys.modules['pytest_smolvm'].__file__ or '?').parent}")
        print(f"cold boot -> first command: median {med(cold):.2f} s of {len(cold)}")
        print(f"clone restore -> first command (and close): median {med(clone) * 1000:.0f} ms of {len(clone)} "
              f"(min {min(clone) * 1000:.0f}, max {max(clone) * 1000:.0f})")
        clone_phases(cfg, driver, args.clones)
        return

    pooled = []
    pool = VMPool(size=1)
    try:
        pool.acquire(cfg, driver).close()
        for _ in range(args.clones):
            pool.wait_idle(120)
            t0 = time.perf_counter()
            vm = pool.acquire(cfg, driver)
            vm.run("true")
            pooled.append(time.perf_counter() - t0)
            vm.close()
    finally:
        pool.close()

    idle = [SmolVM(cfg, driver=driver).start() for _ in range(5)]
    try:
        time.sleep(2)
        pss = [pss_mib(vm.pid) for vm in idle if vm.pid]
    finally:
        for vm in idle:
            vm.close()

    fn_suite = suite_seconds('smolvm.run("true")', "smolvm", args.tests, [])
    sess_suite = suite_seconds('smolvm_session.run("true")', "smolvm_session", args.tests, [])

    print(f"accelerator: {accel.name if accel else '?'}")
    print(f"cold boot -> first command: median {med(cold):.2f} s of {len(cold)}")
    print(f"clone restore -> first command: median {med(clone) * 1000:.0f} ms of {len(clone)} "
          f"(min {min(clone) * 1000:.0f}, max {max(clone) * 1000:.0f})")
    print(f"pooled acquire -> first command: median {med(pooled) * 1000:.0f} ms of {len(pooled)}")
    print(f"{args.tests} function-scoped tests: {fn_suite:.1f} s; on one session VM: {sess_suite:.1f} s")
    print(f"host PSS per idle clone (256 MiB guest): median {med(pss):.0f} MiB of {len(pss)}")
    print("--- ratios ---")
    print(f"clone / cold boot: 1/{med(cold) / med(clone):.1f}   (target <= 1/20)")
    print(f"pooled / cold boot: 1/{med(cold) / med(pooled):.1f}")
    print(f"function-scoped suite / session suite: {fn_suite / sess_suite:.1f}x   (target <= 2x)")


if __name__ == "__main__":
    main()
