"""The network policy's pure rules: egress intervals, the ruleset's shape, per-VM elements."""

from __future__ import annotations

import ipaddress
import json
import re
import string

import pytest

from pytest_smolvm.errors import NetworkError
from pytest_smolvm.network import policy

VM_RANGE = ipaddress.IPv4Network("10.213.0.0/16")
LINK_LOCAL = ipaddress.IPv4Network("169.254.0.0/16")


def _covers(nets: list[str], addr: str) -> bool:
    return any(ipaddress.IPv4Address(addr) in ipaddress.IPv4Network(n) for n in nets)


@pytest.mark.parametrize("allow", [(), ("0.0.0.0/0",), ("169.0.0.0/8", "198.51.100.0/24"), ("169.254.0.0/15",)])
def test_egress_never_includes_link_local_unless_named(allow: tuple[str, ...]) -> None:
    nets = policy.egress_networks("nat", allow)
    assert not any(ipaddress.IPv4Network(n).overlaps(LINK_LOCAL) for n in nets), nets
    for net in allow:  # the rest of what was allowed is still allowed
        for addr in (ipaddress.IPv4Network(net)[0], ipaddress.IPv4Network(net)[-1]):
            if addr not in LINK_LOCAL:
                assert _covers(nets, str(addr)), (net, addr, nets)


def test_egress_without_allow_is_everything_but_link_local() -> None:
    nets = policy.egress_networks("nat", ())
    total = sum(ipaddress.IPv4Network(n).num_addresses for n in nets)
    assert total == 2**32 - LINK_LOCAL.num_addresses
    assert _covers(nets, "203.0.113.10") and not _covers(nets, "169.254.169.254")


@pytest.mark.parametrize("named", ["169.254.169.254/32", "169.254.0.0/16", "169.254.169.0/24"])
def test_a_cidr_inside_link_local_is_allowed_explicitly(named: str) -> None:
    nets = policy.egress_networks("nat", ("198.51.100.0/24", named))
    assert _covers(nets, str(ipaddress.IPv4Network(named)[0]))
    assert not _covers(nets, "169.254.1.1") or named == "169.254.0.0/16"


def test_overlapping_allow_entries_are_merged_for_the_interval_set() -> None:
    nets = policy.egress_networks("nat", ("10.0.0.0/8", "10.1.0.0/16", "10.0.0.0/9"))
    assert nets == ["10.0.0.0/8"]


def test_no_egress_without_nat() -> None:
    assert policy.egress_networks("isolated", ()) == []


def _chain(ruleset: str, name: str) -> list[str]:
    body = re.search(r"chain " + name + r" \{\n(.*?)\n  \}", ruleset, re.S)
    assert body, name
    return [ln.strip() for ln in body.group(1).splitlines() if ln.strip()]


def test_tap_traffic_falls_through_to_drop_and_the_ledger_never_decides() -> None:
    rules = policy.run_ruleset(VM_RANGE)
    guard = _chain(rules, "guard")
    assert "policy drop;" in guard[0]
    deny = _chain(rules, "deny")
    assert deny[-1] == "drop"  # whatever the ledger could or could not record
    assert any("@unitemised" in r for r in deny)
    forward = _chain(rules, "forward")
    assert "policy drop;" in forward[0]
    assert not any(r == f'iifname "{policy.TAP_PREFIX}*" oifname "{policy.UPLINK_IF}" accept' for r in forward)


def test_the_lease_is_checked_before_any_accept() -> None:
    guard = _chain(policy.run_ruleset(VM_RANGE), "guard")
    lease = next(i for i, r in enumerate(guard) if "@lease" in r)
    first_tap_accept = next(i for i, r in enumerate(guard) if r.endswith("accept")
                            and "iifname !=" not in r and policy.UPLINK_IF not in r)
    assert lease < first_tap_accept
    assert any("ct state established,related" in r and "@owner" in r for r in guard)
    assert not any(r == "ct state established,related accept" for r in guard)


