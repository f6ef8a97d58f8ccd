"""What a network costs, measured side by side in one run.

Prints, for VMs started as snapshot clones (pool off, so each start is paid in full):
- start → first ``run("true")`` answered, ``network="none"`` vs ``"isolated"`` (median of N);
- the host-side network set-up alone (slot, namespace on first use, TAP, nft elements);
- a request through ``vm.forward()`` to a guest HTTP server (median of 20), and an SSH
  ``exec_command("true")`` on an open client (median of 10).

    python benchmarks/network.py [N]
"""

from __future__ import annotations

import statistics
import sys
import time
import urllib.request

from pytest_smolvm import SmolVM, VMConfig
from pytest_smolvm.network.hub import attach
from pytest_smolvm.runs import current_run_id


def start_to_first_command(cfg: VMConfig) -> float:
    t0 = time.perf_counter()
    with SmolVM(cfg) as vm:
        vm.run("true")
        return time.perf_counter() - t0


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    base = VMConfig()
    for cfg in (base, base.replace(network="isolated")):  # build both snapshots first
        start_to_first_command(cfg)
    none, isolated = [], []
    for _ in range(n):  # interleaved, so host noise hits both alike
        none.append(start_to_first_command(base))
        isolated.append(start_to_first_command(base.replace(network="isolated")))
    setup = []
    for i in range(n):
        t0 = time.perf_counter()
        net = attach(f"bench{i}", current_run_id(), "isolated", (), None)
        setup.append(time.perf_counter() - t0)
        net.close()
    with SmolVM(base.replace(network="isolated")) as vm:
        vm.run("cd /tmp && (python3 -m http.server 8000 >/dev/null 2>&1 &)", check=True)
        vm.run("for i in $(seq 200); do python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", 8000))' "
               "2>/dev/null && exit 0; sleep 0.1; done; exit 1", check=True, timeout=60)
        port = vm.forward(8000)
        fwd = []
        for _ in range(20):
            t0 = time.perf_counter()
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as resp:
                resp.read()
            fwd.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        client = vm.ssh()
        ssh_first = time.perf_counter() - t0
        ssh_exec = []
        for _ in range(10):
            t0 = time.perf_counter()
            _, out, _ = client.exec_command("true")
            out.channel.recv_exit_status()
            ssh_exec.append(time.perf_counter() - t0)
    med = statistics.median
    print(f"clone start -> first command, network=none:     median {med(none) * 1000:.0f} ms "
          f"({', '.join(f'{x * 1000:.0f}' for x in none)})")
    print(f"clone start -> first command, network=isolated: median {med(isolated) * 1000:.0f} ms "
          f"({', '.join(f'{x * 1000:.0f}' for x in isolated)})")
    print(f"ratio isolated/none: {med(isolated) / med(none):.2f}")
    print(f"host-side network set-up (slot, namespace, TAP, rules, teardown excluded): "
          f"median {med(setup) * 1000:.1f} ms")
    print(f"HTTP GET through vm.forward(): median {med(fwd) * 1000:.1f} ms")
    print(f"first vm.ssh() (keys, sshd start, key exchange): {ssh_first * 1000:.0f} ms; "
          f"exec_command('true') on it: median {med(ssh_exec) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
