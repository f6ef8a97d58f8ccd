"""Secrets that never enter the guest (``secrets=``, the run's egress proxy), in real microVMs.

"The internet" is tests/nettopo.py's pair of namespaces; inside its internet namespace this
module adds an authoritative zone (tests/dnszone.py) and HTTPS servers with certificates of
this module's own test CA, which the proxy trusts through ``SMOLVM_UPSTREAM_CA_BUNDLE``:

- ``api.example.test`` and ``other.test`` share one address (one server, two names);
- ``bad.example.test`` presents a certificate of a CA nobody trusts.

Each server logs the ``Authorization`` header of every request it gets. No packet leaves
namespaces this module makes.
"""

from __future__ import annotations

import datetime
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from dnszone import Zone
from nettopo import Internet

from pytest_smolvm import Secret, SmolVM

Factory = Callable[..., SmolVM]
ZONE_ADDR = "192.0.2.53"
API_ADDR = "192.0.2.44"
BAD_ADDR = "192.0.2.45"
VALUE = "sk-live-" + "7f3a9c1e5b2d4860" * 2  # what must never reach the guest
HOSTS = ["api.example.test", "other.test", "bad.example.test"]

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

#: GET ``argv[1]`` with ``Authorization: Bearer $API_KEY``; prints the body or ERR.
CALL = textwrap.dedent("""
    import os, sys, urllib.request
    req = urllib.request.Request(sys.argv[1], headers={"Authorization": "Bearer " + os.environ["API_KEY"]})
    try:
        print(urllib.request.urlopen(req, timeout=30).read().decode())
    except Exception as exc:
        print("ERR", type(exc).__name__, exc)
""")

