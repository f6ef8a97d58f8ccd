"""Network namespaces: create, enter (one thread at a time), remove; TAPs and sockets inside.

``setns(2)`` with ``CLONE_NEWNET`` moves only the calling *thread*, so :func:`entered` is a
context manager that enters a namespace and always comes back. Anything created inside it
stays in that namespace: netlink sockets (pyroute2), TAP devices opened through
``/dev/net/tun``, TCP sockets, and child processes spawned from that thread (``nft``).

Without root (``userns.rootless()``), a run namespace is held by an unprivileged user
namespace that no thread of ours may enter: every function here taking a namespace name
then asks that namespace's holder (``userns.py``) instead, and gets back the same thing (a
TAP or socket descriptor bound to the namespace, a command's result). Callers never enter
a run namespace themselves; ``None`` always means "where this thread is".
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import socket
import struct
import subprocess
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Final

from ..errors import NetworkError
from . import userns

CLONE_NEWNET: Final = 0x40000000
NETNS_DIR: Final = Path("/run/netns")
TUNSETIFF: Final = 0x400454CA
IFF_TAP: Final = 0x0002
IFF_NO_PI: Final = 0x1000
IFF_VNET_HDR: Final = 0x4000

_libc = ctypes.CDLL(None, use_errno=True)
_entered = threading.local()


def path(name: str) -> Path:
    return NETNS_DIR / name


def _held(name: str | None) -> bool:
    """Whether ``name`` is a rootless run namespace (one a holder owns)."""
    return name is not None and userns.rootless() and name.startswith("smolvm-")


def exists(name: str) -> bool:
    if _held(name):
        return userns.exists(name)
    return path(name).exists()


def names(prefix: str = "") -> list[str]:
    """Named network namespaces (``ip netns list``) starting with ``prefix``; without root,
    the rootless ones of this runtime directory."""
    if userns.rootless() and prefix.startswith("smolvm-"):
        return userns.names(prefix)
    try:
        return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(prefix))
    except FileNotFoundError:
        return []


def create(name: str) -> None:
    """Create the named namespace ``name`` (as ``ip netns add`` does; rootless: its holder)."""
    from pyroute2 import netns as p2netns

    if _held(name):
        userns.create(name)
        return
    try:
        p2netns.create(name)
    except Exception as exc:  # pyroute2 raises OSError or its own errors
        raise NetworkError(f"cannot create network namespace {name!r}: {exc} (needs root or CAP_SYS_ADMIN)") from exc


def remove(name: str) -> None:
    """Remove the named namespace; its interfaces (TAPs, veth ends) and nft tables go with it."""
    from pyroute2 import netns as p2netns

    if _held(name):
        errors = userns.remove(name)
        if errors:
            raise NetworkError(f"cannot remove rootless network namespace {name!r}: {'; '.join(errors)}")
        return
    if not exists(name):
        return
    try:
        p2netns.remove(name)
    except FileNotFoundError:
        pass
    except Exception as exc:
        raise NetworkError(f"cannot remove network namespace {name!r}: {exc}") from exc


def _setns(fd: int, what: str) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NetworkError(f"setns into {what} failed: {os.strerror(err)}")


@contextlib.contextmanager
def entered(name: str | None) -> Iterator[None]:
    """Run the body with this thread in namespace ``name`` (None: stay where it is)."""
    if name is None or getattr(_entered, "name", None) == name:
        yield
        return
    if _held(name):
        raise NetworkError(f"rootless network namespace {name!r} cannot be entered by a thread (ask its holder)")
    try:
        target = os.open(path(name), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NetworkError(f"network namespace {name!r} does not exist (expected {path(name)})") from None
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    previous = getattr(_entered, "name", None)
    try:
        _setns(target, f"network namespace {name!r}")
        _entered.name = name
        try:
            yield
        finally:
            _setns(home, "the thread's own network namespace")
            _entered.name = previous
    finally:
        os.close(target)
        os.close(home)


def open_tap(ns: str, ifname: str) -> int:
    """Create TAP ``ifname`` inside ``ns`` and return its file descriptor (close-on-exec).

    The TAP is not persistent: it disappears when the last descriptor (ours, and the VMM's
    copy) is closed, so a crashed run cannot leave it behind.
    """
    if _held(ns):
        return userns.one_fd(ns, "tap", ifname=ifname)
    with entered(ns):
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", ifname.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
        except OSError as exc:
            os.close(fd)
            raise NetworkError(f"cannot create TAP {ifname!r} in network namespace {ns!r}: {exc}") from exc
    return fd


def new_socket(ns: str | None, kind: int = socket.SOCK_STREAM) -> socket.socket:
    """An IPv4 socket of namespace ``ns`` (it stays bound to it wherever it is used)."""
    if _held(ns):
        assert ns is not None
        return socket.socket(fileno=userns.one_fd(ns, "socket", family=socket.AF_INET, type=kind))
    with entered(ns):
        return socket.socket(socket.AF_INET, kind)


def connect(ns: str, address: tuple[str, int], timeout: float) -> socket.socket:
    """A TCP connection made from inside ``ns`` (the socket stays bound to that namespace)."""
    sock = new_socket(ns)
    sock.settimeout(timeout)
    try:
        sock.connect(address)
    except OSError:
        sock.close()
        raise
    sock.settimeout(None)
    return sock


def run(ns: str | None, argv: Sequence[str], *, input: str | None = None, check: bool = True,
        timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` inside ``ns`` (the child inherits this thread's namespace)."""
    if _held(ns):
        assert ns is not None
        reply, _ = userns.call(ns, "run", argv=list(argv), input=input, timeout=timeout)
        res = subprocess.CompletedProcess(list(argv), reply["rc"], reply["stdout"], reply["stderr"])
    else:
        with entered(ns):
            try:
                res = subprocess.run(list(argv), input=input, capture_output=True, text=True, timeout=timeout)
            except (OSError, subprocess.SubprocessError) as exc:
                raise NetworkError(f"{argv[0]} failed in network namespace {ns or 'root'!r}: {exc}") from exc
    if check and res.returncode != 0:
        raise NetworkError(f"{' '.join(argv[:3])} failed in network namespace {ns or 'root'!r} "
                           f"(exit {res.returncode}): {res.stderr.strip()[:1000]}")
    return res


