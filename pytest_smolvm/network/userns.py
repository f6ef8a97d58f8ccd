"""Networking without root: the run namespace owned by an unprivileged user namespace.

An ordinary user cannot ``ip netns add``, but may create a user namespace and a network
namespace owned by it, and has every capability in both. So the rootless run namespace is
the same run namespace (same TAPs, addresses and nftables policy, ``policy.py``), held by a
*holder* (``holder.py``, a standard-library script), which unshares itself into a new user +
network namespace, maps our uid to root there, and serves requests on a socket in the
private runtime directory (``<runtime>/userns/NAME.sock``). ``setns`` into a user namespace
is refused to a multithreaded process (the engine is one), so whatever must be *created*
inside (a TAP, a listening or connecting socket, an ``nft`` run, a netlink request) is done
by the holder, and descriptors come back over ``SCM_RIGHTS``: sockets and TAPs keep their
namespace. Only our own uid may talk to it (``SO_PEERCRED``), and the client checks that the
peer is the pid its record names.

``nat``'s uplink is ``pasta`` (Debian ``passt``) attached to the holder's namespaces: its tap
``svup`` plays the veth of root mode, so the policy's forward chain still decides what a VM
reaches. The user namespace dies with its last process: removing the namespace (and ``reap``
after a kill -9) kills pasta and the holder, each only after checking it is the process the
record names (pid, start time, command line); TAPs, nft tables and routes go with them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Final

from ..errors import NetworkError, NetworkUnavailable
from ..host import process_start_time
from ..paths import check_socket_path, runtime_dir
from .holder import find, recv, send

#: Forces rootless mode for a root user (to try it, or test it, as root).
FORCE_ENV: Final = "SMOLVM_ROOTLESS_NET"
HOLDER: Final = str(Path(__file__).with_name("holder.py"))
PASTA_IF: Final = "svup"  # policy.UPLINK_IF: the policy's uplink is pasta's tap
START_TIMEOUT: Final = 30.0


def rootless() -> bool:
    """Whether this process builds run namespaces rootless (not root, or forced)."""
    return os.geteuid() != 0 or os.environ.get(FORCE_ENV) == "1"


# ------------------------------------------------------------------ what the host allows

_probe_cache: dict[str, str | None] = {}


def _sysctl_is_zero(path: str) -> bool:
    try:
        return Path(path).read_text().strip() == "0"
    except OSError:
        return False


def _userns_refused() -> str | None:
    """Why this user cannot create a user + network namespace (None: it can)."""
    if "userns" not in _probe_cache:
        reason = None
        if _sysctl_is_zero("/proc/sys/kernel/unprivileged_userns_clone"):
            reason = "unprivileged user namespaces are off (fix: sysctl kernel.unprivileged_userns_clone=1, or root)"
        elif _sysctl_is_zero("/proc/sys/user/max_user_namespaces"):
            reason = "user namespaces are off (fix: sysctl user.max_user_namespaces=15000, or run as root)"
        elif shutil.which("unshare"):
            res = subprocess.run(["unshare", "-Urn", "true"], capture_output=True, text=True, check=False)
            if res.returncode != 0:
                reason = (f"this user cannot create a user namespace ({res.stderr.strip()[:200]}; fix: "
                          f"sysctl kernel.unprivileged_userns_clone=1 / user.max_user_namespaces, or run as root)")
        _probe_cache["userns"] = reason
    return _probe_cache["userns"]


def unavailable(policy: str) -> str | None:
    """Why ``policy`` cannot work for this user on this host, in one line naming the fix
    (None: it can, or this process is root and uses the root mode)."""
    if policy not in ("isolated", "nat") or not rootless() or not sys.platform.startswith("linux"):
        return None
    where = f"network={policy!r} without root"
    if not find("nft"):
        return f"{where} needs nft (fix: apt install nftables)"
    refused = _userns_refused()
    if refused:
        return f"{where}: {refused}"
    if not os.access("/dev/net/tun", os.R_OK | os.W_OK):
        return (f"{where} needs /dev/net/tun readable and writable by this user (fix: chmod 0666 "
                f"/dev/net/tun, the distributions' default mode, or run as root)")
    if policy == "nat" and not shutil.which("pasta"):
        return f"{where} needs pasta for its uplink (fix: apt install passt, or run as root)"
    return None


def describe() -> list[str]:
    """The doctor's network lines: which mode this user gets, and per policy why not."""
    if not sys.platform.startswith("linux"):
        return ["network: only 'none' on this host (isolated and nat need Linux)"]
    if not rootless():
        return ["network: root mode (run namespaces with ip netns, a veth + masquerade uplink): "
                "isolated and nat available"]
    lines = [f"network: rootless mode (uid {os.getuid()}: an unprivileged user namespace holds the run "
             f"namespace; nat's uplink is pasta)"]
    for policy in ("isolated", "nat"):
        reason = unavailable(policy)
        lines.append(f"network {policy}: {'works' if reason is None else 'skipped: ' + reason}")
    return lines


