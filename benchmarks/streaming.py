#!/usr/bin/env python3
"""Live output and spawn, measured side by side in one VM; ratios printed last.

    python benchmarks/streaming.py [--runs 50] [--mib 8] [--compare-with /work/main]

- run("true") plain vs run("true", on_output=...) vs spawn("true").wait(): per-call cost
- time until on_output has the first line of `echo x; sleep 1` (vs the command's 1 s)
- throughput of `head -c N MiB /dev/zero` plain vs streamed (max_output raised to fit)
- run("true") while a spawned process streams a line every 10 ms, vs idle
- with --compare-with CHECKOUT: plain run("true") of that checkout (e.g. main, whose channel
  has no reader thread) in a child process, interleaved with this one in rounds
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

from pytest_smolvm import SmolVM, VMConfig

CHILD = """
import statistics, sys, time
from pytest_smolvm import SmolVM, VMConfig
with SmolVM(VMConfig()) as vm:
    for _ in range(5):
        vm.run("true")
    out = []
    for _ in range(int(sys.argv[1])):
        t0 = time.perf_counter(); vm.run("true"); out.append(time.perf_counter() - t0)
print(statistics.median(out))
"""


def timed(n: int, *fns: Callable[[], object]) -> list[float]:
    """Median seconds of each of ``fns``, called in turn ``n`` times (interleaved: the host's
    load changes under all of them alike)."""
    out: list[list[float]] = [[] for _ in fns]
    for _ in range(n):
        for fn, times in zip(fns, out, strict=True):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return [statistics.median(times) for times in out]


def first_chunk(vm: SmolVM) -> tuple[float, float]:
    seen: list[float] = []
    t0 = time.perf_counter()
    vm.run("echo x; sleep 1", on_output=lambda s, t: seen.append(time.perf_counter()))
    return seen[0] - t0, time.perf_counter() - t0


def child_median(path: str, runs: int) -> float:
    env = {**os.environ, "PYTHONPATH": path}
    res = subprocess.run([sys.executable, "-c", CHILD, str(runs)], env=env, capture_output=True, text=True,
                         check=True, timeout=600)
    return float(res.stdout.split()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--mib", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--compare-with", metavar="CHECKOUT")
    args = ap.parse_args()
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with SmolVM(VMConfig()) as vm:
        for _ in range(5):
            vm.run("true")
            vm.run("true", on_output=lambda s, t: None)
        plain, streamed, spawned = timed(args.runs, lambda: vm.run("true"),
                                         lambda: vm.run("true", on_output=lambda s, t: None),
                                         lambda: vm.spawn("true").wait(30))
        firsts = [first_chunk(vm) for _ in range(5)]
        cap = (args.mib + 1) << 20
        flood = f"head -c {args.mib}M /dev/zero"
        bulk_plain, bulk_stream = timed(3, lambda: vm.run(flood, max_output=cap),
                                        lambda: vm.run(flood, max_output=cap, on_output=lambda s, t: None))
        idle, busy = [], []
        for _ in range(3):
            idle += timed(args.runs // 3, lambda: vm.run("true"))
            ticker = vm.spawn("while true; do echo tick; sleep 0.01; done")
            busy += timed(args.runs // 3, lambda: vm.run("true"))
            ticker.kill()
            ticker.wait(10)
    first = statistics.median(f for f, _ in firsts)
    total = statistics.median(t for _, t in firsts)
    print(f"run('true') plain {plain * 1000:.1f} ms, on_output {streamed * 1000:.1f} ms "
          f"(x{streamed / plain:.2f}), spawn+wait {spawned * 1000:.1f} ms (x{spawned / plain:.2f})")
    print(f"`echo x; sleep 1`: first chunk after {first * 1000:.0f} ms, run returned after {total * 1000:.0f} ms")
    print(f"{args.mib} MiB of output: plain {bulk_plain:.2f} s ({args.mib / bulk_plain:.0f} MiB/s), "
          f"streamed {bulk_stream:.2f} s ({args.mib / bulk_stream:.0f} MiB/s), x{bulk_stream / bulk_plain:.2f}")
    print(f"run('true') with a spawn printing every 10 ms: {statistics.median(busy) * 1000:.1f} ms, idle "
          f"{statistics.median(idle) * 1000:.1f} ms (x{statistics.median(busy) / statistics.median(idle):.2f})")
    if args.compare_with:
        pairs = [(child_median(args.compare_with, args.runs), child_median(here, args.runs))
                 for _ in range(args.rounds)]
        for other, this in pairs:
            print(f"run('true') {args.compare_with}: {other * 1000:.1f} ms, this checkout: {this * 1000:.1f} ms "
                  f"(x{this / other:.2f})")


if __name__ == "__main__":
    main()