def test_vm_elements_name_the_lease_owner_and_caps() -> None:
    caps = policy.Caps(kib_per_s=256, conns_per_s=5)
    text = policy.vm_elements("sv1", ipaddress.IPv4Address("10.213.0.1"), ipaddress.IPv4Address("10.213.0.2"),
                              "02:53:00:00:00:00", 77, ["0.0.0.0/1"], caps)
    assert '"sv1" . 10.213.0.2 . 02:53:00:00:00:00' in text
    assert '"sv1" . 77' in text
    assert "rate over 256 kbytes/second" in text and "rate over 5/second" in text
    removal = policy.vm_removal("sv1", ipaddress.IPv4Address("10.213.0.1"), ipaddress.IPv4Address("10.213.0.2"),
                                "02:53:00:00:00:00", 77, ["0.0.0.0/1"], [("203.0.113.10", 80, "tcp")])
    for obj in ("counter", "limit"):  # every per-VM object is removed with it
        assert text.count(f"add {obj} ") == removal.count(f"delete {obj} ")


def test_counters_are_parsed_per_object() -> None:
    doc = {"nftables": [{"metainfo": {}},
                        {"counter": {"family": "inet", "name": "nolog_sv1", "table": "smolvm",
                                     "packets": 12, "bytes": 400}},
                        {"counter": {"family": "inet", "name": "bwhit_sv1", "table": "smolvm",
                                     "packets": 3, "bytes": 4200}}]}
    assert policy.parse_counters(json.dumps(doc)) == {"nolog_sv1": 12, "bwhit_sv1": 3}


def test_the_uplink_drops_its_own_addresses_before_any_dnat() -> None:
    rules = policy.uplink_ruleset("abc-root", "svuabc", ipaddress.IPv4Address("169.254.1.2"))
    pre = _chain(rules, "prerouting")
    assert "hook prerouting priority -300;" in pre[0]  # before dstnat (-100)
    assert 'iifname "svuabc" fib daddr type { local, broadcast, multicast } drop' in pre
    assert 'iifname "svuabc" drop' in _chain(rules, "input")


def test_the_namespace_denies_its_own_broadcast_and_multicast() -> None:
    guard = _chain(policy.run_ruleset(VM_RANGE), "guard")
    deny = guard.index("fib daddr type { local, broadcast, multicast } goto deny")
    assert deny < next(i for i, r in enumerate(guard) if "@egress" in r)  # egress has 0.0.0.0/0 in it


def test_new_connections_meet_the_per_vm_conntrack_cap_before_any_accept() -> None:
    guard = _chain(policy.run_ruleset(VM_RANGE), "guard")
    cap = guard.index(f"add @conns {{ iifname ct count over {policy.MAX_CONNS} }} goto deny")
    assert cap < next(i for i, r in enumerate(guard) if "@gateway" in r)
    assert cap < next(i for i, r in enumerate(guard) if "@egress" in r)


def test_arp_from_a_tap_must_match_its_lease() -> None:
    rules = policy.run_ruleset(VM_RANGE)
    arp = rules[rules.index("table arp "):]
    assert 'iifname "sv*" iifname . arp saddr ip . arp saddr ether != @arplease drop' in _chain(arp, "input")
    args = ("sv1", ipaddress.IPv4Address("10.213.0.1"), ipaddress.IPv4Address("10.213.0.2"), "02:53:00:00:00:00", 7)
    element = '"sv1" . 10.213.0.2 . 02:53:00:00:00:00'
    assert f"add element arp smolvm arplease {{ {element} }}" in policy.vm_elements(*args, [], policy.Caps(1, 1))
    assert f"delete element arp smolvm arplease {{ {element} }}" in policy.vm_removal(*args, [], [])


def test_uplink_tables_are_read_from_nft_json_not_by_regex() -> None:
    listing = json.dumps({"nftables": [
        {"metainfo": {"version": "1.0.6"}},
        {"table": {"family": "ip", "name": "smolvm-ab12cd34-root", "handle": 3}},
        {"table": {"family": "inet", "name": "smolvm-ffff0000-root", "handle": 4}},   # not ours: family
        {"table": {"family": "ip", "name": "smolvm-ab12cd34-root-x", "handle": 5}},   # not ours: name
        {"table": {"family": "ip", "name": "filter", "comment": '"name": "smolvm-deadbeef-root"'}},
    ]})
    assert policy.parse_uplink_tables(listing) == {"smolvm-ab12cd34-root": "ab12cd34"}
    assert policy.parse_uplink_tables('{"nftables": "junk"}') == {}
    with pytest.raises(NetworkError):
        policy.parse_uplink_tables("not json")


