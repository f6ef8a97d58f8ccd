"""The network policy fails closed against a hostile guest (real microVMs).

"The internet" is the pair of namespaces of tests/nettopo.py, created and removed here;
every packet these tests send stays inside them, the run's own namespace, or loopback.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from nettopo import ALLOWED_HOST, ALLOWED_NET, OTHER_HOST, UPLINK_ADDR, Internet
from test_network import fetch, serve

from pytest_smolvm import SmolVM
from pytest_smolvm.errors import NetworkError
from pytest_smolvm.network import hub, netns, policy

Factory = Callable[..., SmolVM]

METADATA = "169.254.169.254"
ECHO_PORT, SINK_PORT = 7, 9

#: UDP to every port of one address, then ``extra`` ports of another: more distinct
#: (address, port) pairs than the denial ledger holds.
FLOOD = textwrap.dedent("""
    import socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for host, last in ((sys.argv[1], 65535), (sys.argv[2], int(sys.argv[3]))):
        for port in range(1, last + 1):
            try:
                s.sendto(b"x", (host, port))
            except OSError:
                pass
""")

#: One UDP datagram in a hand-made Ethernet frame: any source MAC and IP the guest likes.
RAW_SEND = textwrap.dedent("""
    import os, socket, struct, sys
    src_mac, dst_mac, src_ip, dst_ip, sport, dport = sys.argv[1:7]
    nic = [n for n in sorted(os.listdir("/sys/class/net")) if n != "lo"][0]
    data = b"spoofed"
    udp = struct.pack("!HHHH", int(sport), int(dport), 8 + len(data), 0) + data
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                     socket.inet_aton(src_ip), socket.inet_aton(dst_ip))
    words = sum(struct.unpack("!10H", ip))
    words = (words & 0xFFFF) + (words >> 16)
    ip = ip[:10] + struct.pack("!H", ~((words & 0xFFFF) + (words >> 16)) & 0xFFFF) + ip[12:]
    mac = lambda m: bytes.fromhex(m.replace(":", ""))
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((nic, 0))
    for _ in range(3):
        s.send(mac(dst_mac) + mac(src_mac) + b"\\x08\\x00" + ip + udp)
""")

#: Wait for a datagram on ``port``; if one comes, answer its sender from that port (which
#: would ride on the conntrack entry it created) and report whether that got a reply too.
LISTEN = textwrap.dedent("""
    import socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", int(sys.argv[1])))
    s.settimeout(float(sys.argv[2]))
    try:
        data, peer = s.recvfrom(2048)
    except OSError:
        print("NOTHING", flush=True); sys.exit()
    s.sendto(b"answer", peer)
    try:
        s.recvfrom(2048)
        print("GOT", peer, "AND-ANSWERED", flush=True)
    except OSError:
        print("GOT", peer, flush=True)
""")

#: A UDP echo server (port 7) and sink (port 9) that write what they saw to a JSON file.
SERVERS = textwrap.dedent("""
    import json, selectors, socket, sys, time
    host, out = sys.argv[1], sys.argv[2]
    sel = selectors.DefaultSelector()
    stats = {"echo": 0, "flows": 0, "sink_bytes": 0, "sink_first": 0.0, "sink_last": 0.0}
    for port in (7, 9):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        s.bind((host, port)); s.setblocking(False); sel.register(s, selectors.EVENT_READ, port)
    last = 0.0
    while True:
        for key, _ in sel.select(0.1):
            while True:
                try:
                    data, peer = key.fileobj.recvfrom(65536)
                except BlockingIOError:
                    break
                if key.data == 7:
                    stats["echo"] += 1; key.fileobj.sendto(data, peer)
                elif len(data) == 1:  # one datagram per new flow
                    stats["flows"] += 1
                else:
                    stats["sink_bytes"] += len(data)
                    stats["sink_last"] = time.monotonic()
                    stats["sink_first"] = stats["sink_first"] or stats["sink_last"]
        if time.monotonic() - last > 0.1:
            open(out + ".tmp", "w").write(json.dumps(stats)); __import__("os").replace(out + ".tmp", out)
            last = time.monotonic()
