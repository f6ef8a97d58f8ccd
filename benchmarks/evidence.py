#!/usr/bin/env python3
"""What evidence costs a passing test's teardown: the default (``--smolvm-evidence=failed``
reads the host-measured figures just before the VM closes) against ``none`` (close only),
side by side on alternating VMs of one run; and, for information, ``all`` (the guest part too).

    python benchmarks/evidence.py [--rounds 6] [--network isolated]

``--network isolated`` measures networked VMs: their host part also reads the TAP's counters
and the policy's ledger (netlink and two ``nft`` calls in the run's namespace).

Prints the median teardown time of each mode and the ratio failed/none (issue 25: <= 1.10).
"""

from __future__ import annotations

import argparse
import statistics
import time

from pytest_smolvm import SmolVM, VMConfig


def teardown(mode: str, network: str) -> float:
    vm = SmolVM(VMConfig(memory_mib=256, network=network)).start()
    try:
        vm.run("echo work > /root/f && head -c 1000000 /dev/zero > /root/g", check=True)
        t0 = time.monotonic()
        if mode != "none":
            vm.evidence(guest=mode == "all")
        vm.close()
        return time.monotonic() - t0
    finally:
        vm.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--network", default="none", choices=("none", "isolated"))
    args = ap.parse_args()
    times: dict[str, list[float]] = {"none": [], "failed": [], "all": []}
    teardown("none", args.network)  # warm the snapshot and page cache before measuring
    for i in range(args.rounds):
        order = ["none", "failed", "all"] if i % 2 == 0 else ["all", "failed", "none"]
        for mode in order:
            times[mode].append(teardown(mode, args.network))
    med = {mode: statistics.median(ts) for mode, ts in times.items()}
    for mode, m in med.items():
        print(f"{mode:>6}: median teardown {m * 1000:7.1f} ms over {len(times[mode])} VMs")
    print(f"ratio failed/none: {med['failed'] / med['none']:.3f}  (all/none: {med['all'] / med['none']:.2f})")


if __name__ == "__main__":
    main()
