"""Networking without root: the run namespace owned by an unprivileged user namespace.

An ordinary user cannot ``ip netns add``, but may create a user namespace and a network
namespace owned by it, and has every capability in both. So the rootless run namespace is
the same run namespace (same TAPs, addresses and nftables policy, ``policy.py``), held by a
*holder*: ``python -m pytest_smolvm.network.userns NAME``, which unshares itself into a new
user + network namespace, maps our uid to root there, and serves requests on a socket in the
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
import ctypes
import fcntl
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from ..errors import NetworkError, NetworkUnavailable
from ..host import process_start_time
from ..paths import runtime_dir

CLONE_NEWUSER: Final = 0x10000000
CLONE_NEWNET: Final = 0x40000000
TUNSETIFF: Final = 0x400454CA
TAP_FLAGS: Final = 0x0002 | 0x1000 | 0x4000  # IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
#: Forces rootless mode for a root user (to try it, or test it, as root).
FORCE_ENV: Final = "SMOLVM_ROOTLESS_NET"
MODULE: Final = "pytest_smolvm.network.userns"
PASTA_IF: Final = "svup"  # policy.UPLINK_IF: the policy's uplink is pasta's tap
START_TIMEOUT: Final = 30.0
#: Commands the holder runs for a client: only these (argv[0]).
COMMANDS: Final = frozenset({"nft"})


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
    if not shutil.which("nft"):
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
    if MODULE not in argv or name not in argv:
        return False
    try:
        return os.readlink(f"/proc/{pid}/ns/user") != os.readlink("/proc/self/ns/user")
    except OSError:
        return False


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
    argv = [sys.executable, "-m", MODULE, name, str(records_dir())]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True, env=env)
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


def start_pasta(name: str) -> None:
    """Connect ``name`` to this process's network namespace through pasta (once)."""
    rec = _read_record(name)
    if rec is None or not _is_holder(name, rec):
        raise NetworkError(f"rootless network namespace {name!r} has no live holder")
    if rec.get("pasta") and _is_pasta(rec):
        return
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


# ------------------------------------------------------------------ client

def _send(sock: socket.socket, obj: dict[str, Any], fds: Sequence[int] = ()) -> None:
    data = json.dumps(obj).encode()
    socket.send_fds(sock, [struct.pack("!I", len(data))], list(fds))
    sock.sendall(data)


def _recv(sock: socket.socket, maxfds: int = 1) -> tuple[dict[str, Any], list[int]]:
    head, fds, _, _ = socket.recv_fds(sock, 4, maxfds)
    while head and len(head) < 4:
        more = sock.recv(4 - len(head))
        if not more:
            break
        head += more
    if len(head) < 4:
        for fd in fds:
            os.close(fd)
        raise NetworkError("the namespace holder closed the connection")
    (size,) = struct.unpack("!I", head)
    buf = b""
    while len(buf) < size:
        more = sock.recv(size - len(buf))
        if not more:
            raise NetworkError("the namespace holder closed the connection mid-reply")
        buf += more
    return json.loads(buf), fds


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
            _send(sock, {"op": op, **args})
            reply, fds = _recv(sock)
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


# ------------------------------------------------------------------ holder (server side)

def _op_run(req: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
    argv = [str(a) for a in req["argv"]]
    if not argv or argv[0] not in COMMANDS:
        return {"error": f"command {argv[:1]} is not one the holder runs"}, []
    try:
        res = subprocess.run(argv, input=req.get("input"), capture_output=True, text=True,
                             timeout=float(req.get("timeout", 30.0)), check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return {"error": f"{argv[0]} failed: {exc}"}, []
    return {"rc": res.returncode, "stdout": res.stdout, "stderr": res.stderr}, []


def _op_sysctl(req: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
    key = str(req["key"])
    if not key.startswith("net.") or ".." in key or "/" in key:
        return {"error": f"sysctl {key} is not a network one"}, []
    p = Path("/proc/sys", *key.split("."))
    if req.get("value") is not None:
        p.write_text(str(req["value"]))
    return {"value": p.read_text().strip()}, []


def _op_tap(req: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", str(req["ifname"]).encode(), TAP_FLAGS))
    except OSError:
        os.close(fd)
        raise
    return {}, [fd]


def _op_socket(req: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
    s = socket.socket(int(req["family"]), int(req["type"]))
    return {}, [s.detach()]


def _op_link(req: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=str(req["ifname"]))[0]
        if req.get("address"):
            ipr.addr("add", index=idx, address=str(req["address"]), prefixlen=int(req["prefixlen"]))
        ipr.link("set", index=idx, state="up" if req.get("up", True) else "down")
    return {}, []


def _op_conntrack(req: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
    from pyroute2 import Conntrack

    ct = Conntrack()
    try:
        ct.flush(mark=int(req["mark"]))
    except Exception as exc:
        if getattr(exc, "code", None) != 2:
            raise
    finally:
        ct.close()
    return {}, []


OPS: Final = {"run": _op_run, "sysctl": _op_sysctl, "tap": _op_tap, "socket": _op_socket,
              "link": _op_link, "conntrack": _op_conntrack}


def _serve_one(conn: socket.socket) -> None:
    fds: list[int] = []
    try:
        _, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        if uid != os.getuid():
            return
        req, _ = _recv(conn, 0)
        op = OPS.get(str(req.get("op")))
        if op is None:
            _send(conn, {"error": f"unknown op {req.get('op')!r}"})
            return
        try:
            reply, fds = op(req)
        except Exception as exc:  # anything the kernel or pyroute2 refused: the client's error
            reply = {"error": f"{req.get('op')}: {type(exc).__name__}: {exc}"}
        _send(conn, reply, fds)
    except (OSError, ValueError, NetworkError):
        pass
    finally:
        for fd in fds:
            os.close(fd)
        conn.close()


def _enter_new_namespaces() -> None:
    uid, gid = os.getuid(), os.getgid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), f"unshare(user, net): {os.strerror(ctypes.get_errno())}")
    Path("/proc/self/setgroups").write_text("deny")
    Path("/proc/self/uid_map").write_text(f"0 {uid} 1")
    Path("/proc/self/gid_map").write_text(f"0 {gid} 1")


def hold(name: str, directory: Path) -> int:
    """The holder's main: unshare, serve until killed."""
    try:
        _enter_new_namespaces()
        sock_file = directory / f"{name}.sock"
        sock_file.unlink(missing_ok=True)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            server.bind(str(sock_file))
        finally:
            os.umask(old)
        server.listen(64)
        rec = {"pid": os.getpid(), "start": process_start_time(os.getpid()), "name": name}
        tmp = directory / f"{name}.tmp"
        tmp.write_text(json.dumps(rec))
        os.replace(tmp, directory / f"{name}.json")
    except OSError as exc:
        print(f"cannot create a user + network namespace: {exc}", flush=True)
        return 1
    print("ready", flush=True)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    while True:
        conn, _ = server.accept()
        threading.Thread(target=_serve_one, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    sys.exit(hold(sys.argv[1], Path(sys.argv[2])))
