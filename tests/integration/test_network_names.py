"""Names in ``allow``, the run's resolver and live policy changes, in real microVMs.

"The internet" is tests/nettopo.py's pair of namespaces; inside its internet namespace this
module adds an authoritative DNS server for the made-up zones ``pkgs.test`` and
``evil.test`` (tests/dnszone.py, recording every question), an HTTP server and a TCP echo
server for pkgs.test. The run's resolver forwards there (``dns_upstream``, the VMConfig field
behind ``SMOLVM_DNS_UPSTREAM``). No packet leaves namespaces this module makes.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator

import pytest
from dnszone import Echo, Zone
from helpers import REAL_CACHE
from nettopo import ALLOWED_HOST, ALLOWED_NET, OTHER_HOST, SERVER, Internet

from pytest_smolvm import SmolVM

Factory = Callable[..., SmolVM]
ZONE_ADDR = "192.0.2.53"
PKGS_ADDR = "192.0.2.80"


@pytest.fixture(scope="module")
def internet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Internet, Zone]]:
    net = Internet.create(tmp_path_factory.mktemp("internet"))
    zone = echo = None
    try:
        for addr in (ZONE_ADDR, PKGS_ADDR):
            subprocess.run(["ip", "-n", net.inet_ns, "addr", "add", f"{addr}/32", "dev", "lo"], check=True)
        page = tmp_path_factory.mktemp("pkgs")
        (page / "index.html").write_text("pkgs-host")
        net.servers.append(subprocess.Popen(["ip", "netns", "exec", net.inet_ns, sys.executable, "-c", SERVER,
                                             PKGS_ADDR, str(page)], stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL))
        net.wait_listening(net.inet_ns, PKGS_ADDR)
        zone = Zone(net.inet_ns, ZONE_ADDR, {"pkgs.test": PKGS_ADDR, "evil.test": OTHER_HOST})
        zone.wait_serving()
        echo = Echo(net.inet_ns, PKGS_ADDR)
        yield net, zone
    finally:
        if echo is not None:
            echo.close()
        if zone is not None:
            zone.close()
        net.destroy()


LOOKUP = textwrap.dedent("""
    import socket, sys
    for name in sys.argv[1:]:
        try:
            print(name, "OK", sorted({a[4][0] for a in socket.getaddrinfo(name, 80, socket.AF_INET)}))
        except OSError as exc:
            print(name, "ERR", type(exc).__name__)
""")

GET = "import urllib.request, sys; print(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())"

#: A DNS question for ``argv[2]`` straight to ``argv[1]``:53 over UDP, then over TCP; prints
#: what came back for each ("none" when nothing did).
DIRECT = textwrap.dedent("""
    import socket, struct, sys
    server, name = sys.argv[1], sys.argv[2]
    q = struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
    q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\\0" + struct.pack("!HH", 1, 1)
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.settimeout(2)
    u.sendto(q, (server, 53))
    try:
        print("udp", len(u.recv(4096)))
    except OSError as exc:
        print("udp none", type(exc).__name__)
    try:
        t = socket.create_connection((server, 53), timeout=2)
        t.sendall(struct.pack("!H", len(q)) + q)
        print("tcp", len(t.recv(4096)))
    except OSError as exc:
        print("tcp none", type(exc).__name__)
""")

#: 10,000 questions for random labels under evil.test, sent as fast as the guest can.
FLOOD = textwrap.dedent("""
    import os, socket, struct, sys
    server = sys.argv[1]
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sent = 0
    for i in range(10000):
        label = os.urandom(20).hex()
        q = struct.pack("!HHHHHH", i & 0xffff, 0x0100, 1, 0, 0, 0)
        q += bytes([len(label)]) + label.encode() + b"\\x04evil\\x04test\\0" + struct.pack("!HH", 1, 1)
        try:
            s.sendto(q, (server, 53)); sent += 1
        except OSError:
            pass
    print(sent)
