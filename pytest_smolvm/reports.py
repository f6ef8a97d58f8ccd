"""What a failed test's report says about its VMs: where each ran, its command transcript,
its network policy and what it dropped, its console; and one summary line per host.

Rendering only (plain text, no pytest): the plugin attaches these as report sections.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from .errors import SmolVMError
from .host import host_name
from .reporting import tail

if TYPE_CHECKING:
    from .vm import SmolVM


def network_section(vm: SmolVM) -> str:
    """The policy in force, its caps, and what it dropped, for a failing test's report."""
    net = vm.network
    head = (f"policy {net.policy}" + (f" allow={','.join(net.allow)}" if net.allow else "")
            + f"; guest {net.guest_ip}, gateway {net.host_ip}, namespace {net.netns}")
    try:
        denied = net.denied_details()
        unitemised, capped = net.unitemised, net.capped
    except SmolVMError as exc:
        return f"{head}\ndenied egress: unknown ({exc})"
    head += (f"\negress caps {vm.config.egress_kib_per_s} KiB/s, {vm.config.egress_conns_per_s} new connections/s"
             + "".join(f"; {kind} cap hit ({n} packet(s) dropped)" for kind, n in capped.items() if n))
    more = f"\n  ... {unitemised} more denials not itemised (the denial ledger was full)" if unitemised else ""
    lookups = _lookups(net.denied_name_counts(), net.dns) + _secrets(net.secret_events, net.secrets_proxy)
    if not denied and not more:
        return f"{head}\ndenied egress: none" + lookups
    rows = [f"  {d.proto} {d.dest}" + (f":{d.port}" if d.port else "") + f"  ({d.packets} packet(s))"
            for d in denied]
    return f"{head}\ndenied egress ({len(denied)}):\n" + "\n".join(rows) + more + lookups


def _lookups(names: list[tuple[str, int]], counters: dict[str, int]) -> str:
    """The resolver's part: the names it would not resolve, and what it refused uncounted."""
    if not counters:
        return ""
    extra = "".join(f"\n  ... {n} {what}" for what, n in (
        ("more denied lookups not itemised (the ledger was full)", counters.get("unitemised", 0)),
        ("queries refused over the per-VM rate", counters.get("rate_refused", 0)),
        ("malformed queries dropped", counters.get("malformed", 0))) if n)
    if not names and not extra:
        return "\ndenied lookups: none"
    rows = [f"  {name}  ({count} time(s))" for name, count in names[:50]]
    if len(names) > 50:
        rows.append(f"  ... and {len(names) - 50} more names (vm.network.denied_names)")
    return f"\ndenied lookups ({len(names)}):\n" + "\n".join(rows) + extra


def _secrets(events: list[str], counters: dict[str, int]) -> str:
    """The secrets proxy's part (VMs with secrets only): what it forwarded and refused."""
    if not counters:
        return ""
    head = (f"\nsecrets proxy: {counters.get('forwarded', 0)} request(s) forwarded, "
            + ", ".join(f"{n} {what}" for what, n in counters.items() if what != "forwarded" and n)).rstrip(", ")
    return head + "".join(f"\n  {line}" for line in events[:50])


def host_lines(workers: dict[str, dict[str, Any]]) -> list[str]:
    """One line per host: its workers, VMs started and how many the warm pool had ready
    (``pool hits``), leftovers its workers reaped. Nothing for a run that started no VM."""
    hosts: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for gw, info in sorted(workers.items()):
        hosts.setdefault(str(info.get("host", "?")), []).append((gw, info))
    lines = []
    for host, rows in hosts.items():
        hits = sum(int(info.get("hits", 0)) for _, info in rows)
        vms = hits + sum(int(info.get("misses", 0)) for _, info in rows)
        reaped = sum(int(info.get("reaped", 0)) for _, info in rows)
        if not vms and not reaped:
            continue
        rate = f" ({100 * hits / vms:.0f}%)" if vms else ""
        lines.append(f"smolvm: host {host} ({', '.join(gw for gw, _ in rows)}): {vms} VM(s), pool hits "
                     f"{hits}/{vms}{rate}" + (f", {reaped} leftover(s) of dead runs reaped" if reaped else ""))
    return lines


def vm_sections(vm: SmolVM, start: int, console_lines: int) -> list[tuple[str, str]]:
    """Report sections of one VM of a failed test: where it ran, its transcript, network and
    console."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    sections = [(f"smolvm host {vm.name}", f"host {host_name()}, worker {worker}, run {vm.run_id}, "
                                           f"VM directory {vm.workdir}")]
    entries = vm.transcript[start:]
    if entries:
        sections.append((f"smolvm transcript {vm.name}", "\n".join(e.render() for e in entries)))
    if vm.config.network != "none":
        sections.append((f"smolvm network {vm.name}", network_section(vm)))
    console = vm.console_log
    if console:
        sections.append((f"smolvm console {vm.name} (last {console_lines} lines)",
                         tail(console, console_lines)))
    return sections


def redact_all(text: str, vms: list[SmolVM]) -> str:
    """``text`` with every one of ``vms``' secrets masked."""
    for vm in vms:
        text = vm.redact(text)
    return text
