"""``vm.network``: what a VM's network policy is and did, read live from its NIC."""

from __future__ import annotations

from .hub import VMNetwork
from .policy import Denied


class NetworkState:
    """``vm.network``: the policy in force, the VM's addresses, and the egress attempts the
    policy dropped (``denied``: ``(destination, port, protocol)`` tuples, read live)."""

    def __init__(self, policy: str, allow: tuple[str, ...] = (), uplink: str | None = None,
                 net: VMNetwork | None = None) -> None:
        self.policy = policy
        self.allow = allow
        self.uplink = uplink
        self._net = net  # the NIC, once the VM has one

    def __repr__(self) -> str:
        return f"<NetworkState {self.policy}{' allow=' + ','.join(self.allow) if self.allow else ''}>"

    @property
    def guest_ip(self) -> str | None:
        return str(self._net.addr.guest_ip) if self._net else None

    @property
    def host_ip(self) -> str | None:
        """The guest's gateway: the host side of its TAP, inside the run's namespace."""
        return str(self._net.addr.host_ip) if self._net else None

    @property
    def tap(self) -> str | None:
        return self._net.addr.tap if self._net else None

    @property
    def netns(self) -> str | None:
        return self._net.netns if self._net else None

    @property
    def denied(self) -> list[tuple[str, int, str]]:
        return [d.as_tuple() for d in self.denied_details()]

    def denied_details(self) -> list[Denied]:
        """Like ``denied``, with the number of packets dropped for each."""
        return self._net.denied() if self._net else []

    @property
    def unitemised(self) -> int:
        """Packets denied while the run's denial ledger was full (dropped, not in ``denied``)."""
        return self._net.counters().get("unitemised", 0) if self._net else 0

    @property
    def capped(self) -> dict[str, int]:
        """Packets the egress caps dropped: ``bandwidth`` and new ``connections``."""
        found = self._net.counters() if self._net else {}
        return {"bandwidth": found.get("bandwidth", 0), "connections": found.get("connections", 0)}
