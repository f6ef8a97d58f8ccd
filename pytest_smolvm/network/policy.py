"""nftables rules for network policies (pure: text in, text or data out).

Three tables, each named after its run:

- ``inet smolvm`` inside the run's own namespace judges every TAP (``sv*``) packet, and
  fails closed: both base chains drop what no rule positively accepts.

  ``guard`` (prerouting, after conntrack; the uplink ``svup`` only brings replies):

  1. a packet whose TAP . source address . source MAC is not that VM's lease (``@lease``)
     is dropped before anything else, established traffic included;
  2. established/related traffic passes only if its connection belongs to that TAP
     (``@owner``: TAP . ct mark; the mark is stamped from ``@tapmark`` when a TAP's guest
     opens a connection, or in ``output`` when the host opens one towards it);
  3. a guest may reach its own gateway (``@gateway``: TAP . host address), once it has fewer
     than ``MAX_CONNS`` connections tracked (``@conns``: ``ct count`` per TAP; the conntrack
     table is shared with the host, so a guest must not fill it, by gateway or egress);
  4. any other address of the namespace (another VM's gateway, the uplink), its broadcast
     and multicast (``255.255.255.255``, ``224.0.0.0/4``: else delivered to the namespace's
     own sockets) and the whole VM range (other VMs) are denied;
  5. DNS (UDP/TCP port 53) goes to the VM's own gateway (the run's resolver) or nowhere,
     whatever the policy otherwise allows;
  6. ``nat`` VMs may send to their ``@egress`` networks (TAP . CIDR, never link-local
     169.254.0.0/16 unless an ``allow`` CIDR inside it names it), and to the addresses the
     run's resolver allowed when it answered an allowed name (``@dnsallow``: TAP . address,
     each element timing out with its answer's TTL);
  7. everything else is denied.

  ``deny`` records the attempt in ``@denied`` (TAP . address . protocol . port, with a
  packet counter): that is ``vm.network.denied``. The ledger is telemetry only: when it
  cannot record (the set is full) the packet is counted in the TAP's ``unitemised`` counter
  instead, and dropped all the same.

  ``forward`` lets TAP traffic out through the uplink only, re-checking the VM's source and
  connection owner, and for a new connection its egress networks and name-allowed addresses
  (a connection, once accepted, lives on after its address's element times out, as in
  Cilium; a live tightening flushes the VM's conntrack entries instead), then its caps (named ``limit`` objects per TAP:
  new connections per second, bytes per second; drops are counted per TAP, and so are the new
  connections let out, ``opened``). Replies come
  back only into the TAP that owns the connection.

- ``arp smolvm`` in the run namespace: ARP from a TAP whose sender address and MAC are not
  that VM's lease (``@arplease``, added and removed with ``@lease``) is dropped, so a guest
  cannot fill the neighbour table (shared with the host, ``gc_thresh3``) with made-up
  senders; the inet table never sees ARP.

- ``ip smolvm-<run>`` in the uplink namespace (``nat`` only): masquerade of the run's uplink
  address, and nothing arriving over the uplink veth may reach that namespace's own
  addresses (the host's other interfaces), nor its broadcast and multicast: dropped at
  prerouting -300, before a DNAT of the host's (dstnat, -100) could forward it to a service.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import re
from collections.abc import Iterable
from typing import Any, Final

from ..errors import NetworkError
from .names import is_network

NETWORK_POLICIES: Final = ("none", "isolated", "nat")
#: Egress caps of a networked VM: KiB/s through the uplink, new connections per second.
DEFAULT_EGRESS_KIB_PER_S: Final = 10240
DEFAULT_EGRESS_CONNS_PER_S: Final = 50
RUN_TABLE: Final = "smolvm"
TAP_PREFIX: Final = "sv"
UPLINK_IF: Final = "svup"
#: Entries of the run's denial ledger; beyond it denials are only counted.
DENIED_SET_SIZE: Final = 65536
LINK_LOCAL: Final = ipaddress.IPv4Network("169.254.0.0/16")
#: Per-TAP counters (named ``<kind>_<tap>``): denials the ledger could not itemise, and
#: packets dropped by the bandwidth and the new-connection caps, and the new connections let out.
COUNTERS: Final = {"unitemised": "nolog", "bandwidth": "bwhit", "connections": "cpshit", "opened": "opened"}
#: Addresses DNS answers allowed, for every VM of a run (each VM's resolver holds its own
#: share to ``resolver.MAX_ADDRESSES``); a full set makes answers SERVFAIL, never open.
DNS_ALLOW_SET_SIZE: Final = 65536
#: Connections a VM's guest may have tracked at once (gateway and egress alike): the
#: conntrack table is shared with the host (``nf_conntrack_max``).
MAX_CONNS: Final = 4096
#: Where nft redirects a VM's HTTPS to its secrets' hosts: the proxy on the VM's gateway.
SECRETS_PROXY_PORT: Final = 15443
MIN_BURST_BYTES: Final = 128 * 1024  # above one GSO packet (64 KiB) at any rate, or TCP would stall


def network_rank(network: str, allow: Iterable[str] = ()) -> int:
    """Order of network policies: ``none`` 0 < ``isolated`` 1 < ``nat`` + allow 2 < ``nat`` 3."""
    if network == "none":
        return 0
    if network == "isolated":
        return 1
    return 2 if tuple(allow) else 3


@dataclasses.dataclass(frozen=True)
class Caps:
    """A VM's egress caps: KiB per second through the uplink, new connections per second.

    The kernel's byte bucket holds one second at the cap plus ``burst_bytes``
    (``tokens_max = unit * (rate + burst) / rate`` in nft_limit.c), so over ``t`` seconds at
    most ``kib_per_s * 1024 * (t + 1) + burst_bytes`` bytes get out; new connections get
    ``conns_per_s`` per second plus a burst of as many.
    """

    kib_per_s: int
    conns_per_s: int

    @property
    def burst_bytes(self) -> int:
        return MIN_BURST_BYTES

    def describe(self) -> str:
        return f"egress caps {self.kib_per_s} KiB/s, {self.conns_per_s} new connections/s"


def run_ruleset(vm_range: ipaddress.IPv4Network, denied_size: int = DENIED_SET_SIZE) -> str:
    """The run namespace's tables (created once, with the namespace)."""
    inet = [_run_sets(denied_size), _guard_chain(vm_range), _deny_chain(), _output_chain(), *_forward_chains(),
            _chain("postrouting", "type nat hook postrouting priority srcnat; policy accept;",
                   f'oifname "{UPLINK_IF}" masquerade'),
            _chain("prerouting", "type nat hook prerouting priority dstnat; policy accept;",
                   f"meta nfproto ipv4 tcp dport 443 iifname . ip daddr @secretdst redirect to :{SECRETS_PROXY_PORT}")]
    return f"table inet {RUN_TABLE} {{\n" + "".join(inet) + "}\n" + _arp_table()


