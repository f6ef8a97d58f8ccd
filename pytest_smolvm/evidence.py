"""What the code in a VM did: :class:`Evidence`, gathered by :class:`EvidenceProbe`.

Every figure is in one of two parts, and the part says who vouches for it:

- ``host_measured`` (:class:`HostMeasured`): read by the host from things the guest cannot
  write: the VMM process (``/proc/<pid>``), the overlay disk's allocated size, the TAP's
  counters (``/proc/net/dev`` of the run's namespace) and the policy's denial ledger
  (nftables), the wall clock, ``run()`` durations.
- ``guest_reported`` (:class:`GuestReported`): what one command run in the guest printed:
  the ``smolvm`` cgroup's files, the processes left in it, the files changed since boot.
  A hostile guest can make all of it up, so every string is sanitised and cut, every list
  capped, every number bounded, and the command has a time and output limit.

Gathering the host part costs a few system calls; the guest part costs a command in the
guest (hundreds of milliseconds under TCG), so the pytest layer asks for it only when the
report will show it (``--smolvm-evidence``). Usable without pytest.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import SmolVMError
from .reporting import clip

if TYPE_CHECKING:
    from .commands import Transcript
    from .network.hub import VMNetwork

__all__ = ["CommandUsage", "Evidence", "EvidenceProbe", "FileChange", "GuestReported", "HostMeasured", "LeftProcess"]

#: Caps on what the guest may put into evidence (a report must stay readable and small).
MAX_FILES = 200
MAX_PROCESSES = 50
MAX_TEXT = 256  # characters of one path or argv, after sanitising
MAX_COMMANDS = 50
MAX_DENIED = 50
GUEST_OUTPUT = 256 * 1024  # bytes of the gathering command's output
GUEST_TIMEOUT = 20.0  # seconds (scaled by SMOLVM_TIMEOUT_SCALE)
SCAN_LIMIT = 2000  # entries the guest's find may print before it is cut off
_BIG = 1 << 62

#: The guest half: one shell script, only busybox/coreutils-level tools. Sections start
#: with ``@name``; the file list is NUL-separated (paths may hold newlines).
GUEST_SCRIPT = r"""
sync
cg=/sys/fs/cgroup/smolvm
me=$$
pids=""
while read -r p; do pids="$pids $p"; done < $cg/cgroup.procs
echo "@cgroup"
for f in memory.peak memory.events cpu.stat pids.peak pids.events; do
  [ -r $cg/$f ] && while read -r k v; do echo "$f $k $v"; done < $cg/$f
done
echo "@stat"
while read -r k v; do [ "$k" = processes ] && echo "forks $v"; done < /proc/stat
echo "@mounts"
while read -r dev mnt fs rest; do echo "$fs $mnt"; done < /proc/mounts
echo "@procs"
n=0
for p in $pids; do
  [ "$p" = "$me" ] && continue
  a=$(tr '\0' ' ' < /proc/$p/cmdline 2>/dev/null | head -c 400)
  case "$a" in /run/smolvm/smolvm-agent*) continue;; esac
  n=$((n+1)); [ $n -gt __MAXP__ ] && { echo "more"; break; }
  echo "$p $a" | tr '\n' ' '; echo
