"""Secrets that never enter the guest (``secrets=``, the run's egress proxy), in real microVMs.

"The real hosts" are tests/tlsworld.py's HTTPS servers in tests/nettopo.py's test internet,
with certificates of their own test CA, which the proxy trusts through
``SMOLVM_UPSTREAM_CA_BUNDLE``. No packet leaves namespaces this module makes.
"""

from __future__ import annotations

import json
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from dnszone import Zone
from helpers import REAL_CACHE
from nettopo import Internet
from tlsworld import HOSTS, TLSWorld

from pytest_smolvm import Secret, SmolVM
from pytest_smolvm.paths import runtime_dir
from pytest_smolvm.runs import current_run_id

Factory = Callable[..., SmolVM]
VALUE = "sk-live-" + "7f3a9c1e5b2d4860" * 2  # what must never reach the guest

#: GET ``argv[1]`` with ``Authorization: Bearer $API_KEY`` and the headers of JSON ``argv[2]``;
#: prints the body or ERR.
CALL = textwrap.dedent("""
    import json, os, sys, urllib.request
    extra = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    req = urllib.request.Request(sys.argv[1], headers={"Authorization": "Bearer " + os.environ["API_KEY"], **extra})
    try:
        print(urllib.request.urlopen(req, timeout=30).read().decode())
    except Exception as exc:
        print("ERR", type(exc).__name__, exc)
""")

#: Opens ``argv[2]`` TCP connections to ``argv[1]``:443 as fast as it can, holds them, prints
#: how many connected, then how many of them the proxy closed without a word.
FLOOD = textwrap.dedent("""
    import socket, sys
    socks, ok = [], 0
    for _ in range(int(sys.argv[2])):
        try:
            socks.append(socket.create_connection((sys.argv[1], 443), timeout=5)); ok += 1
        except OSError:
            pass
    print(ok)
""")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Internet, Zone, Path]]:
    with TLSWorld.create(tmp_path_factory.mktemp("secrets")) as w, pytest.MonkeyPatch.context() as mp:
        mp.setenv("SMOLVM_UPSTREAM_CA_BUNDLE", str(w.root / "ca.pem"))
        yield w.net, w.zone, w.root


def _orphan_proxy_threads() -> list[str]:
    """Proxy threads whose VM is gone (its workdir removed); the warm pool's spares live on."""
    run = runtime_dir() / current_run_id()
    alive = {p.name for p in run.iterdir()} if run.is_dir() else set()
    return [t.name for t in threading.enumerate()
            if t.name.startswith("smolvm-proxy-") and t.name.removeprefix("smolvm-proxy-").split("-conn")[0]
            not in alive]


@pytest.fixture(autouse=True)
def no_proxy_left() -> Iterator[None]:
    """Runs its teardown after smolvm_factory's: the proxy threads of this test's VMs end."""
    yield
    deadline = time.monotonic() + 15
    while left := _orphan_proxy_threads():
        assert time.monotonic() < deadline, f"proxy threads left: {left}"
        time.sleep(0.2)


def _vm(factory: Factory, net: Internet, zone: Zone) -> SmolVM:
    return factory(network="nat", allow=HOSTS, uplink=net.uplink, dns_upstream=[zone.upstream],
                   secrets={"API_KEY": Secret(VALUE, hosts=["api.example.test", "bad.example.test"])})


def call(vm: SmolVM, url: str, **headers: str) -> str:
    return vm.run(["python3", "-c", CALL, url, json.dumps(headers)], timeout=90).stdout.strip()


