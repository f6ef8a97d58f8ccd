"""A VM's network: its slot, TAP, addresses and policy, inside the run's own namespace.

Layout of one run (every name carries the run's tag)::

    uplink namespace (root by default)          run namespace smolvm-<run>-<uplink>
    ┌──────────────────────────────┐  veth   ┌───────────────────────────────────────┐
    │ svu<run><uplink> 169.254.x.1 ├─────────┤ svup 169.254.x.2   (nat VMs only)      │
    │ table ip smolvm-<run>-<up>:  │         │ table inet smolvm (policy.py)         │
    │   masquerade, input drop     │         │ sv<run><slot> 10.213.s.1/30 ── TAP ── VM│
    └──────────────────────────────┘         └───────────────────────────────────────┘

Each VM's gateway address also serves DNS: a :class:`~.resolver.VMResolver` thread of the
process that attached the VM, answering only that guest, by its policy (``resolver.py``).

The namespace exists while a VM of the run holds a slot in it: the first lease creates it
and the last release removes it (with the veth and the uplink table). Everything is done
under one host-wide file lock (always with a timeout), so xdist workers and concurrent runs
never race. A TAP is never persistent: it dies with the last descriptor (ours and the VMM's).
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import ipaddress
import os
import re
import secrets
import socket
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Final

from ..errors import NetworkError
from ..host import host_name, stamp_alive
from ..paths import default_runtime_dir, runtime_dir
from . import netns, policy, userns
from .addressing import DEFAULT_BASE, Addressing, addressing, slot_count
from .allocator import Lease, SlotTable, shared_lock
from .credentials import Secret, placeholders
from .dns import NamePolicy
from .names import split_allow
from .policy import DEFAULT_EGRESS_CONNS_PER_S, DEFAULT_EGRESS_KIB_PER_S, Caps, Denied
from .resolver import VMResolver

if TYPE_CHECKING:
    from .proxy import SecretProxy

#: Link-local /30s for the uplink veth: never routed, so never one of the host's networks.
#: Where the guest's setup puts the run CA (and the system bundle it is appended to).
GUEST_CA_BUNDLE: Final = "/etc/ssl/certs/ca-certificates.crt"
UPLINK_BASE: Final = ipaddress.IPv4Network("169.254.0.0/16")
UPLINK_AVOID: Final = ipaddress.IPv4Network("169.254.169.0/24")  # cloud metadata services
NETNS_PREFIX: Final = "smolvm-"
DEFAULT_CAPS: Final = Caps(DEFAULT_EGRESS_KIB_PER_S, DEFAULT_EGRESS_CONNS_PER_S)


def run_tag(run_id: str) -> str:
    """The run as it appears in namespace, interface and table names (8 safe characters).

    A run is a run id *in a runtime directory* (the slot table, the lock and the reaper's
    judgement live there), but namespace names (``/run/netns``) and the uplink's veth and table
    are host-wide. Two runtime directories on one host with the same ``SMOLVM_RUN_ID`` (two CI
    jobs given the pipeline's id) would otherwise share a namespace while keeping separate slot
    tables: TAP names collide, and one run's last VM removes the namespace or uplink veth the
    other still uses. So the tag is the run id itself (readable) only in the default runtime
    directory, and otherwise a digest of the host name, the runtime directory and the run id."""
    default = runtime_dir() == _secure_default()
    if default and re.fullmatch(r"[0-9a-z]{1,8}", run_id):
        return run_id
    if default:
        return hashlib.sha256(run_id.encode()).hexdigest()[:8]
    return hashlib.sha256(f"{host_name()}\0{runtime_dir()}\0{run_id}".encode()).hexdigest()[:8]


def _secure_default() -> Path:
    """The default runtime directory as :func:`runtime_dir` returns it (parents resolved)."""
    return Path(os.path.realpath(default_runtime_dir()))


def uplink_tag(uplink: str | None) -> str:
    return "root" if not uplink else hashlib.sha256(uplink.encode()).hexdigest()[:4]


def namespace_name(run_id: str, uplink: str | None) -> str:
    return f"{NETNS_PREFIX}{run_tag(run_id)}-{uplink_tag(uplink)}"


def uplink_names(run_id: str, uplink: str | None) -> tuple[str, str]:
    """(veth end in the uplink namespace, uplink nft table name)."""
    tag = f"{run_tag(run_id)}{uplink_tag(uplink)[:4]}"
    return f"svu{tag}"[:15], policy.uplink_table(f"{run_tag(run_id)}-{uplink_tag(uplink)}")


def table_path(run_id: str) -> Path:
    return runtime_dir() / f"{run_id}.net.json"


def lock_path() -> Path:
    return runtime_dir() / "net.lock"


def slot_table(run_id: str) -> SlotTable:
    runtime_dir().mkdir(parents=True, exist_ok=True)
    return SlotTable(table_path(run_id), run_id, slot_count(DEFAULT_BASE), lock_path=lock_path())


@dataclasses.dataclass
class VMNetwork:
    """One VM's place in its run's network. Created by :func:`attach`, ended by :meth:`close`."""

    vm: str
    run_id: str
    policy: str
    allow: tuple[str, ...]
    uplink: str | None
    netns: str
    addr: Addressing
    lease: Lease
    tap_fd: int
    egress: list[str]
    caps: Caps
    mark: int
    dns_upstream: tuple[str, ...] = ()
    resolver: VMResolver | None = None
    #: env name -> Secret, and the guest's placeholders for them (fresh per VM).
    secrets: dict[str, Secret] = dataclasses.field(default_factory=dict, repr=False)
    placeholders: dict[str, str] = dataclasses.field(default_factory=dict, repr=False)
    proxy: SecretProxy | None = None
    final_denied: list[Denied] | None = None
    final_counters: dict[str, int] | None = None
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    @property
    def mac(self) -> str:
        return self.addr.mac

    def guest_setup(self) -> dict[str, object]:
        """What the guest agent needs to configure its NIC (the ``setup`` op's ``net``)."""
        return {"mac": self.addr.mac, "address": f"{self.addr.guest_ip}/{self.addr.subnet.prefixlen}",
                "gateway": str(self.addr.host_ip), "nameserver": str(self.addr.host_ip)}

    def start_resolver(self) -> None:
        """Serve DNS to the guest on its gateway (the run's resolver for this VM), and with
        secrets, its secrets proxy (``proxy.py``; h11 is imported only then)."""
        if self.secrets:
            try:
                from .proxyconn import serve_connection
            except ImportError as exc:
                raise NetworkError(f"{self.vm}: secrets need the h11 package (Debian: python3-h11): {exc}") from exc
            from .proxy import SecretProxy as Proxy

            self.placeholders = placeholders(self.secrets)
            self.proxy = Proxy(self.vm, self.netns, self.uplink, str(self.addr.host_ip), str(self.addr.guest_ip),
                               self.secrets, self.placeholders, serve_connection)
        nets, names = split_allow(self.allow)
        hosts = self.proxy.hosts if self.proxy else frozenset()
        self.resolver = VMResolver(self.vm, self.netns, self.uplink, str(self.addr.host_ip), str(self.addr.guest_ip),
                                   NamePolicy.of(self.policy, names, bool(nets)), self.dns_upstream,
                                   self.allow_addresses, hosts, self.redirect_https if self.proxy else None)

    def guest_env(self) -> dict[str, str]:
        """What the guest's commands get: the placeholders, and the run CA for Python clients."""
        if not self.placeholders:
            return {}
        return {**self.placeholders, "SSL_CERT_FILE": GUEST_CA_BUNDLE, "REQUESTS_CA_BUNDLE": GUEST_CA_BUNDLE}

    def redirect_https(self, addresses: dict[str, int]) -> None:
        """Send the guest's HTTPS to ``addresses`` (a secret's host) to its secrets proxy."""
        if self.proxy is not None:
            self.proxy.redirect(addresses)
        netns.run(self.netns, ["nft", "-f", "-"], input=policy.secret_redirect_elements(self.addr.tap, addresses))

    def allow_addresses(self, addresses: dict[str, int]) -> None:
        """Let the guest reach ``addresses`` (address -> seconds): a DNS answer allowed them."""
        netns.run(self.netns, ["nft", "-f", "-"], input=policy.dns_allow_elements(self.addr.tap, addresses))

    def dns_allowed(self) -> list[str]:
        """Addresses the guest may reach because an allowed name resolved to them (live)."""
        res = netns.run(self.netns, ["nft", "-j", "list", "set", "inet", policy.RUN_TABLE, "dnsallow"])
        return policy.parse_dns_allowed(res.stdout).get(self.addr.tap, [])

    def denied(self) -> list[Denied]:
        """Egress attempts the policy dropped, read from the run's nft set (live)."""
        if self.final_denied is not None:
            return list(self.final_denied)
        res = netns.run(self.netns, ["nft", "-j", "list", "set", "inet", policy.RUN_TABLE, "denied"])
        return policy.parse_denied(res.stdout).get(self.addr.tap, [])

    def counters(self) -> dict[str, int]:
        """Packets dropped without an itemised denial (``unitemised``, the ledger was full),
        and by the ``bandwidth`` and new-``connections`` caps (live)."""
        if self.final_counters is not None:
            return dict(self.final_counters)
        res = netns.run(self.netns, ["nft", "-j", "list", "counters", "table", "inet", policy.RUN_TABLE])
        found = policy.parse_counters(res.stdout)
        return {kind: found.get(f"{obj}_{self.addr.tap}", 0) for kind, obj in policy.COUNTERS.items()}

    def connect(self, port: int, timeout: float = 10.0) -> socket.socket:
        """A TCP connection from the VM's gateway to ``port`` on the guest."""
        try:
            return netns.connect(self.netns, (str(self.addr.guest_ip), port), timeout)
        except OSError as exc:
            raise NetworkError(f"{self.vm}: cannot connect to guest port {port} at {self.addr.guest_ip} "
                               f"(namespace {self.netns}): {exc}") from exc

    def close(self) -> None:
        """Forget this VM (nft elements, slot) and close our TAP descriptor; the last VM of
        the namespace removes it. Call after the VMM is dead. Idempotent."""
        with self._lock:
            if self.final_denied is not None:
                return
            if self.resolver is not None:
                self.resolver.close()
            if self.proxy is not None:
                self.proxy.close()
            try:
                self.final_denied = self.denied()
            except NetworkError:
                self.final_denied = []
            try:
                self.final_counters = self.counters()
            except NetworkError:
                self.final_counters = {}
            table = slot_table(self.run_id)
            errors: list[str] = []
            try:
                with table.lock:
                    try:
                        errors += self._forget_elements(self.final_denied)
                    finally:
                        if self.tap_fd >= 0:
                            os.close(self.tap_fd)
                            self.tap_fd = -1
                        table.release(self.lease)
                    others = [e for e in table.leases().values() if e.get("netns") == self.netns]
                    if not others:
                        errors += remove_namespace(self.run_id, self.uplink)
            except Exception as exc:  # filelock Timeout, pyroute2
                errors.append(str(exc))
            if errors:
                raise NetworkError(f"{self.vm}: network teardown was incomplete: {'; '.join(errors)} "
                                   f"(python -m pytest_smolvm reap removes what is left)")


    def change(self, policy_name: str, allow: tuple[str, ...]) -> None:
        """Move the live VM to ``policy_name``/``allow`` (validated by the caller, and held to
        the run's ceiling there). New packets see the new policy at once; a tightening also
        flushes the VM's conntrack entries, so an open connection is judged again by its next
        packet, and forgets the addresses earlier answers allowed. ``none``: the TAP goes down
        from the host side and the VM's lease is withdrawn (every packet dropped)."""
        with self._lock:
            if self.final_denied is not None:
                raise NetworkError(f"{self.vm}: its network is closed")
            old_rank, new_rank = policy.network_rank(self.policy, self.allow), policy.network_rank(policy_name, allow)
            tighten = new_rank < old_rank or (new_rank == old_rank == 2 and not set(self.allow) <= set(allow))
            if policy_name == "nat":
                with slot_table(self.run_id).lock:
                    _ensure_uplink(self.netns, self.run_id, self.uplink)
            egress = policy.egress_networks(policy_name, allow)
            nets, names = split_allow(allow)
            if self.resolver is not None:  # first: no answer under the old policy comes after the flush
                self.resolver.set_policy(NamePolicy.of(policy_name, names, bool(nets)))
            if policy_name == "none":
                netns.set_link(self.netns, self.addr.tap, up=False)
            for attempt in (1, 2):  # an answer's element may expire between listing and deleting it
                commands = policy.live_change(self.addr.tap, self.addr.guest_ip, self.addr.mac,
                                              (self.policy, self.egress), (policy_name, egress),
                                              self.dns_allowed() if tighten else (), tighten)
                try:
                    if commands:
                        netns.run(self.netns, ["nft", "-f", "-"], input=commands)
                    break
                except NetworkError:
                    if attempt == 2:
                        raise
            if tighten:
                netns.flush_conntrack(self.netns, self.mark)
            if self.policy == "none" and policy_name != "none":
                netns.set_link(self.netns, self.addr.tap, up=True)
            self.policy, self.allow, self.egress = policy_name, allow, egress

    def _forget_elements(self, denied: list[Denied]) -> list[str]:
        """Remove this VM's nft elements, counters and limits; returns what could not go.
        One transaction first; if it fails (something is already gone), each command alone,
        so one missing element never keeps the VM's lease or connection owner behind."""
        if not netns.exists(self.netns):
            return []
        try:
            allowed = self.dns_allowed()
        except NetworkError:
            allowed = []
        commands = policy.vm_removal(self.addr.tap, self.addr.host_ip, self.addr.guest_ip, self.addr.mac,
                                     self.mark, self.egress, [d.as_tuple() for d in denied],
                                     leased=self.policy != "none")
        commands += policy.dns_forget_elements(self.addr.tap, allowed)
        if self.proxy is not None:
            try:
                res = netns.run(self.netns, ["nft", "-j", "list", "set", "inet", policy.RUN_TABLE, "secretdst"])
                redirected = policy.parse_dns_allowed(res.stdout).get(self.addr.tap, [])
            except NetworkError:
                redirected = []
            commands += policy.dns_forget_elements(self.addr.tap, redirected).replace(" dnsallow ", " secretdst ")
        try:
            netns.run(self.netns, ["nft", "-f", "-"], input=commands)
            return []
        except NetworkError:
            pass
        failed = []
        for command in commands.splitlines():
            res = netns.run(self.netns, ["nft", "-f", "-"], input=command + "\n", check=False)
            if res.returncode != 0:
                failed.append(f"nft {command!r} failed in {self.netns}: {res.stderr.strip()[:300]}")
        return failed


def attach(vm: str, run_id: str, policy_name: str, allow: tuple[str, ...], uplink: str | None,
           caps: Caps = DEFAULT_CAPS, dns_upstream: tuple[str, ...] = (),
           secret_map: dict[str, Secret] | None = None) -> VMNetwork:
    """Lease a slot for ``vm`` and give it a TAP with ``policy_name`` and ``caps`` in force,
    and its resolver (forwarding to ``dns_upstream``, or the host's resolvers). On failure
    nothing is left behind (no lease, TAP, namespace, rules or resolver)."""
    _check_host(vm, policy_name, uplink)
    ns = namespace_name(run_id, uplink)
    table = slot_table(run_id)
    _forget_at_exit.add(run_id)
    egress = policy.egress_networks(policy_name, allow)
    # Stamped on this VM's connections; fresh per VM, so state a VM before it left on the
    # same TAP belongs to no one.
    mark = secrets.randbelow(2**31 - 1) + 1
    try:
        with table.lock:
            lease = table.lease(vm, netns=ns, uplink=uplink or "")
            addr = addressing(lease.slot, run_tag(run_id))
            tap_fd = -1
            net = None
            try:
                if not netns.exists(ns):
                    _create_namespace(ns)
                if policy_name == "nat":
                    _ensure_uplink(ns, run_id, uplink)
                tap_fd = netns.open_tap(ns, addr.tap)
                netns.set_link(ns, addr.tap, address=str(addr.host_ip), prefixlen=addr.subnet.prefixlen)
                net = VMNetwork(vm, run_id, policy_name, allow, uplink, ns, addr, lease, tap_fd, egress, caps, mark,
                                dns_upstream, secrets=dict(secret_map or {}))
                net.start_resolver()  # before the VM's elements: nothing of them is left if it fails
                netns.run(ns, ["nft", "-f", "-"], input=policy.vm_elements(
                    addr.tap, addr.host_ip, addr.guest_ip, addr.mac, mark, egress, caps))
            except BaseException:
                if net is not None and net.resolver is not None:
                    net.resolver.close()
                if net is not None and net.proxy is not None:
                    net.proxy.close()
                if tap_fd >= 0:
                    os.close(tap_fd)
                table.release(lease)
                if not any(e.get("netns") == ns for e in table.leases().values()):
                    remove_namespace(run_id, uplink)
                raise
    except NetworkError:
        raise
    except Exception as exc:  # filelock Timeout, pyroute2's errors
        raise NetworkError(f"{vm}: setting up network={policy_name!r} failed: {type(exc).__name__}: {exc}") from exc
    return net


def _check_host(vm: str, policy_name: str, uplink: str | None) -> None:
    if policy_name not in ("isolated", "nat"):
        raise NetworkError(f"invalid network={policy_name!r}: only 'isolated' and 'nat' have a NIC")
    if not sys.platform.startswith("linux"):
        raise NetworkError(f"{vm}: network={policy_name!r} needs Linux (its policies are network namespaces, "
                           f"nftables and TAP devices), and this host is {sys.platform}; use network='none' "
                           f"(the default) here, and run networked tests on Linux")
    if userns.rootless():
        userns.check(policy_name)  # NetworkUnavailable: the pytest layer skips, with the fix
        if uplink:
            raise NetworkError(f"uplink={uplink!r} needs root: without root, nat's uplink is pasta, "
                               f"connected to the network namespace this process runs in")
    if uplink and not netns.exists(uplink):
        raise NetworkError(f"invalid uplink={uplink!r}: no network namespace of that name "
                           f"(ip netns list shows the existing ones)")


def _create_namespace(ns: str) -> None:
    netns.create(ns)
    try:
        # Before any interface exists, so TAPs and the veth never get IPv6 addresses.
        netns.write_sysctl(ns, "net.ipv6.conf.default.disable_ipv6", "1")
        netns.write_sysctl(ns, "net.ipv6.conf.all.disable_ipv6", "1")
        netns.write_sysctl(ns, "net.ipv4.ip_forward", "1")
        netns.set_link(ns, "lo")
        netns.run(ns, ["nft", "-f", "-"], input=policy.run_ruleset(DEFAULT_BASE))
    except BaseException:
        netns.remove(ns)
        raise


def _uplink_subnet(run_id: str, uplink: str | None, taken: set[ipaddress.IPv4Network]) -> ipaddress.IPv4Network:
    seed = int(hashlib.sha256(f"{run_id}/{uplink}".encode()).hexdigest(), 16)
    count = UPLINK_BASE.num_addresses // 4
    for i in range(count):
        n = (seed + i) % count
        net = ipaddress.IPv4Network((int(UPLINK_BASE.network_address) + 4 * n, 30))
        if not net.overlaps(UPLINK_AVOID) and net not in taken and n != 0:
            return net
    raise NetworkError(f"no free link-local /30 for the uplink in {uplink or 'the root namespace'}")


def _ensure_uplink(ns: str, run_id: str, uplink: str | None) -> None:
    """Give the run namespace its veth to the uplink namespace, its default route and the
    uplink's masquerade table (once per namespace). ``nat`` needs IPv4 forwarding in the
    uplink namespace; pytest-smolvm never turns it on there itself."""
    from pyroute2 import IPRoute

    if userns.rootless():  # pasta's tap is the uplink (userns.py); the run ruleset masquerades
        if userns.start_pasta(ns):
            netns.run(ns, ["nft", "-f", "-"], input=policy.pasta_guard_ruleset(userns.host_addresses()))
        return
    with netns.entered(ns), IPRoute() as ipr:
        if ipr.link_lookup(ifname=policy.UPLINK_IF):
            return
    where = f"network namespace {uplink!r}" if uplink else "the root network namespace"
    if netns.read_sysctl(uplink, "net.ipv4.ip_forward") != "1":
        raise NetworkError(
            f"network='nat' needs IPv4 forwarding in the uplink, {where}, and it is off; "
            f"pytest-smolvm does not change it: enable it ({'ip netns exec ' + uplink + ' ' if uplink else ''}"
            f"sysctl -w net.ipv4.ip_forward=1) or point smolvm_uplink at a namespace that forwards")
    veth, table = uplink_names(run_id, uplink)
    with netns.entered(uplink), IPRoute() as ipr:
        taken = {ipaddress.IPv4Network(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}", strict=False)
                 for a in ipr.get_addr(family=socket.AF_INET)}
        subnet = _uplink_subnet(run_id, uplink, taken)
        up_ip, run_ip = subnet.network_address + 1, subnet.network_address + 2
        if ipr.link_lookup(ifname=veth):  # a leftover of this very run's earlier namespace
            ipr.link("del", index=ipr.link_lookup(ifname=veth)[0])
        ipr.link("add", ifname=veth, kind="veth", peer={"ifname": policy.UPLINK_IF})
        try:
            peer = ipr.link_lookup(ifname=policy.UPLINK_IF)[0]
            ipr.link("set", index=peer, net_ns_fd=ns)
            idx = ipr.link_lookup(ifname=veth)[0]
            ipr.addr("add", index=idx, address=str(up_ip), prefixlen=30)
            ipr.link("set", index=idx, state="up")
        except BaseException:
            ipr.link("del", index=ipr.link_lookup(ifname=veth)[0])
            raise
    try:
        netns.run(uplink, ["nft", "-f", "-"], input=policy.uplink_ruleset(
            table.removeprefix("smolvm-"), veth, run_ip))
        with netns.entered(ns), IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=policy.UPLINK_IF)[0]
            ipr.addr("add", index=idx, address=str(run_ip), prefixlen=30)
            ipr.link("set", index=idx, state="up")
            ipr.route("add", dst="0.0.0.0/0", gateway=str(up_ip))
    except BaseException:
        _remove_uplink(run_id, uplink)
        raise


def _remove_uplink(run_id: str, uplink: str | None) -> list[str]:
    """Remove the run's veth and nft table from the uplink namespace (if there)."""
    from pyroute2 import IPRoute

    errors: list[str] = []
    veth, table = uplink_names(run_id, uplink)
    if userns.rootless():
        return errors  # pasta, the uplink, dies with the namespace (netns.remove)
    if uplink and not netns.exists(uplink):
        return errors  # the uplink namespace is gone, and everything of ours in it
    try:
        netns.run(uplink, ["nft", "delete", "table", "ip", table], check=False)
        with netns.entered(uplink), IPRoute() as ipr:
            for idx in ipr.link_lookup(ifname=veth):
                ipr.link("del", index=idx)
    except Exception as exc:
        errors.append(f"removing {veth}/{table} from {uplink or 'the root namespace'}: {exc}")
    return errors


def remove_namespace(run_id: str, uplink: str | None) -> list[str]:
    """Remove a run namespace and what belongs to it in its uplink; returns what failed."""
    errors = _remove_uplink(run_id, uplink)
    try:
        netns.remove(namespace_name(run_id, uplink))
    except NetworkError as exc:
        errors.append(str(exc))
    return errors


_forget_at_exit: set[str] = set()


def forget_run(run_id: str) -> None:
    """Remove the run's slot table once no live VM holds a slot (end of a run)."""
    table = slot_table(run_id)
    try:
        with table.lock:
            if not table.leases(live_only=True):
                table.path.unlink(missing_ok=True)
    except Exception:  # best effort: reap removes it later
        pass


@atexit.register
def _forget_runs() -> None:
    for run_id in _forget_at_exit:
        forget_run(run_id)


@dataclasses.dataclass(frozen=True)
class StaleNetwork:
    """A run namespace (or an uplink table/veth, or a slot table) whose VMs are all gone."""

    what: str
    run_id: str
    reason: str


def _tables() -> dict[str, str]:
    """run tag -> run id, for every slot table of this runtime directory: the only runs a
    reap from here may judge (a namespace without one here belongs to another directory)."""
    out = {}
    for p in runtime_dir().glob("*.net.json"):
        run_id = p.name[: -len(".net.json")]
        out[run_tag(run_id)] = run_id
    return out


def _live_runs(tables: dict[str, str]) -> tuple[set[str], dict[str, str | None]]:
    """(tags of runs that must be spared, namespace -> its uplink). A run is live while a
    lease's owner is alive, or while one of its VMs is kept (``--smolvm-keep-failed``: the
    VMM outlives the owner, and still uses its TAP)."""
    live: set[str] = set()
    uplinks: dict[str, str | None] = {}
    for tag, run_id in tables.items():
        entries = slot_table(run_id).leases().values()  # one read of the table, under its lock
        for entry in entries:
            uplinks[entry.get("netns", "")] = entry.get("uplink") or None
        if any(stamp_alive(e) for e in entries) or any((runtime_dir() / run_id).glob("*/kept")):
            live.add(tag)
    return live, uplinks


def _uplink_tables() -> dict[str, str]:
    """Our uplink nft tables in the root namespace: name -> run tag."""
    try:
        res = netns.run(None, ["nft", "-j", "list", "tables"], check=False)
    except NetworkError:  # nft missing: nothing of ours can be in its tables
        return {}
    return policy.parse_uplink_tables(res.stdout) if res.returncode == 0 and res.stdout.strip() else {}


def _reap_namespaces(stale: dict[str, str], uplinks: dict[str, str | None], *,
                     dry_run: bool) -> list[StaleNetwork]:
    """Named run namespaces (``ip netns``) of gone runs, and their uplink's veth and table."""
    found = []
    for ns in netns.names(NETNS_PREFIX):
        tag, _, utag = ns[len(NETNS_PREFIX):].rpartition("-")
        if tag not in stale:
            continue
        found.append(StaleNetwork(f"network namespace {ns}", stale[tag], "no live VM holds a slot in it"))
        if not dry_run:
            uplink = uplinks.get(ns) if utag != "root" else None
            if utag == "root" or uplink:
                remove_namespace(stale[tag], uplink)
            else:  # its uplink is unknown: the namespace alone (the uplink's own goes with it)
                netns.remove(ns)
    return found


def _reap_holders(live: set[str], stale: dict[str, str], *, dry_run: bool) -> list[StaleNetwork]:
    """Rootless run namespaces (their holders and pasta) of runs not live. Their records are in
    this runtime directory, so they are ours to judge even without a slot table."""
    found = []
    for ns in userns.names(NETNS_PREFIX):
        tag = ns[len(NETNS_PREFIX):].rpartition("-")[0]
        if tag in live:
            continue
        found.append(StaleNetwork(f"network namespace {ns}", stale.get(tag, tag), "no live VM holds a slot in it"))
        if not dry_run:
            userns.remove(ns)
    return found


def reap_networks(*, dry_run: bool = False) -> list[StaleNetwork]:
    """Remove run namespaces, uplink veths/tables and slot tables of this runtime directory's
    runs with no live VM holding a slot and no kept VM (never a live run's: a lease names its
    owner's pid and start time; never another runtime directory's runs: they are not ours
    to judge)."""
    if not runtime_dir().is_dir():
        return []
    found: list[StaleNetwork] = []
    lock = shared_lock(lock_path())
    try:
        lock.acquire()
    except Exception:
        return found  # a run is setting up its network right now; the next reap will do it
    try:
        tables = _tables()
        live, uplinks = _live_runs(tables)
        stale = {tag: run_id for tag, run_id in tables.items() if tag not in live}
        if not userns.rootless():
            found += _reap_namespaces(stale, uplinks, dry_run=dry_run)
        found += _reap_holders(live, stale, dry_run=dry_run)
        # Root-namespace uplink tables and veths whose run is gone. Only asked when a run is
        # gone: an ordinary user running network="none" VMs may have no nft on PATH at all.
        uplink_tables = _uplink_tables() if stale else {}
        for name, tag in uplink_tables.items():
            if tag in stale:
                found.append(StaleNetwork(f"nft table ip {name}", stale[tag], "run is gone"))
                if not dry_run:
                    _remove_uplink(stale[tag], None)
        for run_id in stale.values():
            if table_path(run_id).exists():
                found.append(StaleNetwork(f"slot table {table_path(run_id)}", run_id, "no live lease"))
                if not dry_run:
                    table_path(run_id).unlink(missing_ok=True)
    finally:
        lock.release()
    return found
