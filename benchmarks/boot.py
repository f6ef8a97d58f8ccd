#!/usr/bin/env python3
"""Cold boot -> first command, warm run("true") round trip, and its ratio to a host
subprocess, all measured side by side in one run (cold-booted VMs, no snapshot; see
benchmarks/clone.py for snapshot clones).

    python benchmarks/boot.py [--boots 5] [--runs 50] [--accel auto]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time

from pytest_smolvm import SmolVM, VMConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--boots", type=int, default=5)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--accel", default="auto")
    args = ap.parse_args()
    # Cold boot, no snapshot: this measures booting; benchmarks/clone.py measures clones.
    cfg = VMConfig(accel=args.accel, snapshot=False)

    boots = []
    for _ in range(args.boots):
        t0 = time.perf_counter()
        with SmolVM(cfg) as vm:
            vm.run("true", check=True)
            boots.append(time.perf_counter() - t0)
            accel = vm.accel
    with SmolVM(cfg) as vm:
        for _ in range(5):
            vm.run("true")
        rtt = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            vm.run("true")
            rtt.append(time.perf_counter() - t0)
    host = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        subprocess.run(["true"], check=True)
        host.append(time.perf_counter() - t0)

    boot_med, rtt_med, host_med = (statistics.median(x) for x in (boots, rtt, host))
    print(f"accelerator: {accel.name if accel else '?'} ({accel.reason if accel else ''})")
    print(f"cold boot -> first command: median {boot_med:.2f} s of {len(boots)} "
          f"(min {min(boots):.2f}, max {max(boots):.2f})")
    print(f"warm run('true') round trip: median {rtt_med * 1000:.1f} ms of {len(rtt)} "
          f"(p90 {sorted(rtt)[int(len(rtt) * 0.9)] * 1000:.1f} ms)")
    print(f"host subprocess.run(['true']): median {host_med * 1000:.2f} ms of {len(host)}")
    print(f"ratio run('true') / host subprocess: {rtt_med / host_med:.1f}x")


if __name__ == "__main__":
    main()