def check(policy: str) -> None:
    reason = unavailable(policy)
    if reason:
        raise NetworkUnavailable(reason)


# ------------------------------------------------------------------ records

def records_dir() -> Path:
    return runtime_dir() / "userns"


def _record_path(name: str) -> Path:
    return records_dir() / f"{name}.json"


def sock_path(name: str) -> Path:
    return records_dir() / f"{name}.sock"


def _read_record(name: str) -> dict[str, Any] | None:
    try:
        data = json.loads(_record_path(name).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_record(name: str, data: dict[str, Any]) -> None:
    tmp = _record_path(name).with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, _record_path(name))


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _is_holder(name: str, rec: dict[str, Any]) -> bool:
    """The record's pid is the holder we started: same start time, our module and name on
    its command line, and a user namespace of its own."""
    pid, started = rec.get("pid"), rec.get("start")
    if not isinstance(pid, int) or pid <= 1 or process_start_time(pid) != started:
        return False
    argv = _cmdline(pid)
    if HOLDER not in argv or name not in argv:
        return False
    try:
        return os.readlink(f"/proc/{pid}/ns/user") != os.readlink("/proc/self/ns/user")
    except OSError:
        return False


def net_dev(name: str) -> str:
    """``/proc/net/dev`` as namespace ``name`` sees it: through its verified holder's ``/proc``
    entry (a process of ours), so reading interface counters needs no request to it."""
    rec = _read_record(name)
    if rec is None or not _is_holder(name, rec):
        raise NetworkError(f"rootless network namespace {name!r} has no live holder")
    try:
        return Path(f"/proc/{rec['pid']}/net/dev").read_text()
    except OSError as exc:
        raise NetworkError(f"cannot read the interfaces of rootless network namespace {name!r}: {exc}") from exc


def _is_pasta(rec: dict[str, Any]) -> bool:
    pasta = rec.get("pasta") or {}
    pid = pasta.get("pid")
    if not isinstance(pid, int) or pid <= 1 or process_start_time(pid) != pasta.get("start"):
        return False
    argv = _cmdline(pid)
    return bool(argv) and os.path.basename(argv[0]) == "pasta" and f"/proc/{rec.get('pid')}/ns/net" in argv


def names(prefix: str) -> list[str]:
    try:
        return sorted(p.name[:-5] for p in records_dir().glob(f"{prefix}*.json"))
    except OSError:
        return []


def exists(name: str) -> bool:
    rec = _read_record(name)
    return rec is not None and _is_holder(name, rec)


# ------------------------------------------------------------------ life of a holder

def create(name: str) -> None:
    """Start the holder of namespace ``name`` and wait until it serves."""
    records_dir().mkdir(mode=0o700, parents=True, exist_ok=True)
    check_socket_path(sock_path(name), "rootless namespace holder")
    argv = [sys.executable, "-I", "-B", HOLDER, name, str(records_dir())]
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
    except OSError as exc:
        raise NetworkError(f"cannot start the namespace holder for {name!r}: {exc}") from exc
    assert proc.stdout is not None and proc.stderr is not None
    timer = threading.Timer(START_TIMEOUT, proc.kill)
    timer.start()
    try:
        line = proc.stdout.readline().decode(errors="replace").strip()
    finally:
        timer.cancel()
    if line != "ready":
        proc.kill()
        err = proc.stderr.read().decode(errors="replace").strip()[-600:]
        proc.wait()
        raise NetworkError(f"cannot create the rootless network namespace {name!r}: {line or err or 'no answer'}")
    proc.stdout.close()
    proc.stderr.close()
    _write_record(name, {"pid": proc.pid, "start": process_start_time(proc.pid), "name": name})
    # The holder runs on in its own session; the reap/remove path ends it.
    _reap_later(proc)