#: Opens ``argv[2]`` TCP connections to ``argv[1]``:443 as fast as it can, holds them, prints
#: how many connected, then how many of them the proxy closed without a word.
FLOOD = textwrap.dedent("""
    import socket, sys
    socks, ok = [], 0
    for _ in range(int(sys.argv[2])):
        try:
            socks.append(socket.create_connection((sys.argv[1], 443), timeout=5)); ok += 1
        except OSError:
            pass
    print(ok)
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


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Internet, Zone, Path]]:
    root = tmp_path_factory.mktemp("secrets")
    ca_pem, _, ca_key, ca_name = _cert("smolvm test CA", [], None)
    _, _, rogue_key, rogue_name = _cert("rogue CA", [], None)
    (root / "ca.pem").write_bytes(ca_pem)
    api_pem, api_key, _, _ = _cert("api.example.test", ["api.example.test", "other.test"], (ca_key, ca_name))
    bad_pem, bad_key, _, _ = _cert("bad.example.test", ["bad.example.test"], (rogue_key, rogue_name))
    (root / "api.pem").write_bytes(api_pem + api_key)
    (root / "bad.pem").write_bytes(bad_pem + bad_key)
    net = Internet.create(root / "inet")
    zone = None
    try:
        for addr in (ZONE_ADDR, API_ADDR, BAD_ADDR):
            subprocess.run(["ip", "-n", net.inet_ns, "addr", "add", f"{addr}/32", "dev", "lo"], check=True)
        for addr, chain, log in ((API_ADDR, "api.pem", "api.log"), (BAD_ADDR, "bad.pem", "bad.log")):
            (root / log).write_text("")
            net.servers.append(subprocess.Popen(["ip", "netns", "exec", net.inet_ns, sys.executable, "-c",
                                                 HTTPS_SERVER, addr, str(root / chain), str(root / log)],
                                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        zone = Zone(net.inet_ns, ZONE_ADDR, {"api.example.test": API_ADDR, "other.test": API_ADDR,
                                             "bad.example.test": BAD_ADDR})
        zone.wait_serving()
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("SMOLVM_UPSTREAM_CA_BUNDLE", str(root / "ca.pem"))
            yield net, zone, root
    finally:
        if zone is not None:
            zone.close()
        net.destroy()


def _vm(factory: Factory, net: Internet, zone: Zone) -> SmolVM:
    return factory(network="nat", allow=HOSTS, uplink=net.uplink, dns_upstream=[zone.upstream],
                   secrets={"API_KEY": Secret(VALUE, hosts=["api.example.test", "bad.example.test"])})


def call(vm: SmolVM, url: str) -> str:
    return vm.run(["python3", "-c", CALL, url], timeout=90).stdout.strip()


def test_the_value_reaches_its_host_only_and_never_the_guest(smolvm_factory: Factory,
                                                             world: tuple[Internet, Zone, Path]) -> None:
    net, zone, root = world
    vm = _vm(smolvm_factory, net, zone)
    placeholder = vm.run("printenv API_KEY").stdout.strip()
    assert placeholder.startswith("smolvm-secret-") and VALUE not in placeholder
    assert call(vm, "https://api.example.test/v1") == "ok"
    assert f"api.example.test Bearer {VALUE}" in (root / "api.log").read_text().splitlines()
    # The placeholder bound for another host (allowed by name, same address): refused, recorded.
    out = call(vm, "https://other.test/v1")
    assert out.startswith("ERR HTTPError") and "403" in out, out
    assert "secret API_KEY sent to other.test: refused" in vm.network.secret_events
    assert not [line for line in (root / "api.log").read_text().splitlines() if line.startswith("other.test")]
    # A host whose certificate does not verify: the guest's handshake fails, nothing is sent.
    out = call(vm, "https://bad.example.test/v1")
    assert out.startswith("ERR") and "SSL" in out, out
    assert (root / "bad.log").read_text() == ""
    assert any(e.startswith("bad.example.test at") and "certificate not verified" in e
               for e in vm.network.secret_events), vm.network.secret_events
    # Nowhere in the guest: env and every process's /proc environ and cmdline (read out and
    # searched here: the value is never sent in, not even to look for it), its disk (host-side,
    # after sync) and its RAM (a checkpoint's files, host-side).
    seen = vm.run('env; cat /proc/[0-9]*/environ /proc/[0-9]*/cmdline 2>/dev/null; echo "$API_KEY" > /root/ph; sync',
                  max_output=1 << 20)
    assert placeholder in seen.stdout and VALUE not in seen.stdout
    assert vm.disk_path is not None
    disk = vm.disk_path.read_bytes()
    assert placeholder.encode() in disk and VALUE.encode() not in disk  # the search finds what is there
    cp = vm.checkpoint()
    try:
        files = [p for p in cp.path.rglob("*") if p.is_file()]
        assert files
        saved = b"".join(p.read_bytes() for p in files)
        assert placeholder.encode() in saved and VALUE.encode() not in saved
        clone = smolvm_factory(checkpoint=cp, secrets={"API_KEY": Secret(VALUE, hosts=["api.example.test"])},
                               network="nat", allow=HOSTS, uplink=net.uplink, dns_upstream=[zone.upstream])
        assert clone.run("printenv API_KEY").stdout.strip() not in ("", placeholder)  # its own placeholder
        assert call(clone, "https://api.example.test/v2") == "ok"
    finally:
        cp.remove()
    assert VALUE not in repr(vm.config) and VALUE not in repr(vm.transcript)


def test_a_connection_flood_from_one_vm_leaves_the_proxy_serving_another(smolvm_factory: Factory,
                                                                         world: tuple[Internet, Zone, Path]) -> None:
    net, zone, root = world
    flooder, other = _vm(smolvm_factory, net, zone), _vm(smolvm_factory, net, zone)
    assert call(flooder, "https://api.example.test/warm") == "ok"  # resolved: its HTTPS goes to its proxy
    flood = flooder.spawn(["python3", "-c", FLOOD, "api.example.test", "1000"])
    t0 = time.monotonic()
    while flooder.network.secrets_proxy.get("conns_refused", 0) < 100 and time.monotonic() - t0 < 60:
        time.sleep(0.5)
    assert flooder.network.secrets_proxy["conns_refused"] >= 100
    assert call(other, "https://api.example.test/other") == "ok"
    assert f"api.example.test Bearer {VALUE}" in (root / "api.log").read_text()
    flood.kill()
