"""The run's resolver on real sockets, without a VM: a "run" namespace where the gateway and
the guest are two addresses on loopback, and an "uplink" namespace whose loopback serves the
made-up zone (tests/dnszone.py). Nothing leaves namespaces this module makes."""

from __future__ import annotations

import secrets
import socket
import struct
import subprocess
import time
from collections.abc import Iterator

import pytest
from dnslib import RCODE, DNSRecord
from dnszone import Zone

from pytest_smolvm.errors import NetworkError
from pytest_smolvm.network import dns, netns
from pytest_smolvm.network.dns import Mode, NamePolicy
from pytest_smolvm.network.resolver import CACHE, MAX_TCP, VMResolver

GATEWAY, GUEST = "10.213.250.1", "10.213.250.2"
RECORDS = {"pkgs.test": "192.0.2.80", "evil.test": "203.0.113.10", "files.cdn.test": "192.0.2.81"}


@pytest.fixture(scope="module")
def namespaces() -> Iterator[tuple[str, str]]:
    tag = f"svr{secrets.token_hex(3)}"
    run, up = f"{tag}-run", f"{tag}-up"
    try:
        for ns in (run, up):
            subprocess.run(["ip", "netns", "add", ns], check=True)
            subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        for addr in (GATEWAY, GUEST):
            subprocess.run(["ip", "-n", run, "addr", "add", f"{addr}/32", "dev", "lo"], check=True)
        yield run, up
    finally:
        for ns in (run, up):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.fixture(scope="module")
def zone(namespaces: tuple[str, str]) -> Iterator[Zone]:
    z = Zone(namespaces[1], "127.0.0.1", RECORDS)
    z.wait_serving()
    yield z
    z.close()


class Allowed:
    """The resolver's ``allow_addresses``: what it was asked to allow (or a failure)."""

    def __init__(self) -> None:
        self.calls: list[dict[str, int]] = []
        self.fail = False

    def __call__(self, addresses: dict[str, int]) -> None:
        if self.fail:
            raise NetworkError("nft: the set is full")
        self.calls.append(dict(addresses))


@pytest.fixture
def resolver(namespaces: tuple[str, str], zone: Zone) -> Iterator[tuple[VMResolver, Allowed]]:
    CACHE._data.clear()  # each test sees its own upstream traffic
    allowed = Allowed()
    r = VMResolver("vm-test", namespaces[0], namespaces[1], GATEWAY, GUEST,
                   NamePolicy(Mode.NAMES, ("pkgs.test", "*.cdn.test")), (zone.upstream,), allowed)
    yield r, allowed
    r.close()


def guest_socket(ns: str, kind: int = socket.SOCK_DGRAM) -> socket.socket:
    with netns.entered(ns):
        s = socket.socket(socket.AF_INET, kind)
    s.bind((GUEST, 0))
    s.settimeout(5)
    return s


def ask(ns: str, name: str, qtype: str = "A", tcp: bool = False) -> DNSRecord:
    request = DNSRecord.question(name, qtype)
    with guest_socket(ns, socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM) as s:
        s.connect((GATEWAY, 53))
        data = request.pack()
        if tcp:
            s.sendall(struct.pack("!H", len(data)) + data)
            size = struct.unpack("!H", s.recv(2))[0]
            raw = b""
            while len(raw) < size:
                raw += s.recv(size - len(raw))
        else:
            s.send(data)
            raw = s.recv(65535)
    reply = DNSRecord.parse(raw)
    assert reply.header.id == request.header.id
    return reply


def test_allowed_names_resolve_and_their_addresses_are_allowed_for_their_ttl(
        resolver: tuple[VMResolver, Allowed], namespaces: tuple[str, str], zone: Zone) -> None:
    r, allowed = resolver
    reply = ask(namespaces[0], "pkgs.test")
    assert reply.header.rcode == RCODE.NOERROR and [str(rr.rdata) for rr in reply.rr] == ["192.0.2.80"]
    assert allowed.calls == [{"192.0.2.80": 300}]
    assert str(ask(namespaces[0], "files.cdn.test", tcp=True).rr[0].rdata) == "192.0.2.81"
    before = zone.asked().count("pkgs.test")
    cached = ask(namespaces[0], "pkgs.test")
    assert str(cached.rr[0].rdata) == "192.0.2.80" and 0 < cached.rr[0].ttl <= 300
    assert zone.asked().count("pkgs.test") == before  # answered from the cache
    assert len(allowed.calls) == 2  # the cached answer's address was already allowed: no nft call
    assert ask(namespaces[0], "pkgs.test", "AAAA").rr == []
    assert r.answered == 3  # AAAA is answered empty, by the resolver itself