def _chain(name: str, *rules: str) -> str:
    body = "".join(f"    {rule}\n" for rule in rules)
    return f"  chain {name} {{\n{body}  }}\n"


def _run_sets(denied_size: int) -> str:
    """The sets and maps the chains look up, filled per VM by :func:`vm_elements`."""
    decls = [
        "set gateway { type ifname . ipv4_addr; }",
        "set egress { type ifname . ipv4_addr; flags interval; }",
        "set lease { type ifname . ipv4_addr . ether_addr; }",
        "set source { type ifname . ipv4_addr; }",
        "map tapmark { type ifname : mark; }",
        "set owner { type ifname . mark; }",
        "map unitemised { type ifname : counter; }",
        "map bwcap { type ifname : limit; }",
        "map bwhit { type ifname : counter; }",
        "map cpscap { type ifname : limit; }",
        "map cpshit { type ifname : counter; }",
        "map opened { type ifname : counter; }",
        "set conns { type ifname; flags dynamic; size 65536; }",
        f"set dnsallow {{ type ifname . ipv4_addr; flags timeout; size {DNS_ALLOW_SET_SIZE}; }}",
        f"set secretdst {{ type ifname . ipv4_addr; flags timeout; size {DNS_ALLOW_SET_SIZE}; }}",
        "set denied { type ifname . ipv4_addr . inet_proto . inet_service; flags dynamic; counter; "
        f"size {denied_size}; }}",
    ]
    return "".join(f"  {d}\n" for d in decls)


