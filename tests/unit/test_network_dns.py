"""The resolver's decisions on dnslib packets, its ledger, rate limit and cache
(network/dns.py), and the nft text of name-allowed addresses and live changes (policy.py)."""

from __future__ import annotations

import ipaddress
import json
import struct

import pytest
from dnslib import CLASS, CNAME, OPCODE, QTYPE, RCODE, RR, A, DNSHeader, DNSQuestion, DNSRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_smolvm.network import dns, policy
from pytest_smolvm.network.dns import Decision, Mode, NamePolicy, Verdict, decide

NAMES = NamePolicy(Mode.NAMES, ("pkgs.test", "*.cdn.test"))


def q(name: str, qtype: str = "A") -> DNSRecord:
    return DNSRecord.question(name, qtype)


def test_a_policy_follows_the_vm_policy() -> None:
    assert NamePolicy.of("none", [], False).mode is Mode.REFUSE
    assert NamePolicy.of("isolated", ["pkgs.test"], False).mode is Mode.REFUSE
    assert NamePolicy.of("nat", [], False).mode is Mode.ANY
    assert NamePolicy.of("nat", ["pkgs.test"], True) == NamePolicy(Mode.NAMES, ("pkgs.test",))
    # nat with networks only: no name resolves (a lookup would be a channel out)
    assert NamePolicy.of("nat", [], True) == NamePolicy(Mode.NAMES, ())


@pytest.mark.parametrize(("request_", "policy_", "verdict"), [
    (q("pkgs.test"), NAMES, Verdict.FORWARD),
    (q("PKGS.Test"), NAMES, Verdict.FORWARD),
    (q("files.cdn.test"), NAMES, Verdict.FORWARD),
    (q("evil.test"), NAMES, Verdict.NXDOMAIN),
    (q("secret-data.evil.test"), NAMES, Verdict.NXDOMAIN),
    (q("pkgs.test", "AAAA"), NAMES, Verdict.EMPTY),
    (q("pkgs.test", "ANY"), NAMES, Verdict.EMPTY),
    (q("evil.test", "AAAA"), NAMES, Verdict.NXDOMAIN),  # judged by name before type
    (q("pkgs.test", "TXT"), NAMES, Verdict.FORWARD),
    (q("pkgs.test"), NamePolicy(Mode.REFUSE), Verdict.REFUSED),
    (q("anything.example"), NamePolicy(Mode.ANY), Verdict.FORWARD),
    (q("pkgs.test"), NamePolicy(Mode.NAMES, ()), Verdict.NXDOMAIN),
])
def test_decisions(request_: DNSRecord, policy_: NamePolicy, verdict: Verdict) -> None:
    assert decide(request_, policy_).verdict is verdict


def test_hostile_names_are_never_forwarded_even_when_everything_resolves() -> None:
    labels = ".".join(["a"] * 40) + ".pkgs.test"
    d = decide(q(labels), NamePolicy(Mode.ANY))
    assert d.verdict is Verdict.NXDOMAIN and "labels" in d.why
    raw = DNSRecord(DNSHeader(id=7), q=DNSQuestion("x.test"))
    raw.questions[0].qname.label = (b"\x00bad\n", b"pkgs", b"test")
    d = decide(DNSRecord.parse(raw.pack()), NamePolicy(Mode.ANY))
    assert d.verdict is Verdict.NXDOMAIN and d.name.isprintable() and "not a host name" in d.why


def test_malformed_or_odd_requests() -> None:
    two = q("pkgs.test")
    two.add_question(DNSQuestion("evil.test"))
    assert decide(two, NAMES).verdict is Verdict.FORMERR
    update = q("pkgs.test")
    update.header.opcode = OPCODE.UPDATE
    assert decide(update, NAMES).verdict is Verdict.FORMERR
    answer = q("pkgs.test").reply()
    assert decide(answer, NAMES).verdict is Verdict.FORMERR  # a response is not a query
    chaos = DNSRecord(q=DNSQuestion("version.bind", QTYPE.TXT, CLASS.CH))
    assert decide(chaos, NamePolicy(Mode.ANY)).verdict is Verdict.REFUSED