def test_names_outside_the_allowlist_never_reach_the_upstream(
        resolver: tuple[VMResolver, Allowed], namespaces: tuple[str, str], zone: Zone) -> None:
    r, allowed = resolver
    for name in ("evil.test", "c2VjcmV0.evil.test", "pkgs.test.evil.test", "cdn.test"):
        assert ask(namespaces[0], name).header.rcode == RCODE.NXDOMAIN
    assert ask(namespaces[0], "c2VjcmV0.evil.test", tcp=True).header.rcode == RCODE.NXDOMAIN
    assert not [n for n in zone.asked() if "evil" in n or n == "cdn.test"]
    assert [n for n, _ in r.ledger.names()] == ["c2vjcmv0.evil.test", "cdn.test", "evil.test", "pkgs.test.evil.test"]
    assert dict(r.ledger.names())["c2vjcmv0.evil.test"] == 2
    assert allowed.calls == []


def test_isolated_vms_get_nothing(resolver: tuple[VMResolver, Allowed], namespaces: tuple[str, str],
                                  zone: Zone) -> None:
    r, _ = resolver
    r.set_policy(NamePolicy.of("isolated", [], False))
    before = len(zone.asked())
    assert ask(namespaces[0], "pkgs.test").header.rcode == RCODE.REFUSED
    assert len(zone.asked()) == before


def test_a_failed_allow_is_a_servfail_not_an_address(resolver: tuple[VMResolver, Allowed],
                                                      namespaces: tuple[str, str]) -> None:
    r, allowed = resolver
    allowed.fail = True
    reply = ask(namespaces[0], "pkgs.test")
    assert reply.header.rcode == RCODE.SERVFAIL and reply.rr == []
    assert r.ledger.upstream_failures == 1


def test_only_the_guest_is_answered_and_garbage_gets_nothing(resolver: tuple[VMResolver, Allowed],
                                                              namespaces: tuple[str, str]) -> None:
    r, _ = resolver
    with netns.entered(namespaces[0]):
        other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with other:
        other.bind((GATEWAY, 0))  # any address of the namespace but the guest's
        other.settimeout(1)
        other.sendto(DNSRecord.question("pkgs.test").pack(), (GATEWAY, 53))
        with pytest.raises(TimeoutError):
            other.recv(4096)
    with guest_socket(namespaces[0]) as s:
        s.settimeout(1)
        for junk in (b"", b"\x00", secrets.token_bytes(40), b"\x12\x34\x01\x00\x00\x01" + b"\xff" * 30):
            s.sendto(junk, (GATEWAY, 53))
        with pytest.raises(TimeoutError):
            s.recv(4096)
    assert r.ledger.malformed >= 3
    assert ask(namespaces[0], "pkgs.test").header.rcode == RCODE.NOERROR  # still serving


def test_tcp_connections_are_bounded(resolver: tuple[VMResolver, Allowed], namespaces: tuple[str, str]) -> None:
    held = []
    try:
        for _ in range(MAX_TCP):
            s = guest_socket(namespaces[0], socket.SOCK_STREAM)
            s.connect((GATEWAY, 53))
            held.append(s)
        time.sleep(0.5)
        extra = guest_socket(namespaces[0], socket.SOCK_STREAM)
        held.append(extra)
        extra.connect((GATEWAY, 53))
        extra.settimeout(3)
        assert extra.recv(1) == b""  # closed at once: the resolver holds MAX_TCP connections
    finally:
        for s in held:
            s.close()
    time.sleep(0.5)  # the resolver sees them closed
    assert ask(namespaces[0], "pkgs.test", tcp=True).header.rcode == RCODE.NOERROR


def test_ten_thousand_random_labels_are_bounded_and_the_resolver_keeps_serving(
        resolver: tuple[VMResolver, Allowed], namespaces: tuple[str, str], zone: Zone) -> None:
    r, _ = resolver
    names = [f"{secrets.token_hex(20)}.evil.test" for _ in range(10_000)]
    with guest_socket(namespaces[0]) as s:
        s.setblocking(False)
        sent = 0
        for name in names:
            try:
                s.sendto(DNSRecord.question(name).pack(), (GATEWAY, 53))
                sent += 1
            except BlockingIOError:
                time.sleep(0.001)
    time.sleep(2)
    ledger = r.ledger
    assert len(ledger.names()) <= dns.LEDGER_SIZE
    assert ledger.rate_refused > 0  # the burst is far above the per-VM rate
    assert len(ledger.names()) + ledger.unitemised + ledger.rate_refused <= sent
    assert not [n for n in zone.asked() if n.endswith("evil.test")]  # not one reached the upstream
    time.sleep(1)  # the bucket refills
    assert ask(namespaces[0], "pkgs.test").header.rcode == RCODE.NOERROR