def read_sysctl(ns: str | None, key: str) -> str:
    """A namespaced sysctl (``net.*``) as seen from inside ``ns``."""
    if _held(ns):
        assert ns is not None
        return str(userns.call(ns, "sysctl", key=key)[0]["value"])
    with entered(ns):
        try:
            return Path("/proc/sys", *key.split(".")).read_text().strip()
        except OSError as exc:
            raise NetworkError(f"cannot read sysctl {key} in network namespace {ns or 'root'!r}: {exc}") from exc


def write_sysctl(ns: str, key: str, value: str) -> None:
    """Set a namespaced sysctl inside ``ns`` (only ever our own namespaces)."""
    if _held(ns):
        userns.call(ns, "sysctl", key=key, value=value)
        return
    with entered(ns):
        try:
            Path("/proc/sys", *key.split(".")).write_text(value)
        except OSError as exc:
            raise NetworkError(f"cannot set sysctl {key}={value} in network namespace {ns!r}: {exc}") from exc


def flush_conntrack(ns: str, mark: int) -> None:
    """Delete the conntrack entries of ``ns`` whose mark is ``mark`` (one VM's connections).
    pyroute2 opens its netlink socket lazily, at the first request: all of it runs inside."""
    from pyroute2 import Conntrack

    if _held(ns):
        userns.call(ns, "conntrack", mark=mark)
        return
    with entered(ns):
        try:
            ct = Conntrack()
            try:
                ct.flush(mark=mark)
            finally:
                ct.close()
        except Exception as exc:  # pyroute2's NetlinkError; ENOENT when there is nothing to flush
            if getattr(exc, "code", None) != 2:
                raise NetworkError(f"cannot flush conntrack entries (mark {mark}) in {ns!r}: {exc}") from exc


def set_link(ns: str | None, ifname: str, *, up: bool = True, address: str | None = None,
             prefixlen: int = 32) -> None:
    """Bring ``ifname`` of ``ns`` up or down, giving it ``address/prefixlen`` first if asked."""
    from pyroute2 import IPRoute

    if _held(ns):
        assert ns is not None
        userns.call(ns, "link", ifname=ifname, up=up, address=address, prefixlen=prefixlen)
        return
    with entered(ns), IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=ifname)[0]
        if address:
            ipr.addr("add", index=idx, address=address, prefixlen=prefixlen)
        ipr.link("set", index=idx, state="up" if up else "down")


def link_counters(ns: str | None, ifname: str) -> dict[str, int] | None:
    """``ifname``'s counters in ``ns`` as its own side sees them (``rx_bytes``, ``rx_packets``,
    ``tx_bytes``, ``tx_packets``), from ``/proc/net/dev`` of the namespace; None if it has no
    such interface. Rootless: read through the holder's ``/proc`` entry."""
    if _held(ns):
        assert ns is not None
        text = userns.net_dev(ns)
    else:
        with entered(ns):
            try:
                text = Path("/proc/thread-self/net/dev").read_text()
            except OSError as exc:
                raise NetworkError(f"cannot read the interfaces of network namespace {ns or 'root'!r}: {exc}") from exc
    return parse_net_dev(text).get(ifname)


def parse_net_dev(text: str) -> dict[str, dict[str, int]]:
    """``/proc/net/dev`` by interface (names cannot hold ``:``; counters may touch it)."""
    found = {}
    for line in text.splitlines()[2:]:
        name, sep, rest = line.partition(":")
        fields = rest.split()
        if sep and len(fields) >= 10 and all(f.isdigit() for f in fields[:10]):
            found[name.strip()] = {"rx_bytes": int(fields[0]), "rx_packets": int(fields[1]),
                                   "tx_bytes": int(fields[8]), "tx_packets": int(fields[9])}
    return found
