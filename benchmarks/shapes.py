#!/usr/bin/env python3
"""Shape-aware grouping: a mixed-shape suite under ``-n 2 --dist loadgroup``, with and
without ``--smolvm-group-by-shape``, side by side in one run (rounds interleaved).

    python benchmarks/shapes.py [--shapes 4] [--per-shape 6] [--rounds 2] [--work 0.2]

The suite has ``--shapes`` VM shapes (memory, vCPUs, network) and ``--per-shape`` tests of
each, in interleaved order (test i has shape i mod shapes), as a suite whose modules each mix
shapes would be. Every test runs ``true`` in its fresh VM and then works ``--work`` seconds on
the host. A warm-up run builds each shape's golden snapshot first, so both sides clone. Reported
per side: wall time and the warm pool's hits (a test that found its VM already started) out of
the VMs started, from the plugin's per-host summary line.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = [
    {"memory_mib": 256},
    {"memory_mib": 384},
    {"vcpus": 2},
    {"network": "isolated"},
    {"memory_mib": 320, "vcpus": 2},
]
SUMMARY = re.compile(r"smolvm: host \S+ \([^)]*\): (\d+) VM\(s\), pool hits (\d+)/\d+")


def suite(shapes: int, per_shape: int, work: float) -> str:
    lines = ["import time, pytest", ""]
    for i in range(shapes * per_shape):
        shape = ", ".join(f"{k}={v!r}" for k, v in SHAPES[i % shapes].items())
        lines += [f"@pytest.mark.smolvm({shape})", f"def test_{i:03d}(smolvm):",
                  "    assert smolvm.run('true').ok", f"    time.sleep({work})", ""]
    return "\n".join(lines)


def run(cwd: Path, grouped: bool) -> tuple[float, int, int]:
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "xdist", "-p", "no:randomly", "-n", "2",
            "--dist", "loadgroup", "-p", "no:cacheprovider"]
    if grouped:
        argv.append("--smolvm-group-by-shape")
    t0 = time.monotonic()
    res = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=1800)
    wall = time.monotonic() - t0
    if res.returncode != 0:
        sys.exit(f"run failed ({'grouped' if grouped else 'ungrouped'}):\n{res.stdout[-3000:]}{res.stderr[-2000:]}")
    vms = hits = 0
    for m in SUMMARY.finditer(res.stdout):
        vms, hits = vms + int(m[1]), hits + int(m[2])
    return wall, vms, hits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", type=int, default=4, choices=range(1, len(SHAPES) + 1))
    ap.add_argument("--per-shape", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--work", type=float, default=0.2, help="seconds each test works on the host")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="smolvm-shapes-") as d:
        cwd = Path(d)
        (cwd / "test_shapes.py").write_text(suite(args.shapes, args.per_shape, args.work))
        os.environ.pop("PYTEST_ADDOPTS", None)
        print(f"{args.shapes} shapes x {args.per_shape} tests, -n 2 --dist loadgroup; warming up "
              f"(golden snapshots)...", flush=True)
        run(cwd, grouped=True)
        results: dict[bool, list[tuple[float, int, int]]] = {False: [], True: []}
        for r in range(args.rounds):
            for grouped in (False, True) if r % 2 == 0 else (True, False):
                wall, vms, hits = run(cwd, grouped)
                results[grouped].append((wall, vms, hits))
                print(f"  round {r + 1} {'grouped  ' if grouped else 'ungrouped'}: {wall:6.1f} s, "
                      f"pool hits {hits}/{vms}", flush=True)
    med = {g: statistics.median(w for w, _, _ in rs) for g, rs in results.items()}
    rate = {g: sum(h for _, _, h in rs) / max(1, sum(v for _, v, _ in rs)) for g, rs in results.items()}
    print(f"ungrouped: median wall {med[False]:.1f} s, pool hit rate {100 * rate[False]:.0f}%")
    print(f"grouped:   median wall {med[True]:.1f} s, pool hit rate {100 * rate[True]:.0f}%")
    print(f"grouped / ungrouped wall time: {med[True] / med[False]:.2f}")


if __name__ == "__main__":
    main()