def test_replies_carry_the_rcode_and_the_question() -> None:
    request = q("evil.test")
    r = DNSRecord.parse(dns.reply(request, Verdict.NXDOMAIN).pack())
    assert (r.header.rcode, r.header.id, str(r.q.qname)) == (RCODE.NXDOMAIN, request.header.id, "evil.test.")
    assert dns.reply(request, Verdict.REFUSED).header.rcode == RCODE.REFUSED
    empty = dns.reply(q("pkgs.test", "AAAA"), Verdict.EMPTY)
    assert empty.header.rcode == RCODE.NOERROR and empty.rr == []


def answer(request: DNSRecord, *addrs: tuple[str, int]) -> DNSRecord:
    r = request.reply()
    for addr, ttl in addrs:
        r.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(addr), ttl=ttl))
    return r


def test_answer_addresses_and_their_timeouts() -> None:
    request = q("pkgs.test")
    r = answer(request, ("192.0.2.80", 300), ("192.0.2.81", 5))
    r.add_answer(RR("pkgs.test", QTYPE.CNAME, rdata=CNAME("cdn.test"), ttl=60))
    assert dns.answer_addresses(r) == {"192.0.2.80": 300, "192.0.2.81": 5}
    assert dns.element_timeout(5) == dns.MIN_TTL
    assert dns.element_timeout(300) == 300
    assert dns.element_timeout(10**9) == dns.MAX_TTL
    flood = answer(request, *[(f"192.0.2.{i}", 60) for i in range(1, 200)])
    assert len(dns.answer_addresses(flood)) == dns.MAX_ANSWER_RECORDS


def test_matches_checks_id_and_question() -> None:
    request = q("pkgs.test")
    assert dns.matches(request, answer(request, ("192.0.2.80", 1)))
    other = answer(q("evil.test"), ("192.0.2.80", 1))
    other.header.id = request.header.id
    assert not dns.matches(request, other)
    wrong_id = answer(request)
    wrong_id.header.id = (request.header.id + 1) % 65536
    assert not dns.matches(request, wrong_id)
    assert not dns.matches(request, request)  # a query is not an answer


def test_the_ledger_is_bounded_and_counts_the_rest() -> None:
    ledger = dns.Ledger(size=3)
    for name in ["a.test", "b.test", "a.test", "c.test", "d.test", "e.test"]:
        ledger.deny(name)
    assert ledger.names() == [("a.test", 2), ("b.test", 1), ("c.test", 1)]
    assert ledger.unitemised == 2


def test_rate_limit_is_a_token_bucket() -> None:
    bucket = dns.RateLimit(rate=10, burst=5)
    bucket.at = 0.0
    assert [bucket.take(0.0) for _ in range(6)] == [True] * 5 + [False]
    assert bucket.take(0.1) and not bucket.take(0.1)  # one token per 0.1 s
    assert sum(bucket.take(100.0) for _ in range(50)) == 5  # never more than the burst


def test_cache_ages_ttls_expires_and_is_bounded() -> None:
    cache = dns.Cache(size=2)
    request = q("pkgs.test")
    cache.put(("u", "pkgs.test", 1), answer(request, ("192.0.2.80", 300)), now=1000.0)
    later = q("pkgs.test")
    got = cache.get(("u", "pkgs.test", 1), later, now=1100.0)
    assert got is not None and got.header.id == later.header.id and got.rr[0].ttl == 200
    assert cache.get(("u", "pkgs.test", 1), later, now=1301.0) is None
    for i in range(3):
        cache.put(("u", f"n{i}.test", 1), answer(q(f"n{i}.test"), ("192.0.2.1", 60)), now=0.0)
    assert len(cache) == 2 and cache.get(("u", "n0.test", 1), q("n0.test"), now=1.0) is None
    servfail = request.reply()
    servfail.header.rcode = RCODE.SERVFAIL
    cache.put(("u", "bad.test", 1), servfail, now=0.0)
    assert cache.get(("u", "bad.test", 1), request, now=1.0) is None


def test_decision_is_a_value() -> None:
    assert Decision(Verdict.NXDOMAIN, "evil.test", "not in allow") == decide(q("evil.test"), NAMES)


# --------------------------------------------------------------------- nft text