def _guard_chain(vm_range: ipaddress.IPv4Network) -> str:
    """Steps 1-7 of the module docstring, in that order."""
    return _chain(
        "guard",
        "type filter hook prerouting priority -150; policy drop;",
        f'iifname "{UPLINK_IF}" ct state established,related accept',
        f'iifname "{UPLINK_IF}" drop',
        f'iifname != "{TAP_PREFIX}*" accept',
        "meta nfproto != ipv4 drop",
        "iifname . ip saddr . ether saddr != @lease drop",
        "ct state established,related iifname . ct mark @owner accept",
        "ct state != new goto deny",
        "ct mark set iifname map @tapmark",
        f"add @conns {{ iifname ct count over {MAX_CONNS} }} goto deny",
        "meta l4proto { tcp, udp } th dport 53 iifname . ip daddr != @gateway goto deny",
        "iifname . ip daddr @gateway accept",
        "fib daddr type { local, broadcast, multicast } goto deny",
        f"ip daddr {vm_range} goto deny",
        "iifname . ip daddr @egress accept",
        "iifname . ip daddr @dnsallow accept",
        "goto deny",
    )


def _deny_chain() -> str:
    """Record in the ledger if it can, count if it cannot, drop either way."""
    return _chain(
        "deny",
        "meta l4proto { tcp, udp } add @denied { iifname . ip daddr . meta l4proto . th dport } drop",
        "meta l4proto != { tcp, udp } add @denied { iifname . ip daddr . meta l4proto . 0 } drop",
        "counter name iifname map @unitemised drop",
        "drop",
    )


def _output_chain() -> str:
    return _chain(
        "output",
        "type filter hook output priority -150; policy drop;",
        f'oifname != "{TAP_PREFIX}*" accept',
        "ct state new ct mark set oifname map @tapmark accept",
        "ct state established,related oifname . ct mark @owner accept",
    )


def _forward_chains() -> list[str]:
    """TAP to uplink through the egress checks and caps; replies back only to the owner TAP."""
    return [
        _chain("forward",
               "type filter hook forward priority 0; policy drop;",
               f'iifname "{TAP_PREFIX}*" oifname "{UPLINK_IF}" goto egress_out',
               f'iifname "{UPLINK_IF}" oifname "{TAP_PREFIX}*" goto reply_in'),
        _chain("reply_in",
               "ct state established,related oifname . ip daddr @source oifname . ct mark @owner accept"),
        _chain("egress_out",
               "iifname . ip saddr != @source drop",
               "iifname . ct mark != @owner drop",
               "ct state established,related goto egress_caps",
               "meta l4proto { tcp, udp } th dport 53 drop",
               "iifname . ip daddr @egress goto egress_caps",
               "iifname . ip daddr @dnsallow goto egress_caps",
               "drop"),
        _chain("egress_caps",
               "ct state new ct status ! confirmed limit name iifname map @cpscap "
               "counter name iifname map @cpshit drop",
               "ct state new ct status ! confirmed counter name iifname map @opened",
               "limit name iifname map @bwcap counter name iifname map @bwhit drop",
               "accept"),
    ]


def _arp_table() -> str:
    return f"table arp {RUN_TABLE} {{\n  set arplease {{ type ifname . ipv4_addr . ether_addr; }}\n" + _chain(
        "input",
        "type filter hook input priority filter; policy accept;",
        f'iifname "{UPLINK_IF}" accept',
        f'iifname "{TAP_PREFIX}*" iifname . arp saddr ip . arp saddr ether != @arplease drop',
    ) + "}\n"


def uplink_table(run_tag: str) -> str:
    return f"smolvm-{run_tag}"