""")


def lookup(vm: SmolVM, *names: str) -> dict[str, str]:
    out = vm.run(["python3", "-c", LOOKUP, *names], timeout=60).stdout.splitlines()
    return {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in out}


def test_a_name_allowlist_resolves_its_names_and_nothing_else(smolvm_factory: Factory,
                                                                 internet: tuple[Internet, Zone]) -> None:
    net, zone = internet
    vm = smolvm_factory(network="nat", allow=["pkgs.test"], uplink=net.uplink, dns_upstream=[zone.upstream])
    assert vm.run("cat /etc/resolv.conf").stdout.splitlines()[0] == f"nameserver {vm.network.host_ip}"
    assert vm.run(["python3", "-c", GET, "http://pkgs.test/index.html"], timeout=60).stdout.strip() == "pkgs-host"
    assert PKGS_ADDR in vm.network.dns_allowed
    got = lookup(vm, "evil.test", "c2VjcmV0.evil.test", "pkgs.test.evil.test")
    assert all(v.startswith("ERR") for v in got.values()), got
    assert {"evil.test", "c2vjcmv0.evil.test", "pkgs.test.evil.test"} <= set(vm.network.denied_names)
    assert not [n for n in zone.asked() if "evil" in n]  # no query for a denied name reached the upstream
    # A literal address of evil.test: dropped and recorded.
    r = vm.run(["python3", "-c", GET, f"http://{OTHER_HOST}/index.html"], timeout=60)
    assert r.exit_code != 0 and "other-host" not in r.stdout
    assert (OTHER_HOST, 80, "tcp") in vm.network.denied
    # Another resolver, asked directly (UDP and TCP 53), even for an allowed name: nothing.
    direct = vm.run(["python3", "-c", DIRECT, ZONE_ADDR, "direct.pkgs.test"], timeout=60).stdout
    assert "udp none" in direct and "tcp none" in direct, direct
    assert "direct.pkgs.test" not in zone.asked()
    assert {(ZONE_ADDR, 53, "udp"), (ZONE_ADDR, 53, "tcp")} <= set(vm.network.denied)
    # DNS over TLS to an address no answer gave: dropped like everything else there.
    r = vm.run(["python3", "-c", f"import socket; socket.create_connection(('{ZONE_ADDR}', 853), timeout=3)"],
               timeout=60)
    assert r.exit_code != 0 and (ZONE_ADDR, 853, "tcp") in vm.network.denied
    # ... nor through the guest's own nameserver line.
    vm.run(f"echo nameserver {ZONE_ADDR} > /etc/resolv.conf", check=True)
    assert lookup(vm, "own-line.pkgs.test")["own-line.pkgs.test"].startswith("ERR")
    assert "own-line.pkgs.test" not in zone.asked()


def test_a_flood_of_random_labels_is_bounded_and_other_vms_are_still_served(
        smolvm_factory: Factory, internet: tuple[Internet, Zone]) -> None:
    net, zone = internet
    flooder, other = (smolvm_factory(network="nat", allow=["pkgs.test"], uplink=net.uplink,
                                     dns_upstream=[zone.upstream]) for _ in range(2))
    asked = len(zone.asked())
    sent = int(flooder.run(["python3", "-c", FLOOD, flooder.network.host_ip or ""], timeout=120).stdout)
    assert sent == 10_000
    assert lookup(other, "pkgs.test")["pkgs.test"] == f"OK ['{PKGS_ADDR}']"  # its own resolver, unaffected
    time.sleep(2)
    counters = flooder.network.dns
    assert counters["rate_refused"] > 0 and len(flooder.network.denied_names) <= 1024
    assert counters["rate_refused"] + counters["unitemised"] + len(flooder.network.denied_names) <= sent
    assert not [n for n in zone.asked()[asked:] if n.endswith("evil.test")]
    assert lookup(flooder, "pkgs.test")["pkgs.test"] == f"OK ['{PKGS_ADDR}']"  # and it serves again


#: A TCP client that sends a byte every 0.2 s to ``argv[1]``:7 and logs each echo to argv[2].
ECHO_CLIENT = textwrap.dedent("""
    import socket, sys, time
    s = socket.create_connection((sys.argv[1], 7), timeout=10)
    s.settimeout(1)
    with open(sys.argv[2], "a", buffering=1) as log:
        while True:
            try:
                s.sendall(b"x")
                log.write("echo %d\\n" % len(s.recv(16)))
            except socket.timeout:
                log.write("timeout\\n")
            except OSError as exc:
                log.write("ERR %s\\n" % exc)
                break
            time.sleep(0.2)
