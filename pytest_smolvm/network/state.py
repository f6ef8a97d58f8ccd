"""``vm.network``: what a VM's network policy is and did, read live from its NIC; and live
changes of that policy (``vm.network.set``), held to the run's ceiling."""

from __future__ import annotations

from collections.abc import Iterable

from ..errors import ConfigError, NetworkError
from .hub import VMNetwork
from .names import allow_entry
from .policy import NETWORK_POLICIES, Denied, network_rank


class NetworkState:
    """``vm.network``: the policy in force, the VM's addresses, the egress attempts the
    policy dropped (``denied``: ``(destination, port, protocol)`` tuples, read live) and the
    lookups its resolver denied (``denied_names``)."""

    def __init__(self, policy: str, allow: tuple[str, ...] = (), uplink: str | None = None,
                 net: VMNetwork | None = None) -> None:
        self.policy = policy
        self.allow = allow
        self.uplink = uplink
        #: ``(policy, where it was given)``: what :meth:`set` may not go beyond (the pytest
        #: layer sets the run's ``--smolvm-network``; None: no ceiling).
        self.ceiling: tuple[str, str] | None = None
        self._net = net  # the NIC, once the VM has one

    def __repr__(self) -> str:
        return f"<NetworkState {self.policy}{' allow=' + ','.join(self.allow) if self.allow else ''}>"

    def set(self, policy: str | None = None, allow: Iterable[str] | None = None) -> None:
        """Change the live VM's policy (``none``, ``isolated``, ``nat``) and/or ``allow``
        (networks and names; given alone, it keeps the policy). Tightening is immediate for
        new packets and open connections; ``none`` drops every packet. A loosening beyond the
        run's ceiling raises :class:`NetworkError` and changes nothing."""
        new_policy = self.policy if policy is None else str(policy).strip().lower()
        if new_policy not in NETWORK_POLICIES:
            raise ConfigError(f"invalid policy={policy!r} for vm.network.set(): expected one of "
                              f"{', '.join(NETWORK_POLICIES)}")
        if allow is None:
            new_allow = self.allow if new_policy == "nat" else ()
        else:
            entries = [allow] if isinstance(allow, str) else list(allow)
            new_allow = tuple(dict.fromkeys(allow_entry(e) for e in entries))
        if new_allow and new_policy != "nat":
            raise ConfigError(f"invalid allow={list(new_allow)!r} for vm.network.set(): allow only applies "
                              f"to policy='nat' (policy={new_policy!r})")
        if self.ceiling is not None and network_rank(new_policy, new_allow) > network_rank(self.ceiling[0]):
            cap, source = self.ceiling
            raise NetworkError(f"vm.network.set(policy={new_policy!r}, allow={list(new_allow)}) would loosen the "
                               f"network past {source}={cap}; the run's ceiling holds live changes too")
        if self._net is None:
            if new_policy == "none" and self.policy == "none":
                return
            raise NetworkError(f"vm.network.set(policy={new_policy!r}) needs a VM started with a NIC "
                               f"(network='isolated' or 'nat'); this one has network={self.policy!r}")
        self._net.change(new_policy, new_allow)
        self.policy, self.allow = new_policy, new_allow

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
    def denied_names(self) -> list[str]:
        """Names the VM's resolver would not resolve (not allowed, or not a host name; the
        latter shown escaped and cut), sorted; at most ``dns.LEDGER_SIZE``."""
        return [name for name, _ in self.denied_name_counts()]

    def denied_name_counts(self) -> list[tuple[str, int]]:
        """Like ``denied_names``, with how many times each was asked."""
        resolver = self._net.resolver if self._net else None
        return resolver.ledger.names() if resolver else []

    @property
    def dns_allowed(self) -> list[str]:
        """Addresses the guest may reach now because an allowed name's answer gave them
        (each until its answer's TTL runs out; read live from the run's nft set)."""
        return self._net.dns_allowed() if self._net and self._net.final_denied is None else []

    @property
    def dns(self) -> dict[str, int]:
        """The resolver's counters: ``answered``, ``rate_refused`` (over the per-VM query rate),
        ``unitemised`` (denied lookups beyond the ledger), ``malformed``, ``upstream_failures``."""
        resolver = self._net.resolver if self._net else None
        if resolver is None:
            return {}
        ledger = resolver.ledger
        return {"answered": resolver.answered, "rate_refused": ledger.rate_refused, "unitemised": ledger.unitemised,
                "malformed": ledger.malformed, "upstream_failures": ledger.upstream_failures}

    @property
    def unitemised(self) -> int:
        """Packets denied while the run's denial ledger was full (dropped, not in ``denied``)."""
        return self._net.counters().get("unitemised", 0) if self._net else 0

    @property
    def capped(self) -> dict[str, int]:
        """Packets the egress caps dropped: ``bandwidth`` and new ``connections``."""
        found = self._net.counters() if self._net else {}
        return {"bandwidth": found.get("bandwidth", 0), "connections": found.get("connections", 0)}

    @property
    def secret_events(self) -> list[str]:
        """What the VM's secrets proxy refused (``secret API_KEY sent to other.test: refused``,
        a real host whose certificate did not verify, ...), in order; at most ``proxy.LEDGER_SIZE``."""
        proxy = self._net.proxy if self._net else None
        return list(proxy.book.snapshot()["ledger"]) if proxy else []

    @property
    def secrets_proxy(self) -> dict[str, int]:
        """The secrets proxy's counters: ``forwarded`` requests, ``refused`` ones, ``failed``
        upstreams, ``rate_refused`` requests and ``conns_refused`` connections (over the caps)."""
        proxy = self._net.proxy if self._net else None
        if proxy is None:
            return {}
        return {k: v for k, v in proxy.book.snapshot().items() if k != "ledger"}