""")


_stats_files: dict[str, Path] = {}  # internet namespace -> where its UDP servers count


@pytest.fixture(scope="module")
def internet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Internet]:
    """The test internet, plus a "metadata service" at 169.254.169.254 and UDP servers."""
    root = tmp_path_factory.mktemp("internet")
    net = Internet.create(root)
    try:
        subprocess.run(["ip", "-n", net.inet_ns, "addr", "add", f"{METADATA}/32", "dev", "lo"], check=True)
        (root / "md").mkdir()
        (root / "md" / "index.html").write_text("metadata")
        net.servers.append(subprocess.Popen(
            ["ip", "netns", "exec", net.inet_ns, sys.executable, "-m", "http.server", "80", "--bind", METADATA,
             "--directory", str(root / "md")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        net.servers.append(subprocess.Popen(
            ["ip", "netns", "exec", net.inet_ns, sys.executable, "-c", SERVERS, OTHER_HOST,
             str(root / "udp.json")]))
        Internet.wait_listening(net.inet_ns, METADATA)
        while not (root / "udp.json").exists():
            time.sleep(0.05)
        _stats_files[net.inet_ns] = root / "udp.json"
        yield net
    finally:
        net.destroy()


def udp_stats(net: Internet) -> dict[str, float]:
    time.sleep(0.5)  # the servers write their counts every 0.1 s
    stats: dict[str, float] = json.loads(_stats_files[net.inet_ns].read_text())
    return stats


def test_a_full_denial_ledger_still_drops(smolvm_factory: Factory, internet: Internet) -> None:
    vm = smolvm_factory(network="nat", allow=[ALLOWED_NET], uplink=internet.uplink)
    vm.run(["python3", "-c", FLOOD, OTHER_HOST, UPLINK_ADDR, "2000"], timeout=300, check=True)
    assert fetch(vm, OTHER_HOST).startswith("ERR")  # the ledger is full: must still be dropped
    assert fetch(vm, ALLOWED_HOST) == "OK allowed-host"
    assert len(vm.network.denied) <= 65536
    unitemised = vm.network.unitemised
    assert unitemised > 0
    from pytest_smolvm.reports import network_section

    assert f"{unitemised} more denials not itemised" in network_section(vm)


def _tap_mac(vm: SmolVM) -> str:
    assert vm.network.netns and vm.network.tap
    out = netns.run(vm.network.netns, ["ip", "-o", "link", "show", vm.network.tap]).stdout.split()
    return out[out.index("link/ether") + 1]


def _guest_mac(vm: SmolVM) -> str:
    return vm.run("cat /sys/class/net/$(ls /sys/class/net | grep -v '^lo$' | head -1)/address").stdout.strip()


def listened(vm: SmolVM) -> str:
    """What the guest's LISTEN script reported (waits for it to finish)."""
    for _ in range(300):
        out = vm.run("cat /tmp/listen.out").stdout.strip()
        if out:
            return out
        time.sleep(0.1)
    return "still listening"


def test_a_spoofed_source_never_borrows_another_vms_identity(smolvm_factory: Factory, internet: Internet) -> None:
    """A nat VM sends with an isolated VM's address: the reply must not reach (and then
    open the internet for) the isolated VM; a foreign source MAC is dropped as well."""
    attacker = smolvm_factory(network="nat", uplink=internet.uplink)
    victim = smolvm_factory(network="isolated", uplink=internet.uplink)
    assert victim.network.guest_ip and attacker.network.guest_ip
    victim.run(f"(python3 -c '{LISTEN}' 5555 12 > /tmp/listen.out 2>&1 &)", check=True)
    echoes = udp_stats(internet)["echo"]
    gw = _tap_mac(attacker)
    attacker.run(["python3", "-c", RAW_SEND, _guest_mac(attacker), gw, victim.network.guest_ip, OTHER_HOST,
                  "5555", str(ECHO_PORT)], check=True)
    # Its own address, but another MAC: dropped too (a reply would come back to its port).
    attacker.run(f"(python3 -c '{LISTEN}' 6666 8 > /tmp/listen.out 2>&1 &)", check=True)
    attacker.run(["python3", "-c", RAW_SEND, "02:00:00:00:00:99", gw, attacker.network.guest_ip, OTHER_HOST,
                  "6666", str(ECHO_PORT)], check=True)
    assert listened(victim) == "NOTHING"
    assert listened(attacker) == "NOTHING"
    assert udp_stats(internet)["echo"] == echoes, "a spoofed datagram reached the internet"
    # ...while the attacker's honest traffic still works.
    assert fetch(attacker, OTHER_HOST) == "OK other-host"