def uplink_ruleset(run_tag: str, veth: str, run_side_ip: ipaddress.IPv4Address) -> str:
    """The uplink namespace's table for one run: masquerade the run's uplink address, and
    keep it away from the uplink namespace's own addresses, judged before any DNAT there
    (Docker ``-p``, libvirt, NodePorts: dstnat at -100) can turn them into forwarded traffic."""
    return f"""table ip {uplink_table(run_tag)} {{
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr {run_side_ip} oifname != "{veth}" masquerade
  }}
  chain prerouting {{
    type filter hook prerouting priority -300; policy accept;
    iifname "{veth}" fib daddr type {{ local, broadcast, multicast }} drop
  }}
  chain input {{
    type filter hook input priority filter; policy accept;
    iifname "{veth}" drop
  }}
}}
"""


PASTA_GUARD_TABLE: Final = "smolvm_uplink"


def pasta_guard_ruleset(host_addresses: Iterable[str]) -> str:
    """Without root, the uplink is pasta, whose traffic leaves from the user's own sockets in the
    namespace pasta runs in (the host's): keep the run's VMs away from that namespace's own
    addresses (as ``uplink_ruleset`` does for root), and from broadcast and multicast."""
    nets = [ipaddress.IPv4Network(a) for a in host_addresses] + [ipaddress.IPv4Network("127.0.0.0/8"),
                                                                  ipaddress.IPv4Network("224.0.0.0/4")]
    addrs = [str(n) for n in ipaddress.collapse_addresses(nets)] + ["255.255.255.255"]
    return f"""table ip {PASTA_GUARD_TABLE} {{
  chain forward {{
    type filter hook forward priority -10; policy accept;
    oifname "{UPLINK_IF}" ip daddr {{ {", ".join(addrs)} }} drop
  }}
}}
"""


def _elements(pairs: Iterable[tuple[str, str]]) -> str:
    return ", ".join(f'"{a}" . {b}' for a, b in pairs)


def _vm_sets(tap: str, gateway: ipaddress.IPv4Address, guest: ipaddress.IPv4Address, mac: str,
             mark: int, egress: Iterable[str]) -> list[tuple[str, str]]:
    """(set or map, elements) of one VM."""
    out = [("gateway", _elements([(tap, str(gateway))])),
           ("lease", f'"{tap}" . {guest} . {mac}'),
           ("source", _elements([(tap, str(guest))])),
           ("tapmark", f'"{tap}" : {mark}'),
           ("owner", f'"{tap}" . {mark}')]
    out += [(m, f'"{tap}" : "{obj}_{tap}"') for m, obj in
            (("unitemised", "nolog"), ("bwcap", "bw"), ("bwhit", "bwhit"), ("cpscap", "cps"), ("cpshit", "cpshit"),
             ("opened", "opened"))]
    nets = list(egress)
    if nets:
        out.append(("egress", _elements((tap, n) for n in nets)))
    return out


def vm_elements(tap: str, gateway: ipaddress.IPv4Address, guest: ipaddress.IPv4Address, mac: str, mark: int,
                egress: Iterable[str], caps: Caps) -> str:
    """nft commands that give one VM its lease, gateway, egress networks, connection mark,
    caps and counters (one transaction: all or nothing)."""
    t = f"inet {RUN_TABLE}"
    lines = [f"add counter {t} {obj}_{tap}" for obj in COUNTERS.values()]
    lines.append(f"add limit {t} bw_{tap} {{ rate over {caps.kib_per_s} kbytes/second "
                 f"burst {caps.burst_bytes} bytes; }}")
    lines.append(f"add limit {t} cps_{tap} {{ rate over {caps.conns_per_s}/second burst {caps.conns_per_s} packets; }}")
    lines += [f"add element {t} {name} {{ {elems} }}" for name, elems in
              _vm_sets(tap, gateway, guest, mac, mark, egress)]
    lines.append(f'add element arp {RUN_TABLE} arplease {{ "{tap}" . {guest} . {mac} }}')
    return "\n".join(lines) + "\n"