def _reap_later(proc: subprocess.Popen[bytes]) -> None:
    threading.Thread(target=proc.wait, name="smolvm-holder-wait", daemon=True).start()


def _kill_verified(pid: int, ok: bool, what: str, errors: list[str]) -> None:
    if not ok:
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    except OSError as exc:
        errors.append(f"cannot kill {what} {pid}: {exc}")
        return
    for _ in range(100):
        if process_start_time(pid) is None:
            return
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.02)
    errors.append(f"{what} {pid} survived SIGKILL")


def remove(name: str) -> list[str]:
    """Kill pasta and the holder of ``name`` (each only if it is the one recorded); the
    namespaces, TAPs and tables die with them. Returns what failed."""
    rec = _read_record(name)
    errors: list[str] = []
    if rec is None:
        return errors
    if rec.get("pasta"):
        _kill_verified(rec["pasta"]["pid"], _is_pasta(rec), "pasta", errors)
    _kill_verified(int(rec.get("pid") or 0), _is_holder(name, rec), "namespace holder", errors)
    if not errors:
        for p in (_record_path(name), sock_path(name)):
            p.unlink(missing_ok=True)
    return errors


def host_addresses() -> list[str]:
    """This process's network namespace's IPv4 addresses (where pasta's traffic leaves)."""
    import psutil

    return sorted({a.address for addrs in psutil.net_if_addrs().values() for a in addrs
                   if a.family == socket.AF_INET})


def start_pasta(name: str) -> bool:
    """Connect ``name`` to this process's network namespace through pasta; False if it was."""
    rec = _read_record(name)
    if rec is None or not _is_holder(name, rec):
        raise NetworkError(f"rootless network namespace {name!r} has no live holder")
    if rec.get("pasta") and _is_pasta(rec):
        return False
    pidfile = records_dir() / f"{name}.pasta.pid"
    pidfile.unlink(missing_ok=True)
    pid = rec["pid"]
    argv = ["pasta", "--quiet", "-4", "--config-net", "-I", PASTA_IF, "--no-map-gw",
            "-t", "none", "-u", "none", "-T", "none", "-U", "none", "--no-dhcp",
            "--runas", str(os.getuid()), "-P", str(pidfile),
            "--netns", f"/proc/{pid}/ns/net", "--userns", f"/proc/{pid}/ns/user"]
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=START_TIMEOUT, check=False,
                             stdin=subprocess.DEVNULL, start_new_session=True)
        ppid = int(pidfile.read_text().strip())
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        raise NetworkError(f"pasta did not start for {name!r}: {exc}") from exc
    finally:
        pidfile.unlink(missing_ok=True)
    rec["pasta"] = {"pid": ppid, "start": process_start_time(ppid)}
    _write_record(name, rec)
    if res.returncode != 0 or not _is_pasta(rec):
        errs: list[str] = []
        _kill_verified(ppid, _is_pasta(rec), "pasta", errs)
        raise NetworkError(f"pasta failed to connect {name!r} (exit {res.returncode}): {res.stderr.strip()[-500:]}")
    return True


# ------------------------------------------------------------------ client

def call(name: str, op: str, *, timeout: float = 60.0, **args: Any) -> tuple[dict[str, Any], list[int]]:
    """One request to the holder of ``name``: (reply, descriptors)."""
    rec = _read_record(name)
    if rec is None:
        raise NetworkError(f"rootless network namespace {name!r} does not exist (no holder record in {records_dir()})")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(sock_path(name)))
            pid, _, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
            if pid != rec.get("pid") or not _is_holder(name, rec):
                raise NetworkError(f"the socket of rootless namespace {name!r} is not served by its holder "
                                   f"(peer pid {pid}, recorded {rec.get('pid')}): refusing it")
            send(sock, {"op": op, **args})
            reply, fds = recv(sock)
        except OSError as exc:
            raise NetworkError(f"rootless network namespace {name!r}: {op} failed: {exc}") from exc
    if "error" in reply:
        for fd in fds:
            os.close(fd)
        raise NetworkError(f"in rootless network namespace {name!r}: {reply['error']}")
    return reply, fds


def one_fd(name: str, op: str, **args: Any) -> int:
    _, fds = call(name, op, **args)
    if len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise NetworkError(f"rootless network namespace {name!r}: {op} returned no descriptor")
    os.set_inheritable(fds[0], False)
    return fds[0]
