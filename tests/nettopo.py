"""A stand-in for "the host and the internet", built from network namespaces this test run
creates (and removes). Nothing here touches the root namespace or any outside address.

::

    <tag>-host  (the VMs' uplink; plays the host)      <tag>-inet  (plays the internet)
    h2i 10.99.0.1/30, ip_forward=1  ─── veth ───  i2h 10.99.0.2/30
    http://10.99.0.1/ "uplink-host"                lo: 198.51.100.10  http "allowed-host"
                                                        203.0.113.10   http "other-host"
"""

from __future__ import annotations

import dataclasses
import secrets
import subprocess
import sys
import time
from pathlib import Path

from pytest_smolvm.network import netns

ALLOWED_HOST = "198.51.100.10"
ALLOWED_NET = "198.51.100.0/24"
OTHER_HOST = "203.0.113.10"
UPLINK_ADDR = "10.99.0.1"
PAGES = {ALLOWED_HOST: "allowed-host", OTHER_HOST: "other-host", UPLINK_ADDR: "uplink-host"}


#: An HTTP server on port 80 of ``argv[1]`` serving ``argv[2]``: ``python -m http.server``
#: without its ``getfqdn()`` at bind time, a reverse DNS lookup that, from the uplink namespace
#: (whose default route leads into the internet namespace, where it is dropped), waited out
#: the resolver's timeouts: ~10 s per Internet.
SERVER = """
import functools, http.server, socketserver, sys
class Server(http.server.ThreadingHTTPServer):
    def server_bind(self):
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=sys.argv[2])
Server((sys.argv[1], 80), handler).serve_forever()
"""


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True)


@dataclasses.dataclass
class Internet:
    host_ns: str
    inet_ns: str
    servers: list[subprocess.Popen[bytes]]

    @property
    def uplink(self) -> str:
        return self.host_ns

    @classmethod
    def create(cls, root: Path) -> Internet:
        tag = f"svt{secrets.token_hex(3)}"
        host, inet = f"{tag}-host", f"{tag}-inet"
        net = cls(host, inet, [])
        try:
            for ns in (host, inet):
                sh("ip", "netns", "add", ns)
                sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "link", "add", "h2i", "netns", host, "type", "veth", "peer", "name", "i2h", "netns", inet)
            sh("ip", "-n", host, "addr", "add", f"{UPLINK_ADDR}/30", "dev", "h2i")
            sh("ip", "-n", host, "link", "set", "h2i", "up")
            sh("ip", "-n", inet, "addr", "add", "10.99.0.2/30", "dev", "i2h")
            sh("ip", "-n", inet, "link", "set", "i2h", "up")
            sh("ip", "-n", host, "route", "add", "default", "via", "10.99.0.2")
            sh("ip", "netns", "exec", host, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            for addr in (ALLOWED_HOST, OTHER_HOST):  # (no dummy module on every host)
                sh("ip", "-n", inet, "addr", "add", f"{addr}/32", "dev", "lo")
            for addr, page in PAGES.items():
                d = root / addr
                d.mkdir(parents=True)
                (d / "index.html").write_text(page)
                ns = host if addr == UPLINK_ADDR else inet
                net.servers.append(subprocess.Popen(
                    ["ip", "netns", "exec", ns, sys.executable, "-c", SERVER, addr, str(d)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            for addr in PAGES:
                net.wait_listening(host if addr == UPLINK_ADDR else inet, addr)
        except BaseException:
            net.destroy()
            raise
        return net

    @staticmethod
    def wait_listening(ns: str, addr: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                netns.connect(ns, (addr, 80), 1.0).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def destroy(self) -> None:
        for p in self.servers:
            p.kill()
            p.wait()
        for ns in (self.host_ns, self.inet_ns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
