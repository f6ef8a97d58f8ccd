#!/usr/bin/env python3
"""Host-side cost of the control channel: the multiplexing channel (reader thread) vs the
previous one (one call at a time, the caller reads), interleaved in one run against two
copies of the real static agent on the host (``--serve-fd``, commands run on the host).

    python benchmarks/channel_ab.py [--calls 500] [--old-ref main]

Each round times ``ping`` and ``exec ["true"]`` round trips through each channel in turn;
medians and their ratios are printed last.
"""

from __future__ import annotations

import argparse
import importlib.util
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from pytest_smolvm.guest import channel as new_channel
from pytest_smolvm.images.agentbin import agent_binary

ROOT = Path(__file__).resolve().parents[1]


def old_channel(ref: str) -> ModuleType:
    """``pytest_smolvm/guest/channel.py`` as of git ``ref``, imported under another name."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{ref}:pytest_smolvm/guest/channel.py"],
                            capture_output=True, text=True, check=True).stdout
    spec = importlib.util.spec_from_loader("pytest_smolvm.guest._old_channel", loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "pytest_smolvm.guest"
    sys.modules[spec.name] = module
    exec(compile(source, f"{ref}:channel.py", "exec"), module.__dict__)
    return module


def agent() -> tuple[socket.socket, subprocess.Popen[bytes]]:
    host, guest = socket.socketpair()
    proc = subprocess.Popen([str(agent_binary()), "--serve-fd", str(guest.fileno())], pass_fds=[guest.fileno()],
                            stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    guest.close()
    return host, proc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--calls", type=int, default=500)
    ap.add_argument("--old-ref", default="main")
    args = ap.parse_args()
    old = old_channel(args.old_ref)
    (s1, p1), (s2, p2) = agent(), agent()
    chans: dict[str, Any] = {"old": old.Channel(s1, lambda: True, 1 << 20),
                             "new": new_channel.Channel(s2, lambda: True, 1 << 20)}
    reqs = {"ping": {"op": "ping"}, "exec": {"op": "exec", "argv": ["true"], "timeout": 10.0, "max_output": 4096}}
    times: dict[tuple[str, str], list[float]] = {(c, r): [] for c in chans for r in reqs}
    for chan in chans.values():  # warm up
        for req in reqs.values():
            chan.call(req, timeout=10)
    for _ in range(args.calls):
        for rname, req in reqs.items():
            for cname, chan in chans.items():
                t0 = time.perf_counter()
                chan.call(req, timeout=10)
                times[(cname, rname)].append(time.perf_counter() - t0)
    for chan in chans.values():
        chan.close()
    for p in (p1, p2):
        p.wait(10)
    for rname in reqs:
        o, n = (statistics.median(times[(c, rname)]) for c in ("old", "new"))
        print(f"{rname:5s}: previous channel ({args.old_ref}) {o * 1e6:.0f} us, multiplexing channel "
              f"{n * 1e6:.0f} us (x{n / o:.2f}, +{(n - o) * 1e6:.0f} us)")


if __name__ == "__main__":
    main()
