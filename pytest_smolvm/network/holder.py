"""The holder of a rootless run namespace: run as a script (``python -I holder.py NAME DIR``),
standard library only, so it starts in a few tens of milliseconds.

It unshares itself into a new user + network namespace (our uid mapped to root there), binds
``DIR/NAME.sock`` (0600) and prints ``ready``; the engine then writes its record (``userns.py``).
Each connection carries one request (a length-prefixed JSON object) and gets one reply, with
descriptors (a TAP, a socket) attached over ``SCM_RIGHTS``. Peers of another uid are dropped
(``SO_PEERCRED``). It runs until killed: its namespace, and all in it, dies with it.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

CLONE_NEWUSER: Final = 0x10000000
CLONE_NEWNET: Final = 0x40000000
TUNSETIFF: Final = 0x400454CA
TAP_FLAGS: Final = 0x0002 | 0x1000 | 0x4000  # IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
#: Commands the holder runs for a client: only these (argv[0]). An ordinary user's PATH often
#: lacks the sbin directories, where Debian puts nft.
COMMANDS: Final = frozenset({"nft"})
SBIN: Final = "/usr/local/sbin:/usr/sbin:/sbin"
MAX_REQUEST: Final = 16 << 20
#: The engine writes the holder's record once it said ``ready``; a holder whose engine died
#: before that (so no reap would ever find it) ends itself after this long.
RECORD_GRACE: Final = 30.0


def find(command: str) -> str | None:
    """``command`` on PATH, or in the sbin directories."""
    import shutil

    return shutil.which(command) or shutil.which(command, path=SBIN)


def send(sock: socket.socket, obj: dict[str, Any], fds: Sequence[int] = ()) -> None:
    data = json.dumps(obj).encode()
    socket.send_fds(sock, [struct.pack("!I", len(data))], list(fds))
    sock.sendall(data)


def recv(sock: socket.socket, maxfds: int = 1) -> tuple[dict[str, Any], list[int]]:
    head, fds, _, _ = socket.recv_fds(sock, 4, maxfds)
    while head and len(head) < 4:
        more = sock.recv(4 - len(head))
        if not more:
            break
        head += more
    if len(head) < 4:
        for fd in fds:
            os.close(fd)
        raise ConnectionError("the namespace holder closed the connection")
    (size,) = struct.unpack("!I", head)
    if size > MAX_REQUEST:
        raise ConnectionError(f"a message of {size} bytes")
    buf = b""
    while len(buf) < size:
        more = sock.recv(size - len(buf))
        if not more:
            raise ConnectionError("the namespace holder closed the connection mid-reply")
        buf += more
    return json.loads(buf), fds


def _op_run(req: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
    argv = [str(a) for a in req["argv"]]
    if not argv or argv[0] not in COMMANDS:
        return {"error": f"command {argv[:1]} is not one the holder runs"}, []
    argv[0] = find(argv[0]) or argv[0]
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
    kind = int(req["type"])
    if int(req["family"]) != socket.AF_INET or kind not in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        return {"error": "only IPv4 TCP and UDP sockets"}, []
    s = socket.socket(socket.AF_INET, kind)
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


Op = Callable[[dict[str, Any]], tuple[dict[str, Any], list[int]]]
OPS: Final[dict[str, Op]] = {"run": _op_run, "sysctl": _op_sysctl, "tap": _op_tap, "socket": _op_socket,
              "link": _op_link, "conntrack": _op_conntrack}


def _serve_one(conn: socket.socket) -> None:
    fds: list[int] = []
    try:
        _, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        if uid != os.getuid():
            return
        req, _ = recv(conn, 0)
        op = OPS.get(str(req.get("op")))
        if op is None:
            send(conn, {"error": f"unknown op {req.get('op')!r}"})
            return
        try:
            reply, fds = op(req)
        except Exception as exc:  # anything the kernel or pyroute2 refused: the client's error
            reply = {"error": f"{req.get('op')}: {type(exc).__name__}: {exc}"}
        send(conn, reply, fds)
    except (OSError, ValueError):
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


def _unrecorded_exit(record: Path) -> None:
    threading.Event().wait(RECORD_GRACE)
    try:
        if json.loads(record.read_text()).get("pid") == os.getpid():
            return
    except (OSError, ValueError, AttributeError):
        pass
    os._exit(0)


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
    except OSError as exc:
        print(f"cannot create a user + network namespace: {exc}", flush=True)
        return 1
    print("ready", flush=True)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    threading.Thread(target=_unrecorded_exit, args=(directory / f"{name}.json",), daemon=True).start()
    while True:
        conn, _ = server.accept()
        threading.Thread(target=_serve_one, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    sys.exit(hold(sys.argv[1], Path(sys.argv[2])))
