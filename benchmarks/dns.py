"""What names cost: the run's resolver, and a name allowlist on connection set-up.

Builds tests/nettopo.py's test "internet" (namespaces made here, removed at the end) with
tests/dnszone.py's authoritative zone for ``pkgs.test`` and a TCP echo server, so nothing
leaves namespaces this script makes. Prints:

- resolver alone (host side, no VM): first lookup (upstream round trip + nft element) vs
  cached lookup of a name, median over N distinct names;
- in a guest: ``getaddrinfo`` of a new name vs the same name again (through the guest's libc
  and the resolver), median over N;
- connection set-up in a guest: connect to a literal address allowed by CIDR vs resolve +
  connect to a name allowed by name (the first time, and again), median over N.

    python benchmarks/dns.py [N]
"""

from __future__ import annotations

import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from dnslib import DNSRecord
from dnszone import Echo, Zone
from nettopo import Internet

from pytest_smolvm import SmolVM, VMConfig
from pytest_smolvm.network import netns, policy
from pytest_smolvm.network.addressing import DEFAULT_BASE
from pytest_smolvm.network.dns import Mode, NamePolicy
from pytest_smolvm.network.resolver import VMResolver

ZONE_ADDR, PKGS_ADDR = "192.0.2.53", "192.0.2.80"
GATEWAY, GUEST = "10.213.251.1", "10.213.251.2"

GUEST_TIMING = textwrap.dedent("""
    import socket, sys, time
    mode, n, prefix = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    out = []
    for i in range(n):
        name = "%s%d.pkgs.test" % (prefix, i)
        t0 = time.perf_counter()
        if mode == "lookup":
            socket.getaddrinfo(name, 7, socket.AF_INET)
            t1 = time.perf_counter()
            socket.getaddrinfo(name, 7, socket.AF_INET)
            out.append("%f %f" % (t1 - t0, time.perf_counter() - t1))
        elif mode == "literal":
            socket.create_connection(("PKGS_ADDR", 7), timeout=10).close()
            out.append("%f" % (time.perf_counter() - t0))
        else:
            socket.create_connection((name, 7), timeout=10).close()
            t1 = time.perf_counter()
            socket.create_connection((name, 7), timeout=10).close()
            out.append("%f %f" % (t1 - t0, time.perf_counter() - t1))
    print("\\n".join(out))
""").replace("PKGS_ADDR", PKGS_ADDR)


def ms(values: list[float]) -> str:
    low, high = min(values) * 1000, max(values) * 1000
    return f"median {statistics.median(values) * 1000:.2f} ms (min {low:.2f}, max {high:.2f})"


def resolver_alone(zone: Zone, uplink: str, n: int) -> tuple[list[float], list[float]]:
    ns = f"svb{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        for addr in (GATEWAY, GUEST):
            subprocess.run(["ip", "-n", ns, "addr", "add", f"{addr}/32", "dev", "lo"], check=True)
        netns.run(ns, ["nft", "-f", "-"], input=policy.run_ruleset(DEFAULT_BASE))

        def allow(addresses: dict[str, int]) -> None:  # the real thing: an nft element per answer
            netns.run(ns, ["nft", "-f", "-"], input=policy.dns_allow_elements("svbench", addresses))

        r = VMResolver("bench", ns, uplink, GATEWAY, GUEST, NamePolicy(Mode.NAMES, ("*.pkgs.test",)),
                       (zone.upstream,), allow)
        try:
            with netns.entered(ns):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((GUEST, 0))
            s.settimeout(5)
            first, cached = [], []
            for i in range(n):
                for into in (first, cached):
                    q = DNSRecord.question(f"r{i}.pkgs.test")
                    t0 = time.perf_counter()
                    s.sendto(q.pack(), (GATEWAY, 53))
                    s.recv(4096)
                    into.append(time.perf_counter() - t0)
                time.sleep(1 / 40)  # under the per-VM rate
            s.close()
        finally:
            r.close()
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    return first, cached


def guest_numbers(net: Internet, zone: Zone, n: int) -> dict[str, list[float]]:
    base = VMConfig(network="nat", uplink=net.uplink, dns_upstream=(zone.upstream,))
    out: dict[str, list[float]] = {}
    with SmolVM(base.replace(allow=("*.pkgs.test",))) as vm:
        rows = [line.split() for line in vm.run(["python3", "-c", GUEST_TIMING, "lookup", str(n), "n"],
                                                timeout=300, check=True).stdout.splitlines()]
        out["lookup first"], out["lookup cached"] = [float(a) for a, _ in rows], [float(b) for _, b in rows]
    with SmolVM(base.replace(allow=(f"{PKGS_ADDR}/32",))) as vm:
        out["connect literal (CIDR allow)"] = [float(x) for x in vm.run(
            ["python3", "-c", GUEST_TIMING, "literal", str(n), "-"], timeout=300, check=True).stdout.split()]
    with SmolVM(base.replace(allow=("*.pkgs.test",))) as vm:
        rows = [line.split() for line in vm.run(["python3", "-c", GUEST_TIMING, "name", str(n), "m"],
                                                timeout=300, check=True).stdout.splitlines()]
        out["resolve+connect, new name (name allow)"] = [float(a) for a, _ in rows]
        out["resolve+connect, cached name (name allow)"] = [float(b) for _, b in rows]
    return out


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    with tempfile.TemporaryDirectory() as tmp:
        net = Internet.create(Path(tmp))
        zone = echo = None
        try:
            for addr in (ZONE_ADDR, PKGS_ADDR):
                subprocess.run(["ip", "-n", net.inet_ns, "addr", "add", f"{addr}/32", "dev", "lo"], check=True)
            records = {f"{p}{i}.pkgs.test": PKGS_ADDR for i in range(n) for p in ("r", "n", "m")}
            zone = Zone(net.inet_ns, ZONE_ADDR, records)
            zone.wait_serving()
            echo = Echo(net.inet_ns, PKGS_ADDR)
            first, cached = resolver_alone(zone, net.uplink, n)
            print(f"resolver alone, first lookup (upstream + allow): {ms(first)}")
            print(f"resolver alone, cached lookup:                   {ms(cached)}")
            for what, values in guest_numbers(net, zone, n).items():
                print(f"in the guest, {what}: {ms(values)}")
        finally:
            if echo is not None:
                echo.close()
            if zone is not None:
                zone.close()
            net.destroy()


if __name__ == "__main__":
    main()
