#!/usr/bin/env python3
"""Directory transfer: vm.put(Path(dir), dest) and vm.get_dir(src, local) of one tree, next
to a file-by-file put() of the same tree, in one VM.

    python benchmarks/transfer.py [--files 1000] [--kib 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from pytest_smolvm import SmolVM, VMConfig


def make_tree(root: Path, files: int, kib: int) -> None:
    for i in range(files):
        d = root / f"d{i // 100}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}").write_bytes(os.urandom(kib * 1024))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--kib", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, SmolVM(VMConfig(memory_mib=512)) as vm:
        src = Path(tmp) / "src"
        make_tree(src, args.files, args.kib)
        puts, gets, singles = [], [], []
        for n in range(args.rounds):
            t0 = time.perf_counter()
            vm.put(src, f"/root/tree{n}")
            puts.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            vm.get_dir(f"/root/tree{n}", Path(tmp) / f"back{n}")
            gets.append(time.perf_counter() - t0)
        sample = sorted(src.rglob("f*"))[:50]
        t0 = time.perf_counter()
        for f in sample:
            vm.put(f, f"/root/single/{f.parent.name}/{f.name}")
        singles.append((time.perf_counter() - t0) / len(sample))
    mib = args.files * args.kib / 1024
    print(f"tree: {args.files} files, {mib:.1f} MiB ({vm.accel.name if vm.accel else '?'})")
    print(f"put(dir):  median {statistics.median(puts):.2f} s ({mib / statistics.median(puts):.1f} MiB/s)")
    print(f"get_dir:   median {statistics.median(gets):.2f} s ({mib / statistics.median(gets):.1f} MiB/s)")
    print(f"file by file put(): {singles[0] * 1000:.0f} ms a file -> {singles[0] * args.files:.1f} s "
          f"for the tree")


if __name__ == "__main__":
    main()