def vm_removal(tap: str, gateway: ipaddress.IPv4Address, guest: ipaddress.IPv4Address, mac: str, mark: int,
               egress: Iterable[str], denied: Iterable[tuple[str, int, str]], leased: bool = True) -> str:
    """nft commands that forget one VM (so the next VM on its TAP starts clean); ``leased``
    False: its lease is already gone (a live change to ``none`` withdrew it)."""
    t = f"inet {RUN_TABLE}"
    lines = [f"delete element {t} {name} {{ {elems} }}" for name, elems in
             _vm_sets(tap, gateway, guest, mac, mark, egress) if leased or name != "lease"]
    if leased:
        lines.append(f'delete element arp {RUN_TABLE} arplease {{ "{tap}" . {guest} . {mac} }}')
    lines += [f"delete counter {t} {obj}_{tap}" for obj in COUNTERS.values()]
    lines += [f"delete limit {t} bw_{tap}", f"delete limit {t} cps_{tap}"]
    lines += [f'delete element {t} denied {{ "{tap}" . {addr} . {proto} . {port} }}' for addr, port, proto in denied]
    return "\n".join(lines) + "\n"


def live_change(tap: str, guest: ipaddress.IPv4Address, mac: str, old: tuple[str, list[str]],
                new: tuple[str, list[str]], dns_allowed: Iterable[str], tighten: bool) -> str:
    """nft commands (one transaction) that move a live VM from ``old`` to ``new``, each a
    ``(policy, egress networks)``: its egress networks follow; under ``none`` its lease goes
    (every packet from the TAP is dropped before anything else, established ones too, and its
    ARP); a tightening also forgets the addresses earlier DNS answers allowed
    (``dns_allowed``): the guest resolves again under the new policy."""
    t = f"inet {RUN_TABLE}"
    (old_policy, old_nets), (new_policy, new_nets) = old, new
    lines = []
    gone = [n for n in old_nets if n not in new_nets]
    added = [n for n in new_nets if n not in old_nets]
    if gone:
        lines.append(f"delete element {t} egress {{ {_elements((tap, n) for n in gone)} }}")
    if added:
        lines.append(f"add element {t} egress {{ {_elements((tap, n) for n in added)} }}")
    lease = f'"{tap}" . {guest} . {mac}'
    if old_policy != "none" and new_policy == "none":
        lines += [f"delete element {t} lease {{ {lease} }}", f"delete element arp {RUN_TABLE} arplease {{ {lease} }}"]
    elif old_policy == "none" and new_policy != "none":
        lines += [f"add element {t} lease {{ {lease} }}", f"add element arp {RUN_TABLE} arplease {{ {lease} }}"]
    out = "\n".join(lines) + "\n" if lines else ""
    return out + (dns_forget_elements(tap, dns_allowed) if tighten else "")


def dns_allow_elements(tap: str, addresses: dict[str, int]) -> str:
    """nft commands that allow ``tap`` to reach each address for its timeout (seconds); an
    element already there gets the new timeout."""
    elems = ", ".join(f'"{tap}" . {ipaddress.IPv4Address(a)} timeout {int(t)}s' for a, t in sorted(addresses.items()))
    return f"add element inet {RUN_TABLE} dnsallow {{ {elems} }}\n" if addresses else ""


def secret_redirect_elements(tap: str, addresses: dict[str, int]) -> str:
    """nft commands that send ``tap``'s HTTPS to each address (a secret's host) to the
    secrets proxy for its timeout (seconds)."""
    elems = ", ".join(f'"{tap}" . {ipaddress.IPv4Address(a)} timeout {int(t)}s' for a, t in sorted(addresses.items()))
    return f"add element inet {RUN_TABLE} secretdst {{ {elems} }}\n" if addresses else ""


def dns_forget_elements(tap: str, addresses: Iterable[str]) -> str:
    """nft commands that take ``addresses`` out of ``tap``'s name-allowed addresses."""
    return "".join(f'delete element inet {RUN_TABLE} dnsallow {{ "{tap}" . {a} }}\n' for a in sorted(addresses))


def _set_elements(nft_json: str) -> list[tuple[list[Any], int]]:
    """The concatenated elements of ``nft -j list set ...`` output, each with its packet
    counter (0 without one); elements that are not concatenations are skipped."""
    try:
        data = json.loads(nft_json)
    except ValueError as exc:
        raise NetworkError(f"nft printed something that is not JSON: {exc}") from exc
    found = []
    for item in data.get("nftables", []):
        for elem in item.get("set", {}).get("elem", []):
            packets = 0
            if isinstance(elem, dict) and "elem" in elem:
                packets = int((elem["elem"].get("counter") or {}).get("packets", 0))
                elem = elem["elem"]["val"]
            concat = elem.get("concat") if isinstance(elem, dict) else None
            if concat:
                found.append((concat, packets))
    return found


