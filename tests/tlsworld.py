"""A test internet with HTTPS "real hosts" for the secrets proxy (tests and benchmarks).

tests/nettopo.py's namespaces, plus in its internet namespace an authoritative zone
(tests/dnszone.py) and HTTPS servers whose certificates come from a test CA made here
(``root/ca.pem``), each logging "<Host> <Authorization>" of every request it gets:

- ``api.example.test`` and ``other.test`` share ``API_ADDR`` (one server, two names; log
  ``root/api.log``); ``direct.example.test`` is the same certificate at ``DIRECT_ADDR``
  (log ``root/direct.log``), an address no secret's host shares;
- ``bad.example.test`` at ``BAD_ADDR`` presents a certificate of a CA nobody trusts
  (log ``root/bad.log``).

Nothing here touches the root namespace or any outside address.
"""

from __future__ import annotations

import dataclasses
import datetime
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import TracebackType

from dnszone import Zone
from nettopo import Internet

from pytest_smolvm.network import netns

ZONE_ADDR = "192.0.2.53"
API_ADDR = "192.0.2.44"
BAD_ADDR = "192.0.2.45"
DIRECT_ADDR = "192.0.2.46"
HOSTS = ["api.example.test", "other.test", "bad.example.test"]
RECORDS = {"api.example.test": API_ADDR, "other.test": API_ADDR, "direct.example.test": DIRECT_ADDR,
           "bad.example.test": BAD_ADDR}

#: An HTTPS server on ``argv[1]``:443 with cert+key ``argv[2]``; appends "<host> <authorization>"
#: of each request to ``argv[3]`` and answers "ok".
HTTPS_SERVER = textwrap.dedent("""
    import http.server, socketserver, ssl, sys
    addr, chain, log = sys.argv[1:4]
    class H(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        def do_GET(self):
            with open(log, "a") as f:
                f.write("%s %s\\n" % (self.headers.get("Host"), self.headers.get("Authorization")))
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")
        def log_message(self, *a):
            pass
    class S(http.server.ThreadingHTTPServer):
        def server_bind(self):
            socketserver.TCPServer.server_bind(self)
            self.server_name, self.server_port = self.server_address[:2]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(chain)
    s = S((addr, 443), H)
    s.socket = ctx.wrap_socket(s.socket, server_side=True)
    s.serve_forever()
""")


def _cert(name: str, sans: list[str], issuer: tuple[object, object] | None) -> tuple[bytes, bytes, object, object]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    ikey, iname = issuer if issuer else (key, subject)
    now = datetime.datetime.now(datetime.UTC)
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(iname).public_key(key.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
         .not_valid_after(now + datetime.timedelta(days=1)))
    if issuer is None:
        b = b.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    else:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(s) for s in sans]), critical=False)
    cert = b.sign(ikey, hashes.SHA256())  # type: ignore[arg-type]
    pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return pem, key_pem, key, subject


@dataclasses.dataclass
class TLSWorld:
    root: Path
    net: Internet
    zone: Zone

    @classmethod
    def create(cls, root: Path) -> TLSWorld:
        ca_pem, _, ca_key, ca_name = _cert("smolvm test CA", [], None)
        _, _, rogue_key, rogue_name = _cert("rogue CA", [], None)
        (root / "ca.pem").write_bytes(ca_pem)
        api_pem, api_key, _, _ = _cert("api.example.test", ["api.example.test", "other.test", "direct.example.test"],
                                       (ca_key, ca_name))
        bad_pem, bad_key, _, _ = _cert("bad.example.test", ["bad.example.test"], (rogue_key, rogue_name))
        (root / "api.pem").write_bytes(api_pem + api_key)
        (root / "bad.pem").write_bytes(bad_pem + bad_key)
        net = Internet.create(root / "inet")
        try:
            for addr in (ZONE_ADDR, API_ADDR, BAD_ADDR, DIRECT_ADDR):
                subprocess.run(["ip", "-n", net.inet_ns, "addr", "add", f"{addr}/32", "dev", "lo"], check=True)
            for addr, chain, log in ((API_ADDR, "api.pem", "api.log"), (BAD_ADDR, "bad.pem", "bad.log"),
                                     (DIRECT_ADDR, "api.pem", "direct.log")):
                (root / log).write_text("")
                net.servers.append(subprocess.Popen(["ip", "netns", "exec", net.inet_ns, sys.executable, "-c",
                                                     HTTPS_SERVER, addr, str(root / chain), str(root / log)],
                                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            for addr in (API_ADDR, BAD_ADDR, DIRECT_ADDR):
                _wait_listening(net.inet_ns, addr)
            zone = Zone(net.inet_ns, ZONE_ADDR, RECORDS)
            zone.wait_serving()
        except BaseException:
            net.destroy()
            raise
        return cls(root, net, zone)

    def __enter__(self) -> TLSWorld:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.zone.close()
        self.net.destroy()


def _wait_listening(ns: str, addr: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            netns.connect(ns, (addr, 443), 1.0).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
