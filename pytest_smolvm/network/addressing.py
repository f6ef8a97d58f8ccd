"""Per-VM addressing inside the run's own network namespace (pure).

Each VM gets a *slot*. Slot ``n`` owns the /30 at ``base + 4n``: ``.1`` is the host side
(the VM's gateway, where forwards and SSH connect), ``.2`` is the guest. Addresses exist
only inside the namespace the run creates, so they cannot collide with the host's networks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
from typing import Final

from ..errors import ConfigError

DEFAULT_BASE: Final = ipaddress.IPv4Network("10.213.0.0/16")
IFNAMSIZ: Final = 15  # Linux interface names: 15 characters plus NUL


@dataclasses.dataclass(frozen=True)
class Addressing:
    """Everything one VM's NIC needs."""

    slot: int
    subnet: ipaddress.IPv4Network
    host_ip: ipaddress.IPv4Address
    guest_ip: ipaddress.IPv4Address
    mac: str
    tap: str


def slot_count(base: ipaddress.IPv4Network = DEFAULT_BASE) -> int:
    """How many /30 slots ``base`` holds."""
    if base.prefixlen > 30:
        raise ConfigError(f"invalid network base {base}: needs room for at least one /30")
    return int(base.num_addresses // 4)


def addressing(slot: int, run_id: str, base: ipaddress.IPv4Network = DEFAULT_BASE) -> Addressing:
    """The addresses, MAC and TAP name of ``slot`` in run ``run_id``."""
    if not 0 <= slot < slot_count(base):
        raise ConfigError(f"invalid slot {slot}: {base} has slots 0..{slot_count(base) - 1}")
    net = ipaddress.IPv4Network((int(base.network_address) + 4 * slot, 30))
    run_tag = hashlib.sha256(run_id.encode()).digest()[:2]
    # Locally administered, unicast (0x02); 0x53 0x56 = "SV"; then the run and the slot.
    mac = ":".join(f"{b:02x}" for b in (0x02, 0x53, run_tag[0], run_tag[1], slot >> 8 & 0xFF, slot & 0xFF))
    tap = f"sv{run_id[:6]}{slot:05x}"[:IFNAMSIZ]
    return Addressing(slot, net, net.network_address + 1, net.network_address + 2, mac, tap)