def test_link_local_metadata_is_out_of_reach_unless_allowed(smolvm_factory: Factory, internet: Internet) -> None:
    vm = smolvm_factory(network="nat", uplink=internet.uplink)
    assert fetch(vm, OTHER_HOST) == "OK other-host"
    assert fetch(vm, METADATA).startswith("ERR")
    assert (METADATA, 80, "tcp") in vm.network.denied
    named = smolvm_factory(network="nat", allow=[ALLOWED_NET, f"{METADATA}/32"], uplink=internet.uplink)
    assert fetch(named, METADATA) == "OK metadata"


#: UDP as fast as it goes for ``seconds`` (one flow), then ``flows`` new flows back to back.
BLAST = textwrap.dedent("""
    import socket, sys, time
    host, port, seconds, flows = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    payload, sent, t0 = b"x" * 1400, 0, time.monotonic()
    while time.monotonic() - t0 < seconds:
        try:
            sent += s.sendto(payload, (host, port))
        except OSError:
            pass
    blast = time.monotonic() - t0
    time.sleep(1)  # the bandwidth cap refills: the flows below meet the connection cap only
    t1 = time.monotonic()
    for _ in range(flows):
        c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            c.sendto(b"f", (host, port))
        except OSError:
            pass
        c.close()
    print(sent, blast, time.monotonic() - t1)
""")


def test_egress_caps_bound_a_flood(smolvm_factory: Factory, internet: Internet) -> None:
    rate_kib, conns, flows = 256, 5, 200
    vm = smolvm_factory(network="nat", uplink=internet.uplink, egress_kib_per_s=rate_kib,
                        egress_conns_per_s=conns)
    before = udp_stats(internet)
    out = vm.run(["python3", "-c", BLAST, OTHER_HOST, str(SINK_PORT), "2", str(flows)], timeout=120,
                 check=True).stdout.split()
    sent, blast, flows_time = int(out[0]), float(out[1]), float(out[2])
    after = udp_stats(internet)
    got, got_flows = after["sink_bytes"] - before["sink_bytes"], after["flows"] - before["flows"]
    # Over the time the sink saw the flood (the guest's queues drain after it stops sending).
    seen = after["sink_last"] - after["sink_first"]
    bucket = rate_kib * 1024 + policy.MIN_BURST_BYTES  # one second at the cap + the burst
    print(f"guest sent {sent} B in {blast:.2f}s; the sink got {got} B over {seen:.2f}s "
          f"(cap {rate_kib} KiB/s, bucket {bucket} B: {(got - bucket) / max(seen, 0.01) / 1024:.0f} KiB/s "
          f"beyond the bucket); "
          f"{flows} new flows in {flows_time:.2f}s, {got_flows} arrived (cap {conns}/s, burst {conns})")
    assert sent > 2 * got  # the guest really tried harder than the cap
    assert got <= rate_kib * 1024 * seen + bucket + 1500
    assert got_flows <= conns * (flows_time + 1) + conns
    capped = vm.network.capped
    assert capped["bandwidth"] > 0 and capped["connections"] > 0, capped
    from pytest_smolvm.reports import network_section

    assert "bandwidth cap hit" in network_section(vm)


HOLD = """
import os, sys, time
from pytest_smolvm.network import hub
net = hub.attach("v1", sys.argv[1], "isolated", (), None)
if sys.argv[2] == "kept":
    d = hub.runtime_dir() / sys.argv[1] / "v1"
    d.mkdir(parents=True)
    (d / "owner.json").write_text('{"pid": %d}' % os.getpid())
    (d / "kept").write_text("{}")
print(net.netns, flush=True)
time.sleep(600)
"""