def parse_dns_allowed(nft_json: str) -> dict[str, list[str]]:
    """``nft -j list set inet smolvm dnsallow`` → name-allowed addresses per TAP."""
    out: dict[str, list[str]] = {}
    for concat, _ in _set_elements(nft_json):
        if len(concat) == 2:
            out.setdefault(str(concat[0]), []).append(str(concat[1]))
    return out


def egress_networks(policy: str, allow: tuple[str, ...]) -> list[str]:
    """Where a VM may send to through the uplink (IPv4, merged so the interval set takes
    them): nothing, the networks of its allow list (its names open only the addresses their
    answers give, in ``dnsallow``), or anywhere; never link-local 169.254.0.0/16 (cloud
    metadata services) unless an allow CIDR lies inside it."""
    if policy != "nat":
        return []
    cidrs = [n for n in allow if is_network(n)]  # names reach their answers' addresses only
    wanted = [ipaddress.ip_network(n) for n in cidrs] if allow else [ipaddress.IPv4Network("0.0.0.0/0")]
    nets: list[ipaddress.IPv4Network] = []
    for net in wanted:
        if not isinstance(net, ipaddress.IPv4Network):
            continue
        if net.subnet_of(LINK_LOCAL) or not net.overlaps(LINK_LOCAL):
            nets.append(net)
        else:
            nets.extend(net.address_exclude(LINK_LOCAL))
    return [str(n) for n in ipaddress.collapse_addresses(nets)]


def parse_uplink_tables(nft_json: str) -> dict[str, str]:
    """``nft -j list tables`` (in an uplink namespace) → {table name: run tag} for the
    ``ip smolvm-<run>-root`` tables runs leave there."""
    try:
        data = json.loads(nft_json)
    except ValueError as exc:
        raise NetworkError(f"nft printed something that is not JSON: {exc}") from exc
    out: dict[str, str] = {}
    items = data.get("nftables", []) if isinstance(data, dict) else []
    for item in items if isinstance(items, list) else []:
        table = item.get("table") if isinstance(item, dict) else None
        if not isinstance(table, dict) or table.get("family") != "ip":
            continue
        m = re.fullmatch(r"smolvm-([0-9a-z]+)-root", str(table.get("name", "")))
        if m:
            out[m[0]] = m[1]
    return out


def parse_counters(nft_json: str) -> dict[str, int]:
    """``nft -j list counters table inet smolvm`` → packets per counter name."""
    try:
        data = json.loads(nft_json)
    except ValueError as exc:
        raise NetworkError(f"nft printed something that is not JSON: {exc}") from exc
    return {str(c["name"]): int(c.get("packets", 0)) for item in data.get("nftables", [])
            if isinstance(c := item.get("counter"), dict) and "name" in c}


@dataclasses.dataclass(frozen=True, order=True)
class Denied:
    """One dropped egress attempt: destination, port (0 when the protocol has none), protocol."""

    dest: str
    port: int
    proto: str
    packets: int = dataclasses.field(default=0, compare=False)

    def as_tuple(self) -> tuple[str, int, str]:
        return (self.dest, self.port, self.proto)


PROTOCOLS: Final = {1: "icmp", 2: "igmp", 6: "tcp", 17: "udp", 58: "ipv6-icmp", 132: "sctp"}


def _proto_name(value: Any) -> str:
    if isinstance(value, str):
        return value
    return PROTOCOLS.get(value, str(value)) if isinstance(value, int) else str(value)


def parse_denied(nft_json: str) -> dict[str, list[Denied]]:
    """``nft -j list set inet smolvm denied`` → denied attempts per TAP."""
    out: dict[str, list[Denied]] = {}
    for concat, packets in _set_elements(nft_json):
        if len(concat) == 4:
            tap, dest, proto, port = concat
            out.setdefault(str(tap), []).append(Denied(str(dest), int(port), _proto_name(proto), packets))
    for rows in out.values():
        rows.sort()
    return out