done
echo "@files"
find / -xdev -cnewer /run/smolvm/smolvm-agent -printf '%y %m %s %p\0' 2>/dev/null | head -z -n __SCAN__
""".replace("__MAXP__", str(MAX_PROCESSES)).replace("__SCAN__", str(SCAN_LIMIT + 1))

#: The listed files (NUL-separated on stdin) as a tar on stdout, cut at __LIMIT__ bytes.
ARCHIVE_SCRIPT = "tar --null --no-recursion --ignore-failed-read -T - -cf - 2>/dev/null | head -c __LIMIT__"

#: Which of the candidates (NUL-separated on stdin) no longer exist.
GONE_SCRIPT = r"""xargs -0 -r sh -c 'for p; do [ -e "$p" ] || [ -L "$p" ] || printf "%s\0" "$p"; done' sh"""


def _text(text: str) -> str:
    """Guest text for one line: sanitised, cut, newlines and tabs shown escaped."""
    return clip(text, MAX_TEXT).replace("\n", "\\n").replace("\t", "\\t")


def _num(text: str, scale: float = 1.0) -> float | None:
    """A guest number, or None when it is not a sane one (a lying guest's junk)."""
    try:
        n = int(text)
    except ValueError:
        return None
    return n / scale if 0 <= n < _BIG else None


@dataclasses.dataclass(frozen=True)
class FileChange:
    """A path under the guest's root (its disk; tmpfs excluded) that differs from the image."""

    path: str
    change: str  # created, changed, deleted, or "created or changed" (the image side unknown)
    type: str  # find's %y: f file, d directory, l symlink, ...; "" for deleted
    mode: str
    size: int | None


@dataclasses.dataclass(frozen=True)
class LeftProcess:
    pid: int
    argv: str


@dataclasses.dataclass(frozen=True)
class CommandFigure:
    """One ``run()``/``spawn()``, as the host timed it."""

    command: str
    outcome: str
    wall_s: float


@dataclasses.dataclass(frozen=True)
class CommandUsage:
    """One command's resources as the guest agent's ``wait4`` reported them (the command and
    every descendant it waited for): guest-reported, free to gather (it rides on the reply)."""

    command: str
    cpu_user_s: float
    cpu_system_s: float
    peak_rss_bytes: int  # the largest resident set of one process of its tree


@dataclasses.dataclass(frozen=True)
class HostMeasured:
    """What the host measured; the guest cannot change any of it."""

    wall_s: float | None  # since the VM was handed over (booted or cloned)
    vmm_cpu_user_s: float | None  # the VMM process: emulation and every vCPU
    vmm_cpu_system_s: float | None
    vmm_peak_rss_bytes: int | None  # VmHWM of the VMM
    disk_written_bytes: int | None  # growth of the overlay's allocated size
    net_bytes_out: int | None = None  # guest -> host side of its TAP
    net_packets_out: int | None = None
    net_bytes_in: int | None = None
    net_packets_in: int | None = None
    connections_opened: int | None = None  # new connections the policy let out through the uplink
    denied: tuple[str, ...] = ()  # "tcp 192.0.2.1:80 (3 packets)"
    denied_unitemised: int = 0
    caps_hit: tuple[tuple[str, int], ...] = ()
    commands: tuple[CommandFigure, ...] = ()


@dataclasses.dataclass(frozen=True)
class GuestReported:
    """What the guest printed when asked; sanitised, capped, and not to be trusted."""

    error: str | None = None  # why nothing (or only part) could be gathered
    memory_peak_bytes: int | None = None  # the smolvm cgroup: every command since boot
    cpu_user_s: float | None = None
    cpu_system_s: float | None = None
    pids_peak: int | None = None
    oom_kills: int | None = None
    pids_max_hits: int | None = None
    forks_since_boot: int | None = None  # /proc/stat "processes": the whole guest
    processes: tuple[LeftProcess, ...] = ()
    processes_more: bool = False
    files: tuple[FileChange, ...] = ()
    files_more: bool = False
    excluded_mounts: tuple[str, ...] = ()  # "tmpfs /run": not on the root disk, not scanned


@dataclasses.dataclass(frozen=True)
class Evidence:
    """What one VM did, from its start to when this was gathered. JSON: :meth:`to_dict`."""

    vm: str
    host_measured: HostMeasured
    guest_reported: GuestReported | None  # None: not gathered (the host part alone is cheap)
    #: Each command's usage as the guest reported it (the last ``MAX_COMMANDS``).
    guest_reported_commands: tuple[CommandUsage, ...] = ()
    #: The changed regular files as a tar the *guest* made (``archive_limit``): hostile
    #: content, cut at the limit, never extracted by us; not part of :meth:`to_dict`.
    archive: bytes | None = dataclasses.field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data (tuples become lists), without ``archive``."""
        data = dataclasses.asdict(dataclasses.replace(self, archive=None))
        del data["archive"]
        return data

    def properties(self) -> list[tuple[str, float | int]]:
        """Resource figures as ``(name, number)`` (JUnit ``<property>``), missing ones left out."""
        h, g = self.host_measured, self.guest_reported
        pairs: list[tuple[str, float | int | None]] = [
            ("wall_s", h.wall_s), ("vmm_cpu_user_s", h.vmm_cpu_user_s), ("vmm_cpu_system_s", h.vmm_cpu_system_s),
            ("vmm_peak_rss_bytes", h.vmm_peak_rss_bytes), ("disk_written_bytes", h.disk_written_bytes),
            ("net_bytes_out", h.net_bytes_out), ("net_bytes_in", h.net_bytes_in),
            ("net_connections_opened", h.connections_opened),
            ("net_denied", len(h.denied) + h.denied_unitemised if h.net_bytes_out is not None else None)]
        if usage := self.guest_reported_commands:
            pairs += [("guest_commands_cpu_s", sum(c.cpu_user_s + c.cpu_system_s for c in usage)),
                      ("guest_commands_peak_rss_bytes", max(c.peak_rss_bytes for c in usage))]
        if g is not None:
            pairs += [("guest_memory_peak_bytes", g.memory_peak_bytes), ("guest_cpu_user_s", g.cpu_user_s),
                      ("guest_cpu_system_s", g.cpu_system_s), ("guest_oom_kills", g.oom_kills)]
        return [(k, round(v, 3) if isinstance(v, float) else v) for k, v in pairs if v is not None]

    def render(self, files: int = 10) -> str:
        """A short text for a report section: resources, network, files, processes."""
        h, g = self.host_measured, self.guest_reported
        lines = ["host-measured: " + _resources(h)]
        if h.net_bytes_out is not None:
            lines.append(f"  network: out {_size(h.net_bytes_out)} / {h.net_packets_out} pkts, in "
                         f"{_size(h.net_bytes_in)} / {h.net_packets_in} pkts; "
                         f"{'?' if h.connections_opened is None else h.connections_opened} connection(s) opened; "
                         f"denied {len(h.denied)}"
                         + (f" (+{h.denied_unitemised} not itemised)" if h.denied_unitemised else "")
                         + "".join(f"; {k} cap hit {n}x" for k, n in h.caps_hit))
            lines += [f"    denied {d}" for d in h.denied[:5]]
        usage = self.guest_reported_commands
        if usage:
            top = max(usage, key=lambda c: c.cpu_user_s + c.cpu_system_s)
            shown = top.command.replace("\\n", " ").strip()[:60]  # _text showed its newlines as \n
            lines.append(f"guest-reported per command (wait4): {len(usage)} command(s), CPU "
                         f"{_secs(sum(c.cpu_user_s + c.cpu_system_s for c in usage))} in all, largest process "
                         f"{_size(max(c.peak_rss_bytes for c in usage))}; most CPU: {shown} "
                         f"({_secs(top.cpu_user_s + top.cpu_system_s)})")
        if g is None:
            return "\n".join([*lines, "guest-reported: not gathered"])
        lines.append("guest-reported (cgroup smolvm): " + _guest_resources(g))
        if g.error:
            lines.append(f"  incomplete: {g.error}")
        lines.append(f"  processes left running: {len(g.processes)}{'+' if g.processes_more else ''}")
        lines += [f"    {p.pid} {p.argv}" for p in g.processes[:5]]
        lines.append(f"  files changed on the root disk: {len(g.files)}{'+' if g.files_more else ''} "
                     f"(not scanned: {', '.join(g.excluded_mounts[:6]) or 'nothing'})")
        lines += [f"    {f.change:<8} {f.path}" + (f" ({f.size} bytes, mode {f.mode})" if f.size is not None else "")
                  for f in g.files[:files]]
        return "\n".join(lines)


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} B"


def _secs(v: float | None) -> str:
    return "?" if v is None else f"{v:.2f}s"


def _resources(h: HostMeasured) -> str:
    return (f"wall {_secs(h.wall_s)}, VMM CPU user {_secs(h.vmm_cpu_user_s)} system {_secs(h.vmm_cpu_system_s)}, "
            f"VMM peak RSS {_size(h.vmm_peak_rss_bytes)}, disk written {_size(h.disk_written_bytes)}, "
            f"{len(h.commands)} command(s)")


def _guest_resources(g: GuestReported) -> str:
    return (f"memory peak {_size(g.memory_peak_bytes)}, CPU user {_secs(g.cpu_user_s)} system "
            f"{_secs(g.cpu_system_s)}, pids peak {g.pids_peak}, OOM kills {g.oom_kills}, "
            f"pids.max hits {g.pids_max_hits}, forks since boot {g.forks_since_boot}")


# ---------------------------------------------------------------------- host side


def _vmm_figures(pid: int | None) -> tuple[float | None, float | None, int | None]:
    """User and system CPU seconds and peak RSS of the VMM, from ``/proc/<pid>``."""
    if pid is None:
        return None, None, None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None, None, None
    fields = stat[stat.rindex(")") + 2:].split()
    tick = os.sysconf("SC_CLK_TCK")
    user, system = int(fields[11]) / tick, int(fields[12]) / tick
    hwm = next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM:")), None)
    return user, system, hwm


def allocated(path: Path | None) -> int | None:
    """Bytes a disk file takes on the host's filesystem (sparse holes not counted)."""
    try:
        return os.stat(path).st_blocks * 512 if path is not None else None
    except OSError:
        return None


def _net_figures(net: VMNetwork) -> dict[str, Any]:
    """The TAP's counters (host side: its rx is the guest's out) and the policy's ledger."""
    from .network import netns

    out: dict[str, Any] = {}
    try:
        stats = netns.link_counters(net.netns, net.addr.tap)
    except SmolVMError:  # a gone namespace means no figures, not a failure
        stats = None
    if stats:
        out.update(net_bytes_out=stats["rx_bytes"], net_packets_out=stats["rx_packets"],
                   net_bytes_in=stats["tx_bytes"], net_packets_in=stats["tx_packets"])
    try:
        denied = net.denied()
        counters = net.counters()
    except SmolVMError:
        return out
    out["denied"] = tuple(f"{d.proto} {d.dest}" + (f":{d.port}" if d.port else "") + f" ({d.packets} packets)"
                          for d in denied[:MAX_DENIED])
    out["connections_opened"] = counters.get("opened", 0)
    out["denied_unitemised"] = counters.get("unitemised", 0) + max(0, len(denied) - MAX_DENIED)
    out["caps_hit"] = tuple((k, counters.get(k, 0)) for k in ("bandwidth", "connections") if counters.get(k, 0))
    return out


# ---------------------------------------------------------------------- guest side


def _sections(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines():
        if line.startswith("@") and line[1:].isalpha():
            current = found.setdefault(line[1:], [])
        else:
            current.append(line)
    return found


def parse_guest(out: bytes) -> tuple[GuestReported, list[tuple[str, str, str, int | None]]]:
    """The gathering script's output → the resource part, and the raw file list
    ``(type, mode, path, size)`` (sanitised paths are made later, after the comparison)."""
    head, _, files_raw = out.partition(b"@files\n")
    sec = _sections(head.decode(errors="replace"))
    cg: dict[str, str] = {}
    for line in sec.get("cgroup", [])[:64]:
        parts = line.split()
        if len(parts) >= 2:
            cg[" ".join(parts[:-1]) if len(parts) == 3 else parts[0]] = parts[-1]
    forks = next((_num(line.split()[-1]) for line in sec.get("stat", []) if line.startswith("forks ")), None)
    excluded = tuple(clip(line, 80) for line in sec.get("mounts", [])[:64]
                     if line.split(" ")[0] in ("tmpfs", "devtmpfs", "devpts", "proc", "sysfs", "cgroup2", "ext4")
                     and line.split(" ", 1)[-1] != "/")
    procs: list[LeftProcess] = []
    more = False
    for line in sec.get("procs", [])[:MAX_PROCESSES + 1]:
        pid, _, argv = line.partition(" ")
        if line == "more" or len(procs) >= MAX_PROCESSES:
            more = True
            break
        if (n := _num(pid)) is not None:
            procs.append(LeftProcess(int(n), _text(argv.strip())))
    entries = []
    for rec in files_raw.split(b"\0")[:SCAN_LIMIT + 1]:
        kind, mode, size, path = ([*rec.decode(errors="replace").split(" ", 3), "", "", "", ""])[:4]
        if path.startswith("/"):
            n = _num(size)
            entries.append((kind[:1], mode[:6], path[:4096], None if n is None else int(n)))

    def figure(key: str, scale: float = 1.0) -> Any:
        v = _num(cg.get(key, ""), scale)
        return v if scale != 1.0 or v is None else int(v)

    return GuestReported(
        memory_peak_bytes=figure("memory.peak"), cpu_user_s=figure("cpu.stat user_usec", 1e6),
        cpu_system_s=figure("cpu.stat system_usec", 1e6), pids_peak=figure("pids.peak"),
        oom_kills=figure("memory.events oom_kill"), pids_max_hits=figure("pids.events max"),
        forks_since_boot=None if forks is None else int(forks), processes=tuple(procs), processes_more=more,
        excluded_mounts=excluded), entries


def image_listing(rootfs: Path, dirs: Iterable[str]) -> dict[str, set[str]]:
    """The names in each of ``dirs`` of the image's root filesystem, read by the host with
    ``debugfs`` (read-only); a directory missing from the image is missing from the result."""
    dirs = list(dirs)
    script = "".join(f'ls -p "{d.replace(chr(34), chr(34) * 2)}"\n' for d in dirs if "\n" not in d)
    try:
        res = subprocess.run(["debugfs", "-f", "-", str(rootfs)], input=script.encode(), capture_output=True,
                             timeout=30)
    except (OSError, subprocess.SubprocessError):
        return {}
    found: dict[str, set[str]] = {}
    real: set[str] = set()  # directories debugfs listed ("." seen); others are not in the image
    current: set[str] | None = None
    name = ""
    for line in res.stdout.decode(errors="replace").splitlines():
        if line.startswith("debugfs: ls -p "):
            name = line[len("debugfs: ls -p "):].strip('"').replace('""', '"')
            current = found.setdefault(name, set())
        elif current is not None and line.startswith("/"):
            parts = line.split("/")
            if len(parts) >= 7 and parts[5] == ".":
                real.add(name)
            elif len(parts) >= 7 and parts[5] != "..":
                current.add(parts[5])
    return {d: names for d, names in found.items() if d in real}


def compare(entries: list[tuple[str, str, str, int | None]], image: dict[str, set[str]],
            excluded: Iterable[str]) -> list[tuple[str, str, str, str, int | None]]:
    """``(path, change, type, mode, size)`` for the scanned entries: ``changed`` when the
    image has the path, ``created`` when its directory is in the image without it, else
    ``created or changed``. Mount points (not on the root disk) are left out."""
    skip = {m.split(" ", 1)[-1] for m in excluded}
    out = []
    for kind, mode, path, size in entries:
        if path in skip:
            continue
        parent, _, name = path.rpartition("/")
        names = image.get(parent or "/")
        change = "created or changed" if names is None else ("changed" if name in names else "created")
        if path == "/":
            change = "changed"
        out.append((path, change, kind, mode, size))
    return out


class EvidenceProbe:
    """One VM's evidence: the baseline taken when it is handed over, and the gathering."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.started: float | None = None
        self.disk_at_start: int | None = None
        self.cpu_at_start: tuple[float | None, float | None] = (None, None)

    def attach(self, pid: int | None, disk: Path | None) -> None:
        """The VM is handed over (booted, or taken from the warm pool): start its clock and
        note the VMM's CPU time and the overlay's allocated size so far."""
        self.started, self.disk_at_start = time.monotonic(), allocated(disk)
        self.cpu_at_start = _vmm_figures(pid)[:2]

    def gather(self, *, pid: int | None, disk: Path | None, net: VMNetwork | None, transcript: Transcript,
               run: Callable[[list[str], bytes], bytes] | None, rootfs: Path | None,
               archive_limit: int = 0) -> Evidence:
        """The host part always; the guest part when ``run`` (a quiet command in the guest:
        argv and stdin → stdout) is given, and with ``archive_limit`` the changed regular files
        as a tar of at most that many bytes. The guest part goes first: it syncs the guest's
        page cache, so the disk figure then includes what was only cached."""
        guest, archive = (None, None) if run is None else self._guest(run, rootfs, archive_limit)
        user, system, rss = _vmm_figures(pid)
        user, system = (None if now is None or then is None else round(now - then, 3)
                        for now, then in ((user, self.cpu_at_start[0]), (system, self.cpu_at_start[1])))
        now = allocated(disk)
        written = max(0, now - self.disk_at_start) if now is not None and self.disk_at_start is not None else None
        figures = tuple(CommandFigure(_text(e.command), e.outcome, round(e.duration, 3))
                        for e in transcript.entries[-MAX_COMMANDS:])
        host = HostMeasured(
            wall_s=None if self.started is None else round(time.monotonic() - self.started, 3),
            vmm_cpu_user_s=user, vmm_cpu_system_s=system, vmm_peak_rss_bytes=rss, disk_written_bytes=written,
            commands=figures, **(_net_figures(net) if net is not None else {}))
        usage = tuple(CommandUsage(_text(e.command), round(e.usage.cpu_user_s, 3), round(e.usage.cpu_system_s, 3),
                                   e.usage.peak_rss_bytes)
                      for e in transcript.entries[-MAX_COMMANDS:] if e.usage is not None)
        return Evidence(self.name, host, guest, usage, archive)

    def _guest(self, run: Callable[[list[str], bytes], bytes], rootfs: Path | None,
               archive_limit: int) -> tuple[GuestReported, bytes | None]:
        try:
            out = run(["/bin/sh", "-c", GUEST_SCRIPT], b"")
        except SmolVMError as exc:
            return GuestReported(error=clip(str(exc), 500)), None
        guest, entries = parse_guest(out)
        more = len(entries) > SCAN_LIMIT
        entries = entries[:SCAN_LIMIT]
        image: dict[str, set[str]] = {}
        deleted: list[str] = []
        if rootfs is not None:
            dirs = sorted({p.rpartition("/")[0] or "/" for _, _, p, _ in entries}
                          | {p for k, _, p, _ in entries if k == "d"})[:256]
            image = image_listing(rootfs, dirs)
            mounts = {m.split(" ", 1)[-1] for m in guest.excluded_mounts}
            changed_dirs = {p for k, _, p, _ in entries if k == "d" and p not in mounts}
            candidates = [f"{d.rstrip('/')}/{n}" for d in sorted(changed_dirs & image.keys()) for n in sorted(image[d])]
            deleted = self._gone(run, candidates[:20000])
        rows = compare(entries, image, guest.excluded_mounts) + [(p, "deleted", "", "", None) for p in deleted]
        order = {"deleted": 0, "created": 1, "changed": 3, "created or changed": 2}
        # Files before directories (a directory's change is its entries'), then by kind.
        rows.sort(key=lambda r: (r[2] == "d", order.get(r[1], 4), r[0]))
        files = tuple(FileChange(_text(p), c, _text(k), _text(m), s) for p, c, k, m, s in rows[:MAX_FILES])
        archive = None
        if archive_limit > 0:
            regular = [p for p, c, k, _, _ in rows[:MAX_FILES] if k == "f" and c != "deleted"]
            archive = self._archive(run, regular, archive_limit)
        return dataclasses.replace(guest, files=files, files_more=more or len(rows) > MAX_FILES), archive

    @staticmethod
    def _archive(run: Callable[[list[str], bytes], bytes], paths: list[str], limit: int) -> bytes | None:
        if not paths:
            return None
        script = ARCHIVE_SCRIPT.replace("__LIMIT__", str(int(limit)))
        try:
            out = run(["/bin/sh", "-c", script], b"\0".join(p.encode() for p in paths) + b"\0")
        except SmolVMError:
            return None
        return out[:limit]  # the command's output cap may be larger than the archive's

    @staticmethod
    def _gone(run: Callable[[list[str], bytes], bytes], candidates: list[str]) -> list[str]:
        if not candidates:
            return []
        try:
            out = run(["/bin/sh", "-c", GONE_SCRIPT], b"\0".join(c.encode() for c in candidates) + b"\0")
        except SmolVMError:
            return []
        asked = set(candidates)  # a lying guest may name only what we asked about
        return [p for p in out.decode(errors="replace").split("\0") if p in asked][:MAX_FILES]


#: How a test's VMs' figures combine into one (JUnit): peaks take the largest, the rest add up.
_PEAKS = frozenset({"vmm_peak_rss_bytes", "guest_memory_peak_bytes", "guest_commands_peak_rss_bytes", "wall_s"})


def combined_properties(evidence: Iterable[Evidence]) -> list[tuple[str, float | int]]:
    """One test's resource figures over all its VMs, named ``smolvm_<figure>``, plus ``smolvm_vms``."""
    total: dict[str, float | int] = {}
    count = 0
    for ev in evidence:
        count += 1
        for key, value in ev.properties():
            total[key] = max(total.get(key, value), value) if key in _PEAKS else total.get(key, 0) + value
    return [("smolvm_vms", count)] + [(f"smolvm_{k}", round(v, 3) if isinstance(v, float) else v)
                                      for k, v in total.items()] if count else []


def safe_file_name(nodeid: str) -> str:
    """A file name for a test's evidence: its node id with anything but ``[A-Za-z0-9._-]``
    made ``_``, cut, and a digest of the full id (two ids never share a name)."""
    import hashlib
    import re

    stem = re.sub(r"[^A-Za-z0-9._-]", "_", nodeid).strip("._")[:120] or "test"
    return f"{stem}-{hashlib.sha256(nodeid.encode()).hexdigest()[:10]}.json"