# The run namespace's whole ruleset, pinned so that a change to the generated text is a
# deliberate one (and refactoring run_ruleset cannot make one).
RUN_RULESET = string.Template("""\
table inet smolvm {
  set gateway { type ifname . ipv4_addr; }
  set egress { type ifname . ipv4_addr; flags interval; }
  set lease { type ifname . ipv4_addr . ether_addr; }
  set source { type ifname . ipv4_addr; }
  map tapmark { type ifname : mark; }
  set owner { type ifname . mark; }
  map unitemised { type ifname : counter; }
  map bwcap { type ifname : limit; }
  map bwhit { type ifname : counter; }
  map cpscap { type ifname : limit; }
  map cpshit { type ifname : counter; }
  map opened { type ifname : counter; }
  set conns { type ifname; flags dynamic; size 65536; }
  set dnsallow { type ifname . ipv4_addr; flags timeout; size 65536; }
  set secretdst { type ifname . ipv4_addr; flags timeout; size 65536; }
  set denied { type ifname . ipv4_addr . inet_proto . inet_service; flags dynamic; counter; size $denied_size; }
  chain guard {
    type filter hook prerouting priority -150; policy drop;
    iifname "svup" ct state established,related accept
    iifname "svup" drop
    iifname != "sv*" accept
    meta nfproto != ipv4 drop
    iifname . ip saddr . ether saddr != @lease drop
    ct state established,related iifname . ct mark @owner accept
    ct state != new goto deny
    ct mark set iifname map @tapmark
    add @conns { iifname ct count over 4096 } goto deny
    meta l4proto { tcp, udp } th dport 53 iifname . ip daddr != @gateway goto deny
    iifname . ip daddr @gateway accept
    fib daddr type { local, broadcast, multicast } goto deny
    ip daddr $vm_range goto deny
    iifname . ip daddr @egress accept
    iifname . ip daddr @dnsallow accept
    goto deny
  }
  chain deny {
    meta l4proto { tcp, udp } add @denied { iifname . ip daddr . meta l4proto . th dport } drop
    meta l4proto != { tcp, udp } add @denied { iifname . ip daddr . meta l4proto . 0 } drop
    counter name iifname map @unitemised drop
    drop
  }
  chain output {
    type filter hook output priority -150; policy drop;
    oifname != "sv*" accept
    ct state new ct mark set oifname map @tapmark accept
    ct state established,related oifname . ct mark @owner accept
  }
  chain forward {
    type filter hook forward priority 0; policy drop;
    iifname "sv*" oifname "svup" goto egress_out
    iifname "svup" oifname "sv*" goto reply_in
  }
  chain reply_in {
    ct state established,related oifname . ip daddr @source oifname . ct mark @owner accept
  }
  chain egress_out {
    iifname . ip saddr != @source drop
    iifname . ct mark != @owner drop
    ct state established,related goto egress_caps
    meta l4proto { tcp, udp } th dport 53 drop
    iifname . ip daddr @egress goto egress_caps
    iifname . ip daddr @dnsallow goto egress_caps
    drop
  }
  chain egress_caps {
    ct state new ct status ! confirmed limit name iifname map @cpscap counter name iifname map @cpshit drop
    ct state new ct status ! confirmed counter name iifname map @opened
    limit name iifname map @bwcap counter name iifname map @bwhit drop
    accept
  }
  chain postrouting {
    type nat hook postrouting priority srcnat; policy accept;
    oifname "svup" masquerade
  }
  chain prerouting {
    type nat hook prerouting priority dstnat; policy accept;
    meta nfproto ipv4 tcp dport 443 iifname . ip daddr @secretdst redirect to :15443
  }
}
table arp smolvm {
  set arplease { type ifname . ipv4_addr . ether_addr; }
  chain input {
    type filter hook input priority filter; policy accept;
    iifname "svup" accept
    iifname "sv*" iifname . arp saddr ip . arp saddr ether != @arplease drop
  }
}
""")


@pytest.mark.parametrize(("vm_range", "denied_size"), [
    ("10.213.0.0/16", policy.DENIED_SET_SIZE),
    ("172.30.0.0/20", policy.DENIED_SET_SIZE),
    ("10.213.0.0/16", 16),
])
def test_run_ruleset_text_is_pinned(vm_range: str, denied_size: int) -> None:
    net = ipaddress.IPv4Network(vm_range)
    expected = RUN_RULESET.substitute(vm_range=vm_range, denied_size=denied_size)
    if denied_size == policy.DENIED_SET_SIZE:
        assert policy.run_ruleset(net) == expected
    assert policy.run_ruleset(net, denied_size) == expected
