"""What a secret costs per request: HTTPS through the run's secrets proxy vs direct.

Builds tests/tlsworld.py's test internet (namespaces made here, removed at the end): one
HTTPS server answering for ``api.example.test`` (a secret's host: the guest's HTTPS to it is
redirected to the proxy, which terminates TLS, verifies the real host and adds the value)
and ``direct.example.test`` (the same certificate and server code at another address,
allowed by name but no secret's host: the guest talks to it directly). One VM, same run, interleaved rounds. Prints the
median per request of:

- a new connection per request (TCP + TLS handshake + one GET), as ``urllib`` does;
- requests on one kept-alive connection (``http.client``), after its handshake.

    python benchmarks/secret_proxy.py [N]
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's directory comes first on sys.path, and its name would shadow
# the standard library's ``secrets`` for everything imported after it.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import os  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import textwrap  # noqa: E402

from tlsworld import TLSWorld  # noqa: E402

from pytest_smolvm import Secret, SmolVM, VMConfig  # noqa: E402

TIMING = textwrap.dedent("""
    import http.client, os, ssl, sys, time
    host, n, cafile = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    ctx = ssl.create_default_context(cafile=cafile)
    auth = {"Authorization": "Bearer " + os.environ["API_KEY"]}
    fresh, kept = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        c = http.client.HTTPSConnection(host, context=ctx, timeout=30)
        c.request("GET", "/", headers=auth)
        assert c.getresponse().read() == b"ok"
        c.close()
        fresh.append(time.perf_counter() - t0)
    c = http.client.HTTPSConnection(host, context=ctx, timeout=30)
    c.request("GET", "/", headers=auth); c.getresponse().read()
    for _ in range(n):
        t0 = time.perf_counter()
        c.request("GET", "/", headers=auth)
        assert c.getresponse().read() == b"ok"
        kept.append(time.perf_counter() - t0)
    print(" ".join("%f" % x for x in fresh)); print(" ".join("%f" % x for x in kept))
""")


def ms(values: list[float]) -> str:
    return (f"median {statistics.median(values) * 1000:.1f} ms "
            f"(min {min(values) * 1000:.1f}, max {max(values) * 1000:.1f})")


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    with tempfile.TemporaryDirectory() as tmp, TLSWorld.create(Path(tmp)) as world:
        os.environ["SMOLVM_UPSTREAM_CA_BUNDLE"] = str(world.root / "ca.pem")
        config = VMConfig(network="nat", allow=("api.example.test", "direct.example.test"), uplink=world.net.uplink,
                          dns_upstream=(world.zone.upstream,), memory_mib=256,
                          secrets={"API_KEY": Secret("sk-bench-value", hosts=["api.example.test"])})
        results: dict[str, list[float]] = {}
        with SmolVM(config) as vm:
            vm.put((world.root / "ca.pem").read_bytes(), "/root/test-ca.pem")
            bundle = "/etc/ssl/certs/ca-certificates.crt"  # holds the run CA (setup appended it)
            for _ in range(3):  # interleaved rounds: load on this shared machine hits both alike
                for label, host, cafile in (("proxied", "api.example.test", bundle),
                                            ("direct", "direct.example.test", "/root/test-ca.pem")):
                    fresh, kept = vm.run(["python3", "-c", TIMING, host, str(n), cafile], timeout=600,
                                         check=True).stdout.splitlines()
                    results.setdefault(f"{label}, new connection per request", []).extend(map(float, fresh.split()))
                    results.setdefault(f"{label}, kept-alive connection", []).extend(map(float, kept.split()))
            print(f"proxy counters: {vm.network.secrets_proxy}")
        for what, values in sorted(results.items()):
            print(f"{what}: {ms(values)}")
        assert "api.example.test Bearer sk-bench-value" in (world.root / "api.log").read_text()
        assert "direct.example.test Bearer smolvm-secret-" in (world.root / "direct.log").read_text()


if __name__ == "__main__":
    main()
