"""Networking with root vs without, measured side by side in one run.

Prints, for each mode (root: ``ip netns`` + veth + masquerade; rootless: a user namespace's
holder + pasta, forced with ``SMOLVM_ROOTLESS_NET=1``, the code path an ordinary user takes):
- clone start -> first ``run("true")`` answered, ``network="nat", allow=[...]`` (median of N,
  the modes interleaved so host noise hits both alike; pool off, the namespace made and
  removed each time, as the first VM of a run pays);
- the same with the run namespace already up (another VM of the run holds it: what every VM
  but a run's first pays);
- a 100 MB download by the guest (``urllib``) from an HTTP server in a test namespace (best of 2).

Run as root (it builds the test internet of ``tests/nettopo.py`` and runs itself inside its
"host" namespace, so nothing leaves the namespaces it made):

    PYTHONPATH=.:tests python benchmarks/rootless.py [N]
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pytest_smolvm import SmolVM, VMConfig
from pytest_smolvm.network.userns import FORCE_ENV

SIZE = 100 * 1024 * 1024
ALLOWED_HOST = "198.51.100.10"
DOWNLOAD = ("import time, urllib.request as u; t = time.perf_counter(); "
            f"r = u.urlopen('http://{ALLOWED_HOST}/big', timeout=600); "
            "n = 0\nwhile True:\n b = r.read(1 << 20)\n if not b: break\n n += len(b)\n"
            "print(n, time.perf_counter() - t)")
MODES = ("root", "rootless")


def _mode(mode: str) -> None:
    if mode == "rootless":
        os.environ[FORCE_ENV] = "1"
    else:
        os.environ.pop(FORCE_ENV, None)


def _first_command(cfg: VMConfig) -> float:
    t0 = time.perf_counter()
    with SmolVM(cfg) as vm:
        vm.run("true")
        return time.perf_counter() - t0


def _download(cfg: VMConfig) -> float:
    with SmolVM(cfg) as vm:
        out = vm.run(["python3", "-c", DOWNLOAD], timeout=900, check=True).stdout.split()
        assert int(out[0]) == SIZE, out
        return SIZE / float(out[1]) / 1e6


def inside(n: int) -> None:
    cfg = VMConfig(network="nat", allow=("198.51.100.0/24",), egress_kib_per_s=1 << 20)
    for mode in MODES:  # the snapshot, and each mode's first use
        _mode(mode)
        _first_command(cfg)
    starts: dict[str, list[float]] = {m: [] for m in MODES}
    for _ in range(n):
        for mode in MODES:
            _mode(mode)
            starts[mode].append(_first_command(cfg))
    warm: dict[str, list[float]] = {}
    for mode in MODES:  # one mode at a time: both modes' namespaces have the run's one name
        _mode(mode)
        with SmolVM(cfg) as anchor:
            anchor.run("true")
            warm[mode] = [_first_command(cfg) for _ in range(n)]
    rate: dict[str, list[float]] = {m: [] for m in MODES}
    for _ in range(2):
        for mode in MODES:
            _mode(mode)
            rate[mode].append(_download(cfg))
    med = statistics.median
    for mode in MODES:
        print(f"{mode:8} clone start -> first command, nat+allow: median {med(starts[mode]) * 1000:.0f} ms "
              f"({', '.join(f'{x * 1000:.0f}' for x in starts[mode])}); namespace already up: median "
              f"{med(warm[mode]) * 1000:.0f} ms; 100 MB download: {max(rate[mode]):.1f} MB/s "
              f"({', '.join(f'{x:.1f}' for x in rate[mode])})")
    print(f"rootless/root start ratio: {med(starts['rootless']) / med(starts['root']):.2f} (first VM), "
          f"{med(warm['rootless']) / med(warm['root']):.2f} (namespace up)")


def main() -> None:
    if sys.argv[1:2] == ["--inside"]:
        inside(int(sys.argv[2]))
        return
    from nettopo import PAGES, Internet

    n = sys.argv[1] if len(sys.argv) > 1 else "5"
    root = Path(tempfile.mkdtemp(prefix="smolvm-bench-"))
    net = Internet.create(root)
    try:
        with open(root / ALLOWED_HOST / "big", "wb") as f:
            f.truncate(SIZE)
        assert ALLOWED_HOST in PAGES
        subprocess.run(["ip", "netns", "exec", net.host_ns, sys.executable, "-P", __file__, "--inside", n], check=True)
    finally:
        net.destroy()


if __name__ == "__main__":
    main()
