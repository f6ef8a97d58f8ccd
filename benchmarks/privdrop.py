#!/usr/bin/env python3
"""What QEMU dropping root costs: clone start -> first run("true"), with and without the drop,
interleaved in one run (medians). Run as root (without root there is nothing to drop).

    python benchmarks/privdrop.py [--rounds 10]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from pytest_smolvm import SmolVM, VMConfig
from pytest_smolvm.drivers.qemu import QemuDriver


def clone_to_first_command(driver: QemuDriver, cfg: VMConfig) -> float:
    t0 = time.perf_counter()
    with SmolVM(cfg, driver=driver) as vm:
        vm.run("true", timeout=60)
        took = time.perf_counter() - t0
        assert vm.boot_mode == "snapshot", vm.boot_mode
        dropped = Path(f"/proc/{vm.pid}/status").read_text().split("Uid:")[1].split()[0] != "0"
        assert dropped == driver.drop_privileges, (dropped, driver.drop_privileges)
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: QEMU drops privileges only when started as root")
    cfg = VMConfig(memory_mib=256)
    drivers = {"drop": QemuDriver(), "root": QemuDriver()}
    drivers["root"].drop_privileges = False
    for driver in drivers.values():  # each argv has its own snapshot: build both first
        clone_to_first_command(driver, cfg)
    times: dict[str, list[float]] = {name: [] for name in drivers}
    for _ in range(args.rounds):
        for name, driver in drivers.items():
            times[name].append(clone_to_first_command(driver, cfg))
    for name, ts in times.items():
        print(f"{name:5} clone -> first command: median {statistics.median(ts) * 1000:.0f} ms "
              f"(min {min(ts) * 1000:.0f}, max {max(ts) * 1000:.0f}, n={len(ts)})")
    print(f"drop/root ratio of medians: {statistics.median(times['drop']) / statistics.median(times['root']):.2f}")


if __name__ == "__main__":
    main()
