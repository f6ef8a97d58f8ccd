"""nftables rules for network policies (pure: text in, text or data out).

Two tables, each named after its run:

- ``inet smolvm`` inside the run's own namespace guards every TAP before routing
  (prerouting), so an attempt is judged and counted whether or not a route exists:

  1. replies on connections the host opened (forwards, SSH) pass;
  2. a guest may reach its own gateway (``@gateway``: TAP . host address);
  3. any other address of the namespace (another VM's gateway, the uplink) and the whole VM
     range (other VMs) are denied;
  4. ``nat`` VMs may send to their ``@egress`` networks (TAP . CIDR; ``0.0.0.0/0``
     without ``allow``), which the forward chain lets out through the uplink only;
  5. everything else is denied, and recorded in ``@denied`` (TAP . address . protocol .
     port, with a packet counter): that is ``vm.network.denied``.

  The forward chain only lets TAP traffic out through the uplink, never into another TAP.

- ``ip smolvm-<run>`` in the uplink namespace (``nat`` only): masquerade of the run's uplink
  address, and nothing arriving over the uplink veth may reach that namespace's own
  addresses (the host's other interfaces).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
from collections.abc import Iterable
from typing import Any, Final

from ..errors import NetworkError

RUN_TABLE: Final = "smolvm"
TAP_PREFIX: Final = "sv"
UPLINK_IF: Final = "svup"


def run_ruleset(vm_range: ipaddress.IPv4Network) -> str:
    """The run namespace's table (created once, with the namespace)."""
    return f"""table inet {RUN_TABLE} {{
  set gateway {{ type ifname . ipv4_addr; }}
  set egress {{ type ifname . ipv4_addr; flags interval; }}
  set denied {{ type ifname . ipv4_addr . inet_proto . inet_service; flags dynamic; counter; size 65536; }}
  chain guard {{
    type filter hook prerouting priority -150; policy accept;
    iifname != "{TAP_PREFIX}*" accept
    meta nfproto ipv6 drop
    ct state established,related accept
    iifname . ip daddr @gateway accept
    fib daddr type local goto deny
    ip daddr {vm_range} goto deny
    iifname . ip daddr @egress accept
    goto deny
  }}
  chain deny {{
    meta l4proto {{ tcp, udp }} add @denied {{ iifname . ip daddr . meta l4proto . th dport }} drop
    add @denied {{ iifname . ip daddr . meta l4proto . 0 }} drop
  }}
  chain forward {{
    type filter hook forward priority 0; policy drop;
    ct state established,related accept
    iifname "{TAP_PREFIX}*" oifname "{UPLINK_IF}" accept
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname "{UPLINK_IF}" masquerade
  }}
}}
"""


def uplink_table(run_tag: str) -> str:
    return f"smolvm-{run_tag}"


def uplink_ruleset(run_tag: str, veth: str, run_side_ip: ipaddress.IPv4Address) -> str:
    """The uplink namespace's table for one run: masquerade the run's uplink address, and
    keep it away from the uplink namespace's own addresses."""
    return f"""table ip {uplink_table(run_tag)} {{
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr {run_side_ip} oifname != "{veth}" masquerade
  }}
  chain input {{
    type filter hook input priority filter; policy accept;
    iifname "{veth}" drop
  }}
}}
"""


def _elements(pairs: Iterable[tuple[str, str]]) -> str:
    return ", ".join(f'"{a}" . {b}' for a, b in pairs)


def vm_elements(tap: str, gateway: ipaddress.IPv4Address, egress: Iterable[str]) -> str:
    """nft commands that give one VM its gateway and its egress networks."""
    lines = [f"add element inet {RUN_TABLE} gateway {{ {_elements([(tap, str(gateway))])} }}"]
    nets = list(egress)
    if nets:
        lines.append(f"add element inet {RUN_TABLE} egress {{ {_elements((tap, n) for n in nets)} }}")
    return "\n".join(lines) + "\n"


def vm_removal(tap: str, gateway: ipaddress.IPv4Address, egress: Iterable[str],
               denied: Iterable[tuple[str, int, str]]) -> str:
    """nft commands that forget one VM (so the next VM on its TAP starts clean)."""
    lines = [f"delete element inet {RUN_TABLE} gateway {{ {_elements([(tap, str(gateway))])} }}"]
    nets = list(egress)
    if nets:
        lines.append(f"delete element inet {RUN_TABLE} egress {{ {_elements((tap, n) for n in nets)} }}")
    for addr, port, proto in denied:
        lines.append(f'delete element inet {RUN_TABLE} denied {{ "{tap}" . {addr} . {proto} . {port} }}')
    return "\n".join(lines) + "\n"


def egress_networks(policy: str, allow: tuple[str, ...]) -> list[str]:
    """Where a VM may send to through the uplink: nothing, its allow list, or anywhere (IPv4)."""
    if policy != "nat":
        return []
    nets = [n for n in allow if ipaddress.ip_network(n).version == 4]
    return nets if allow else ["0.0.0.0/0"]


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
    try:
        data = json.loads(nft_json)
    except ValueError as exc:
        raise NetworkError(f"nft printed something that is not JSON: {exc}") from exc
    out: dict[str, list[Denied]] = {}
    for item in data.get("nftables", []):
        for elem in item.get("set", {}).get("elem", []):
            packets = 0
            if isinstance(elem, dict) and "elem" in elem:
                packets = int((elem["elem"].get("counter") or {}).get("packets", 0))
                elem = elem["elem"]["val"]
            concat = elem.get("concat") if isinstance(elem, dict) else None
            if not concat or len(concat) != 4:
                continue
            tap, dest, proto, port = concat
            out.setdefault(str(tap), []).append(Denied(str(dest), int(port), _proto_name(proto), packets))
    for rows in out.values():
        rows.sort()
    return out