""")


def echoes(vm: SmolVM) -> int:
    return vm.run("cat /tmp/echo.log 2>/dev/null || true").stdout.count("echo ")


def wait_for(cond: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.3)


def test_live_changes_cut_open_connections_and_none_drops_everything(smolvm_factory: Factory,
                                                                     internet: tuple[Internet, Zone]) -> None:
    net, zone = internet
    vm = smolvm_factory(network="nat", allow=["pkgs.test", ALLOWED_NET], uplink=net.uplink,
                        dns_upstream=[zone.upstream])
    client = vm.spawn(["python3", "-c", ECHO_CLIENT, "pkgs.test", "/tmp/echo.log"])
    wait_for(lambda: echoes(vm) >= 3)
    # Tighten: pkgs.test leaves the allowlist. The open connection stops passing data at once.
    vm.network.set(allow=[ALLOWED_NET])
    assert vm.network.allow == (ALLOWED_NET,) and PKGS_ADDR not in vm.network.dns_allowed
    time.sleep(1.5)
    stalled = echoes(vm)
    time.sleep(2.5)
    assert echoes(vm) == stalled, vm.run("tail -5 /tmp/echo.log").stdout
    assert lookup(vm, "pkgs.test")["pkgs.test"].startswith("ERR")
    assert "pkgs.test" in vm.network.denied_names
    r = vm.run(["python3", "-c", GET, f"http://{ALLOWED_HOST}/index.html"], timeout=60)
    assert r.stdout.strip() == "allowed-host"  # what is still allowed still works
    # none: every packet dropped, new connections fail.
    vm.network.set(policy="none")
    assert vm.network.policy == "none" and vm.network.allow == ()
    r = vm.run(["python3", "-c", GET, f"http://{ALLOWED_HOST}/index.html"], timeout=60)
    assert r.exit_code != 0 and "allowed-host" not in r.stdout
    client.kill()
    # Back to what it had (no ceiling is given to this run): it works again.
    vm.network.set(policy="nat", allow=["pkgs.test"])
    assert vm.run(["python3", "-c", GET, "http://pkgs.test/index.html"], timeout=60).stdout.strip() == "pkgs-host"


def test_a_failed_test_reports_denied_lookups_and_the_ceiling_holds_live_changes(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMOLVM_CACHE_DIR", str(REAL_CACHE))
    monkeypatch.setenv("SMOLVM_DNS_UPSTREAM", "192.0.2.53, 192.0.2.54:5353")
    pytester.makepyfile("""
        import pytest
        from pytest_smolvm import NetworkError

        @pytest.mark.smolvm(network="isolated")
        def test_looks_up(smolvm):
            assert smolvm.config.dns_upstream == ("192.0.2.53:53", "192.0.2.54:5353")
            resolv = smolvm.run("cat /etc/resolv.conf").stdout
            assert resolv.splitlines()[0] == "nameserver " + smolvm.network.host_ip
            r = smolvm.run(["python3", "-c", "import socket\\ntry: socket.getaddrinfo('secret.evil.test', 80)\\n"
                            "except OSError as e: print('ERR', e)"])
            assert r.stdout.startswith("ERR")
            with pytest.raises(NetworkError, match="ceiling"):
                smolvm.network.set(policy="nat", allow=["pkgs.test"])
            assert smolvm.network.policy == "isolated"
            smolvm.network.set(policy="none")  # tightening is always allowed
            assert smolvm.network.policy == "none"
            assert smolvm.network.denied_names == []  # fails: the report shows the lookup
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--smolvm-network=isolated")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*Left contains one more item: 'secret.evil.test'*", "*smolvm network*",
                                 "*denied lookups (1):*", "*secret.evil.test*"])