def test_the_value_reaches_its_host_only_and_never_the_guest(smolvm_factory: Factory,
                                                             world: tuple[Internet, Zone, Path]) -> None:
    net, zone, root = world
    vm = _vm(smolvm_factory, net, zone)
    placeholder = vm.run("printenv API_KEY").stdout.strip()
    assert placeholder.startswith("smolvm-secret-") and VALUE not in placeholder
    assert call(vm, "https://api.example.test/v1") == "ok"
    assert f"api.example.test Bearer {VALUE}" in (root / "api.log").read_text().splitlines()
    # The placeholder bound for another host (allowed by name, same address): refused, recorded.
    out = call(vm, "https://other.test/v1")
    assert out.startswith("ERR HTTPError") and "403" in out, out
    assert "secret API_KEY sent to other.test: refused" in vm.network.secret_events
    assert not [line for line in (root / "api.log").read_text().splitlines() if line.startswith("other.test")]
    # Host must be the TLS name; a request head over 16 KiB is refused; neither reaches the host.
    out = call(vm, "https://api.example.test/v1", Host="other.test")
    assert "421" in out, out
    assert "secret API_KEY sent to Host 'other.test' over TLS to api.example.test: refused" in vm.network.secret_events
    assert "431" in call(vm, "https://api.example.test/v1", X_Big="a" * 20000)
    assert len((root / "api.log").read_text().splitlines()) == 1
    # A host whose certificate does not verify: the guest's handshake fails, nothing is sent.
    out = call(vm, "https://bad.example.test/v1")
    assert out.startswith("ERR") and "SSL" in out, out
    assert (root / "bad.log").read_text() == ""
    assert any(e.startswith("bad.example.test at") and "certificate not verified" in e
               for e in vm.network.secret_events), vm.network.secret_events
    # Nowhere in the guest: env and every process's /proc environ and cmdline (read out and
    # searched here: the value is never sent in, not even to look for it), its disk (host-side,
    # after sync) and its RAM (a checkpoint's files, host-side).
    seen = vm.run('env; cat /proc/[0-9]*/environ /proc/[0-9]*/cmdline 2>/dev/null; echo "$API_KEY" > /root/ph; sync',
                  max_output=1 << 20)
    assert placeholder in seen.stdout and VALUE not in seen.stdout
    assert vm.disk_path is not None
    disk = vm.disk_path.read_bytes()
    assert placeholder.encode() in disk and VALUE.encode() not in disk  # the search finds what is there
    cp = vm.checkpoint()
    try:
        files = [p for p in cp.path.rglob("*") if p.is_file()]
        assert files
        saved = b"".join(p.read_bytes() for p in files)
        assert placeholder.encode() in saved and VALUE.encode() not in saved
        clone = smolvm_factory(checkpoint=cp, secrets={"API_KEY": Secret(VALUE, hosts=["api.example.test"])},
                               network="nat", allow=HOSTS, uplink=net.uplink, dns_upstream=[zone.upstream])
        assert clone.run("printenv API_KEY").stdout.strip() not in ("", placeholder)  # its own placeholder
        assert call(clone, "https://api.example.test/v2") == "ok"
    finally:
        cp.remove()
    assert VALUE not in repr(vm.config) and VALUE not in repr(vm.transcript)


def test_a_connection_flood_from_one_vm_leaves_the_proxy_serving_another(smolvm_factory: Factory,
                                                                         world: tuple[Internet, Zone, Path]) -> None:
    net, zone, root = world
    flooder, other = _vm(smolvm_factory, net, zone), _vm(smolvm_factory, net, zone)
    assert call(flooder, "https://api.example.test/warm") == "ok"  # resolved: its HTTPS goes to its proxy
    flood = flooder.spawn(["python3", "-c", FLOOD, "api.example.test", "1000"])
    t0 = time.monotonic()
    while flooder.network.secrets_proxy.get("conns_refused", 0) < 100 and time.monotonic() - t0 < 60:
        time.sleep(0.5)
    assert flooder.network.secrets_proxy["conns_refused"] >= 100
    assert call(other, "https://api.example.test/other") == "ok"
    assert f"api.example.test Bearer {VALUE}" in (root / "api.log").read_text()
    flood.kill()


def test_a_failed_test_report_and_junit_never_hold_the_value(pytester: pytest.Pytester,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             world: tuple[Internet, Zone, Path]) -> None:
    net, zone, _ = world
    monkeypatch.setenv("SMOLVM_CACHE_DIR", str(REAL_CACHE))
    pytester.makepyfile(f"""
        import pytest
        from pytest_smolvm import Secret

        KEY = Secret({VALUE!r}, hosts=["api.example.test"])

        @pytest.mark.smolvm(network="nat", allow={HOSTS!r}, uplink={net.uplink!r},
                            dns_upstream=[{zone.upstream!r}], secrets={{"API_KEY": KEY}})
        def test_fails(smolvm):
            seen = smolvm.run("printenv API_KEY").stdout
            print("guest sees", seen, smolvm.config)
            assert smolvm.config.secrets == {{"API_KEY": seen}}
    """)
    xml = pytester.path / "junit.xml"
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-l", "-vv", f"--junitxml={xml}")
    result.assert_outcomes(failed=1)
    out = result.stdout.str() + result.stderr.str()
    assert "guest sees smolvm-secret-" in out and "secrets proxy: 0 request(s) forwarded" in out
    assert VALUE not in out and VALUE not in xml.read_text()
