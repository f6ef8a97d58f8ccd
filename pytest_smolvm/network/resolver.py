"""The run's resolver: one per VM gateway address, inside the run's network namespace.

Each networked VM gets a :class:`VMResolver` listening on UDP and TCP port 53 of its
gateway (the host side of its TAP), on a thread of the process that owns the VM. It answers
only the VM's guest address, decides with :func:`.dns.decide`, forwards what the policy
allows to the upstreams from the VM's *uplink* namespace (the root namespace by default,
where the host's own resolvers are reachable), and before it hands out an answer under a
name allowlist it has the answer's addresses put in the VM's nft allow set for their TTL
(``allow_addresses``; the answer is SERVFAIL if that fails: fail closed).

Bounds, since every byte comes from the guest: one query is handled at a time per VM (a
UDP flood waits in the socket buffer, a kernel-bounded queue), at most ``MAX_TCP``
TCP connections with ``TCP_IDLE`` seconds of idleness and one 64 KiB message each, at most
``MAX_ADDRESSES`` addresses allowed by answers per VM, the per-VM rate and ledger of
:mod:`.dns`, and the process's answer cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import secrets
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

from dnslib import QTYPE, RCODE, DNSRecord

from ..errors import NetworkError
from . import dns, netns
from .names import RESOLVED_UPSTREAMS, host_upstreams, split_upstream

log = logging.getLogger(__name__)

PORT: Final = 53
MAX_TCP: Final = 8
TCP_IDLE: Final = 10.0
MAX_MESSAGE: Final = 65535
#: A UDP reply without EDNS is held to this many bytes (else truncated: TC, retry over TCP).
UDP_REPLY_MAX: Final = 1232
UPSTREAM_TIMEOUT: Final = 2.0
MAX_ADDRESSES: Final = 1024

#: Answers shared by every resolver of this process.
CACHE: Final = dns.Cache()

AllowAddresses = Callable[[dict[str, int]], None]


def default_upstreams() -> tuple[str, ...]:
    """The host's resolvers, as the host resolves (systemd-resolved's real upstreams)."""
    try:
        conf = Path("/etc/resolv.conf").read_text()
    except OSError:
        conf = ""
    try:
        resolved: str | None = Path(RESOLVED_UPSTREAMS).read_text()
    except OSError:
        resolved = None
    return tuple(host_upstreams(conf, resolved))


@dataclasses.dataclass
class _Conn:
    sock: socket.socket
    buf: bytearray
    idle_at: float


class VMResolver:
    """The resolver of one VM; :meth:`close` stops it (idempotent)."""

    def __init__(self, vm: str, ns: str, uplink: str | None, gateway: str, guest: str, policy: dns.NamePolicy,
                 upstreams: tuple[str, ...], allow_addresses: AllowAddresses,
                 secret_hosts: frozenset[str] = frozenset(), redirect: AllowAddresses | None = None) -> None:
        self.vm, self.ns, self.uplink, self.gateway, self.guest = vm, ns, uplink, gateway, guest
        self.policy = policy
        self.upstreams = upstreams or default_upstreams()
        self.allow_addresses = allow_addresses
        #: Names whose answers' addresses get the VM's HTTPS sent to its secrets proxy.
        self.secret_hosts, self.redirect = secret_hosts, redirect
        self.ledger = dns.Ledger()
        self.rate = dns.RateLimit()
        self.answered = 0
        self._allowed: dict[str, float] = {}  # address -> when its element expires (monotonic)
        self._stop = threading.Event()
        self._busy = threading.Lock()  # one query at a time, and never across a policy change
        self._conns: dict[int, _Conn] = {}
        self._udp = netns.new_socket(ns, socket.SOCK_DGRAM)
        try:
            self._tcp = netns.new_socket(ns, socket.SOCK_STREAM)
        except BaseException:
            self._udp.close()
            raise
        try:
            for s in (self._udp, self._tcp):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((gateway, PORT))
                s.setblocking(False)
            self._tcp.listen(MAX_TCP)
        except OSError as exc:
            self._udp.close()
            self._tcp.close()
            raise NetworkError(f"{vm}: cannot serve DNS on {gateway}:{PORT} in {ns}: {exc}") from exc
        self._thread = threading.Thread(target=self._serve, name=f"smolvm-dns-{vm}", daemon=True)
        self._thread.start()

    def set_policy(self, policy: dns.NamePolicy) -> None:
        """A live change: later queries are judged by ``policy``; the addresses earlier answers
        allowed are forgotten (the caller flushes them from the VM's allow set *after* this
        returns). Waits for a query in flight, so none judged by the old policy can put an
        address back after that flush."""
        with self._busy:
            self.policy = policy
            self._allowed = {}

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=UPSTREAM_TIMEOUT * (len(self.upstreams) + 1) + 2)
        for c in list(self._conns.values()):
            c.sock.close()
        self._conns.clear()
        self._udp.close()
        self._tcp.close()

    # ------------------------------------------------------------------ serving

    def _serve(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._udp, selectors.EVENT_READ, "udp")
        sel.register(self._tcp, selectors.EVENT_READ, "listen")
        try:
            while not self._stop.is_set():
                for key, _ in sel.select(timeout=0.2):
                    try:
                        self._event(sel, key)
                    except OSError as exc:  # e.g. a guest that does not read its TCP answers
                        log.debug("%s: DNS socket error: %s", self.vm, exc)
                        if key.data == "conn":
                            self._drop(sel, key.fd)
                    except Exception:  # one bad message must not stop the VM's DNS
                        log.exception("%s: a DNS message could not be handled", self.vm)
                        self.ledger.count_bad()
                        if key.data == "conn":
                            self._drop(sel, key.fd)
                now = time.monotonic()
                for fd, conn in list(self._conns.items()):
                    if conn.idle_at < now:
                        self._drop(sel, fd)
        except Exception:  # a bug must not take the process down; the VM's DNS stops (closed)
            log.exception("%s: resolver stopped", self.vm)
        finally:
            sel.close()

    def _event(self, sel: selectors.BaseSelector, key: selectors.SelectorKey) -> None:
        if key.data == "udp":
            data, peer = self._udp.recvfrom(MAX_MESSAGE)
            if peer[0] == self.guest:
                out = self.handle(data, tcp=False)
                if out is not None:
                    self._udp.sendto(out, peer)
        elif key.data == "listen":
            sock, peer = self._tcp.accept()
            if peer[0] != self.guest or len(self._conns) >= MAX_TCP:
                sock.close()
                return
            sock.setblocking(False)
            self._conns[sock.fileno()] = _Conn(sock, bytearray(), time.monotonic() + TCP_IDLE)
            sel.register(sock, selectors.EVENT_READ, "conn")
        else:
            self._tcp_read(sel, key.fd)

    def _tcp_read(self, sel: selectors.BaseSelector, fd: int) -> None:
        conn = self._conns[fd]
        chunk = conn.sock.recv(MAX_MESSAGE + 2 - len(conn.buf))
        if not chunk:
            return self._drop(sel, fd)
        conn.buf += chunk
        while len(conn.buf) >= 2 and len(conn.buf) >= 2 + (size := struct.unpack("!H", conn.buf[:2])[0]):
            msg, conn.buf[:] = bytes(conn.buf[2:2 + size]), conn.buf[2 + size:]
            out = self.handle(msg, tcp=True)
            if out is None:
                return self._drop(sel, fd)
            conn.sock.settimeout(UPSTREAM_TIMEOUT)
            conn.sock.sendall(struct.pack("!H", len(out)) + out)
            conn.sock.setblocking(False)
            conn.idle_at = time.monotonic() + TCP_IDLE
        return None

    def _drop(self, sel: selectors.BaseSelector, fd: int) -> None:
        conn = self._conns.pop(fd, None)
        if conn is not None:
            sel.unregister(conn.sock)
            conn.sock.close()

    # ------------------------------------------------------------------ answering

    def handle(self, data: bytes, *, tcp: bool) -> bytes | None:
        """The reply to one message from the guest (None: no reply)."""
        request = dns.parse(data)
        if request is None:
            self.ledger.count_bad()
            return None
        if not self.rate.take():
            self.ledger.count_rate()
            return bytes(dns.reply(request, dns.Verdict.REFUSED).pack())
        with self._busy:
            return self._judged(request, tcp)

    def _judged(self, request: DNSRecord, tcp: bool) -> bytes:
        policy = self.policy
        decision = dns.decide(request, policy)
        if decision.verdict in (dns.Verdict.NXDOMAIN, dns.Verdict.REFUSED) and decision.name:
            self.ledger.deny(decision.name)
        if decision.verdict is not dns.Verdict.FORWARD:
            return bytes(dns.reply(request, decision.verdict).pack())
        answer = self._answer(request, decision.name, tcp)
        if answer is None or not self._allow(answer, policy) or not self._redirect(decision.name, answer):
            self.ledger.count_failure()
            failed = request.reply()
            failed.header.rcode = RCODE.SERVFAIL
            return bytes(failed.pack())
        self.answered += 1
        out = bytes(answer.pack())
        if not tcp and len(out) > UDP_REPLY_MAX:
            answer = request.reply()
            answer.header.tc = 1
            out = bytes(answer.pack())
        return out

    def _allow(self, answer: DNSRecord, policy: dns.NamePolicy) -> bool:
        """Put the answer's addresses in the VM's allow set (names allowlists only)."""
        if policy.mode is not dns.Mode.NAMES:
            return True
        now = time.monotonic()
        wanted = {a: dns.element_timeout(ttl) for a, ttl in dns.answer_addresses(answer).items()}
        fresh = {a: t for a, t in wanted.items() if self._allowed.get(a, 0) < now + t - 1}
        if not fresh:
            return True
        self._allowed = {a: t for a, t in self._allowed.items() if t > now}
        if len(self._allowed.keys() | fresh.keys()) > MAX_ADDRESSES:
            log.warning("%s: more than %d addresses allowed by answers; refusing more", self.vm, MAX_ADDRESSES)
            return False
        try:
            self.allow_addresses(fresh)
        except NetworkError as exc:
            log.warning("%s: %s", self.vm, exc)
            return False
        self._allowed.update({a: now + t for a, t in fresh.items()})
        return True

    def _redirect(self, name: str, answer: DNSRecord) -> bool:
        """A secret's host: its addresses go to the secrets proxy before the guest learns
        them (else its first connection would leave without the proxy). Fails closed."""
        if name not in self.secret_hosts or self.redirect is None:
            return True
        wanted = {a: dns.element_timeout(ttl) for a, ttl in dns.answer_addresses(answer).items()}
        try:
            self.redirect(wanted)
        except NetworkError as exc:
            log.warning("%s: %s", self.vm, exc)
            return False
        return True

    def _answer(self, request: DNSRecord, name: str, tcp: bool) -> DNSRecord | None:
        q = request.questions[0]
        key = (",".join(self.upstreams), name, int(q.qtype))
        cached = CACHE.get(key, request)
        if cached is not None:
            return cached
        for upstream in self.upstreams:
            answer = self._ask(request, upstream, tcp)
            if answer is not None and answer.header.rcode in (RCODE.NOERROR, RCODE.NXDOMAIN):
                CACHE.put(key, answer)
                answer.header.id = request.header.id
                return answer
        return None

    def _ask(self, request: DNSRecord, upstream: str, tcp: bool) -> DNSRecord | None:
        """One question to one upstream, from the uplink namespace; None if it failed."""
        host, port = split_upstream(upstream)
        query = DNSRecord.question(str(request.questions[0].qname), QTYPE.get(request.questions[0].qtype))
        query.header.id = secrets.randbelow(65536)
        query.header.rd = 1
        try:
            with self._upstream_socket(tcp) as sock:
                sock.connect((host, port))
                data = query.pack()
                if tcp:
                    sock.sendall(struct.pack("!H", len(data)) + data)
                    raw = _read_tcp(sock)
                else:
                    sock.send(data)
                    raw = sock.recv(MAX_MESSAGE)
        except OSError as exc:
            log.debug("%s: upstream %s failed: %s", self.vm, upstream, exc)
            return None
        answer = dns.parse(raw)
        if answer is None:
            return None
        if answer.header.tc and not tcp:
            return self._ask(request, upstream, True)
        return answer if dns.matches(query, answer) else None

    @contextlib.contextmanager
    def _upstream_socket(self, tcp: bool) -> Iterator[socket.socket]:
        with netns.entered(self.uplink):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM)
        try:
            sock.settimeout(UPSTREAM_TIMEOUT)
            yield sock
        finally:
            sock.close()


def _read_tcp(sock: socket.socket) -> bytes:
    head = _read_exactly(sock, 2)
    return _read_exactly(sock, struct.unpack("!H", head)[0])


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise OSError("upstream closed the connection")
        data += chunk
    return data