def test_dns_allow_elements_text() -> None:
    assert policy.dns_allow_elements("sv1", {"192.0.2.81": 30, "192.0.2.80": 300}) == (
        'add element inet smolvm dnsallow { "sv1" . 192.0.2.80 timeout 300s, "sv1" . 192.0.2.81 timeout 30s }\n')
    assert policy.dns_allow_elements("sv1", {}) == ""
    with pytest.raises(ValueError, match="flush ruleset"):
        policy.dns_allow_elements("sv1", {"192.0.2.1; flush ruleset": 1})
    assert policy.dns_forget_elements("sv1", ["192.0.2.80"]) == (
        'delete element inet smolvm dnsallow { "sv1" . 192.0.2.80 }\n')


def test_parse_dns_allowed() -> None:
    listing = {"nftables": [{"metainfo": {}}, {"set": {"name": "dnsallow", "elem": [
        {"elem": {"val": {"concat": ["sv1", "192.0.2.80"]}, "timeout": 300, "expires": 299}},
        {"concat": ["sv2", "192.0.2.81"]}]}}]}
    assert policy.parse_dns_allowed(json.dumps(listing)) == {"sv1": ["192.0.2.80"], "sv2": ["192.0.2.81"]}


def test_names_only_allow_opens_no_network() -> None:
    assert policy.egress_networks("nat", ("pkgs.test",)) == []
    assert policy.egress_networks("nat", ("pkgs.test", "198.51.100.0/24")) == ["198.51.100.0/24"]
    assert "169.254.0.0/16" not in policy.egress_networks("nat", ())
    assert len(policy.egress_networks("nat", ())) > 1  # everywhere (but link-local)


GUEST = ipaddress.IPv4Address("10.213.0.2")


def test_live_change_to_none_withdraws_the_lease_and_forgets_answers() -> None:
    text = policy.live_change("sv1", GUEST, "02:53:00:00:00:00", ("nat", ["198.51.100.0/24"]), ("none", []),
                              ["192.0.2.80"], tighten=True)
    assert text.splitlines() == [
        'delete element inet smolvm egress { "sv1" . 198.51.100.0/24 }',
        'delete element inet smolvm lease { "sv1" . 10.213.0.2 . 02:53:00:00:00:00 }',
        'delete element arp smolvm arplease { "sv1" . 10.213.0.2 . 02:53:00:00:00:00 }',
        'delete element inet smolvm dnsallow { "sv1" . 192.0.2.80 }',
    ]


def test_live_change_loosening_only_adds() -> None:
    text = policy.live_change("sv1", GUEST, "02:53:00:00:00:00", ("none", []), ("nat", ["198.51.100.0/24"]),
                              [], tighten=False)
    assert text.splitlines() == [
        'add element inet smolvm egress { "sv1" . 198.51.100.0/24 }',
        'add element inet smolvm lease { "sv1" . 10.213.0.2 . 02:53:00:00:00:00 }',
        'add element arp smolvm arplease { "sv1" . 10.213.0.2 . 02:53:00:00:00:00 }',
    ]
    assert policy.live_change("sv1", GUEST, "m", ("nat", ["a"]), ("nat", ["a"]), ["192.0.2.80"], False) == ""


# --------------------------------------------------------------------- hostile bytes

@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_any_bytes_are_a_request_or_nothing_and_never_raise(data: bytes) -> None:
    request = dns.parse(data)
    if request is not None:
        decision = decide(request, NAMES)
        assert decision.name.isprintable() and len(decision.name) <= 120
        dns.reply(request, decision.verdict).pack()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=63), min_size=1, max_size=20))
def test_any_labels_are_judged_without_raising(labels: list[bytes]) -> None:
    # The wire format by hand: dnslib refuses to pack names over 253 bytes, and a guest need not.
    question = b"".join(bytes([len(label)]) + label for label in labels) + b"\0\0\1\0\1"
    request = dns.parse(struct.pack("!6H", 1, 0x0100, 1, 0, 0, 0) + question)
    if request is None:
        return
    decision = decide(request, NamePolicy(Mode.ANY))
    assert decision.verdict in (Verdict.FORWARD, Verdict.NXDOMAIN)
    if decision.verdict is Verdict.FORWARD:  # only host names ever go upstream
        assert all(part and len(part) <= 63 for part in decision.name.split("."))
        assert set(decision.name) <= set("abcdefghijklmnopqrstuvwxyz0123456789-_.")