@pytest.fixture
def held_run(tmp_path: Path) -> Iterator[Callable[[str, str], tuple[str, subprocess.Popen[str]]]]:
    """Start a process that holds a run namespace (no VM) under its own runtime directory."""
    started: list[tuple[str, subprocess.Popen[str]]] = []

    def start(name: str, mode: str) -> tuple[str, subprocess.Popen[str]]:
        env = {**os.environ, "SMOLVM_RUNTIME_DIR": str(tmp_path / name)}
        proc = subprocess.Popen([sys.executable, "-c", HOLD, os.urandom(4).hex(), mode], env=env,
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        ns = proc.stdout.readline().strip()
        started.append((ns, proc))
        return ns, proc

    yield start
    for ns, proc in started:  # only what this test made (never a reap: it must not judge others)
        proc.kill()
        proc.wait()
        if ns:
            netns.remove(ns)


def forget_kept(rt: Path) -> None:
    for kept in rt.glob("*/*/kept"):
        kept.unlink()


Holder = Callable[[str, str], tuple[str, subprocess.Popen[str]]]


def test_reap_spares_other_runtime_dirs_and_kept_vms(held_run: Holder, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    live_ns, _ = held_run("other", "live")
    kept_ns, kept = held_run("mine", "kept")
    kept.send_signal(signal.SIGKILL)
    kept.wait()
    assert netns.exists(live_ns) and netns.exists(kept_ns)
    monkeypatch.setenv("SMOLVM_RUNTIME_DIR", str(tmp_path / "mine"))
    listed = [s.what for s in hub.reap_networks(dry_run=True)]
    assert not any(live_ns in w for w in listed), listed
    assert not any(kept_ns in w for w in listed), listed
    hub.reap_networks()
    assert netns.exists(live_ns), "a live run of another runtime directory lost its namespace"
    assert netns.exists(kept_ns), "a kept VM lost its namespace"
    forget_kept(tmp_path / "mine")  # `reap --kept` removes the VM dir first
    assert any(kept_ns in s.what for s in hub.reap_networks())
    assert not netns.exists(kept_ns)


@pytest.fixture
def uplink_dnat(internet: Internet) -> Iterator[int]:
    """A Docker -p style DNAT in the test uplink namespace only: uplink-address:8080 -> the
    test internet's web server (removed afterwards)."""
    port, table = 8080, "svtestdnat"
    rules = (f"table ip {table} {{ chain pre {{ type nat hook prerouting priority dstnat; policy accept;\n"
             f"ip daddr {UPLINK_ADDR} tcp dport {port} dnat to {OTHER_HOST}:80\n}}\n}}\n")
    netns.run(internet.host_ns, ["nft", "-f", "-"], input=rules)
    try:
        yield port
    finally:
        netns.run(internet.host_ns, ["nft", "delete", "table", "ip", table], check=False)


def test_a_dnat_in_the_uplink_never_exposes_its_services(smolvm_factory: Factory, internet: Internet,
                                                         uplink_dnat: int) -> None:
    vm = smolvm_factory(network="nat", uplink=internet.uplink)
    assert fetch(vm, OTHER_HOST) == "OK other-host"  # the DNAT target itself is reachable...
    assert fetch(vm, UPLINK_ADDR, uplink_dnat).startswith("ERR")  # ...but not through the host's address
    assert fetch(vm, UPLINK_ADDR).startswith("ERR")


#: Datagrams to the limited broadcast address and to a multicast group, on one port.
BCAST = textwrap.dedent("""
    import socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    for _ in range(5):
        for dest in ("255.255.255.255", sys.argv[2]):
            s.sendto(dest.encode(), (dest, int(sys.argv[1])))
""")


def test_broadcast_and_multicast_never_reach_the_run_namespace(smolvm_factory: Factory, internet: Internet) -> None:
    vm = smolvm_factory(network="nat", uplink=internet.uplink)
    assert vm.network.netns and vm.network.host_ip
    port, group = 5454, "239.255.0.1"
    with netns.entered(vm.network.netns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", port))
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                        socket.inet_aton(group) + socket.inet_aton(vm.network.host_ip))
        sock.settimeout(2)
        vm.run(["python3", "-c", BCAST, str(port), group], check=True)
        got: set[bytes] = set()
        try:
            while True:
                got.add(sock.recvfrom(2048)[0])
        except TimeoutError:
            pass
    assert not got, f"a guest's broadcast or multicast reached the run namespace's own stack: {got}"
    assert fetch(vm, OTHER_HOST) == "OK other-host"


#: UDP to ``count`` ports of one address (each one a new tracked connection).
PORT_SWEEP = textwrap.dedent("""
    import socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for port in range(1, int(sys.argv[2]) + 1):
        try:
            s.sendto(b"x", (sys.argv[1], port))
        except OSError:
            pass
""")


def test_the_gateway_cannot_fill_the_conntrack_table(smolvm_factory: Factory, internet: Internet) -> None:
    vm = smolvm_factory(network="isolated", uplink=internet.uplink)
    assert vm.network.netns and vm.network.host_ip
    serve(vm, 8080, "guest-page")
    vm.run(["python3", "-c", PORT_SWEEP, vm.network.host_ip, "6000"], timeout=300, check=True)
    tracked = int(netns.read_sysctl(vm.network.netns, "net.netfilter.nf_conntrack_count"))
    print(f"6000 UDP ports of the gateway: {tracked} connections tracked in the run namespace")
    assert tracked <= 4096 + 16  # the per-VM cap (+ this test's own few)
    port = vm.forward(8080)  # the host's way in still works
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/index.html", timeout=30) as resp:
        assert resp.read() == b"guest-page\n"


#: ARP requests for the gateway from ``count`` made-up sender addresses (10.0.0.0/8), for
#: ``seconds`` seconds, so the gateway would learn a neighbour for each.
ARP_FLOOD = textwrap.dedent("""
    import os, socket, struct, sys, time
    gw, count, seconds = socket.inet_aton(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    nic = [n for n in sorted(os.listdir("/sys/class/net")) if n != "lo"][0]
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((nic, 0))
    t0, sent = time.monotonic(), 0
    while time.monotonic() - t0 < seconds:
        for i in range(count):
            mac = bytes([2, 0x66, 0, (i >> 16) & 255, (i >> 8) & 255, i & 255])
            sip = struct.pack("!I", (10 << 24) + 0x10000 + i)
            arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac + sip + bytes(6) + gw
            s.send(b"\\xff" * 6 + mac + b"\\x08\\x06" + arp)
            sent += 1
    print(sent)
""")


def test_an_arp_flood_does_not_cut_off_the_other_vms(smolvm_factory: Factory, internet: Internet) -> None:
    attacker = smolvm_factory(network="isolated", uplink=internet.uplink)
    victim = smolvm_factory(network="isolated", uplink=internet.uplink)
    ns = victim.network.netns
    assert ns and ns == attacker.network.netns and attacker.network.host_ip
    serve(victim, 8080, "guest-page")
    attacker.run(f"(python3 -c '{ARP_FLOOD}' {attacker.network.host_ip} 3000 15 > /tmp/arp.out 2>&1 &)",
                 check=True)
    time.sleep(4)
    neighbours = len(netns.run(ns, ["ip", "neigh", "show"]).stdout.splitlines())
    netns.run(ns, ["ip", "neigh", "flush", "dev", str(victim.network.tap)])  # it must be learnt anew
    port = victim.forward(8080)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/index.html", timeout=10) as resp:
            page = resp.read()
    except OSError as exc:
        page = str(exc).encode()
    print(f"ARP flood: {neighbours} neighbours in the run namespace; the victim's forward got {page!r}")
    assert page == b"guest-page\n"
    assert neighbours <= 8
    for _ in range(300):  # the flood ends (the attacker's own output says how much it sent)
        if attacker.run("cat /tmp/arp.out").stdout.strip():
            break
        time.sleep(0.1)


def test_a_failed_rule_removal_is_reported_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMOLVM_RUNTIME_DIR", str(tmp_path / "rt"))
    run_id = os.urandom(4).hex()
    net = hub.attach("v1", run_id, "isolated", (), None)
    other = hub.attach("v2", run_id, "isolated", (), None)  # keeps the namespace
    try:
        # Someone else's hand (or a bug) took the ARP table: the lease element there cannot go.
        netns.run(net.netns, ["nft", "delete", "table", "arp", policy.RUN_TABLE])
        with pytest.raises(NetworkError, match=r"(?s)network teardown was incomplete.*arplease"):
            net.close()
        net.close()  # idempotent: reported once
        assert net.tap_fd == -1
        for name in ("lease", "owner", "gateway"):  # ...and everything else of it did go
            listed = netns.run(net.netns, ["nft", "list", "set", "inet", policy.RUN_TABLE, name]).stdout
            assert net.addr.tap not in listed, (name, listed)
    finally:
        for n in (net, other):
            with contextlib.suppress(NetworkError):
                n.close()
        netns.remove(net.netns)
