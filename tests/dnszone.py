"""An authoritative DNS server for made-up zones, served from inside a network namespace the
test made (dnslib's server, sockets created in that namespace), recording every question it
is asked. The tests' "upstream": no query ever leaves the test's namespaces."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Mapping

from dnslib import QTYPE, RCODE, RR, A, DNSRecord
from dnslib.server import BaseResolver, DNSHandler, DNSLogger, DNSServer

from pytest_smolvm.network import netns

TTL = 300


class _Zone(BaseResolver):  # type: ignore[misc]  # dnslib has no type hints
    def __init__(self, records: Mapping[str, str], ttl: int) -> None:
        self.records = {k.lower().rstrip("."): v for k, v in records.items()}
        self.ttl = ttl
        self.asked: list[str] = []
        self.lock = threading.Lock()

    def resolve(self, request: DNSRecord, handler: DNSHandler) -> DNSRecord:
        name = str(request.q.qname).lower().rstrip(".")
        with self.lock:
            self.asked.append(name)
        reply = request.reply()
        reply.header.aa = 1
        addr = self.records.get(name)
        if addr is None:
            reply.header.rcode = RCODE.NXDOMAIN
        elif request.q.qtype in (QTYPE.A, QTYPE.ANY):
            reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(addr), ttl=self.ttl))
        return reply


class Zone:
    """``Zone(ns, "192.0.2.53", {"pkgs.test": "192.0.2.80"})``: UDP and TCP port 53 of that
    address in ``ns`` answer for those names (A records, TTL ``ttl``), NXDOMAIN otherwise."""

    def __init__(self, ns: str, address: str, records: Mapping[str, str], ttl: int = TTL, port: int = 53) -> None:
        self.ns, self.address, self.port = ns, address, port
        self.zone = _Zone(records, ttl)
        quiet = DNSLogger(prefix=False, logf=lambda _msg: None)
        with netns.entered(ns):
            self.servers = [DNSServer(self.zone, address, port, tcp=tcp, logger=quiet) for tcp in (False, True)]
        for server in self.servers:
            server.start_thread()

    @property
    def upstream(self) -> str:
        return f"{self.address}:{self.port}"

    def asked(self) -> list[str]:
        """Every name asked so far, in order."""
        with self.zone.lock:
            return list(self.zone.asked)

    def ask(self, name: str, timeout: float = 2.0) -> DNSRecord:
        """Ask the zone directly (from its namespace), as a check that it serves."""
        with netns.entered(self.ns):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.settimeout(timeout)
            sock.sendto(DNSRecord.question(name).pack(), (self.address, self.port))
            return DNSRecord.parse(sock.recv(4096))
        finally:
            sock.close()

    def wait_serving(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.ask("ready.invalid", 0.5)
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise

    def close(self) -> None:
        for server in self.servers:
            server.stop()
            server.server.server_close()


class Echo:
    """A TCP echo server on ``address:7`` in ``ns`` (threads in this process)."""

    def __init__(self, ns: str, address: str) -> None:
        with netns.entered(ns):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((address, 7))
        self.sock.listen(16)
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        try:
            while data := conn.recv(4096):
                conn.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()
