"""The run's egress proxy: secrets added on the way out, for their own hosts only.

Each VM with secrets gets a :class:`SecretProxy`: a listening socket on its gateway
(``PORT``, in the run's namespace) and threads of the process that owns the VM. nft
redirects the VM's TCP 443 to the addresses the run's resolver gave for a secret's hosts
(``@secretdst``, filled when the resolver answers such a name) to that socket. There the
proxy:

1. accepts only the VM's guest address, and only connections that nft redirected to an
   address a secret's host resolved to (``SO_ORIGINAL_DST``);
2. terminates TLS with a leaf minted for the SNI by the run's CA (:class:`RunCA`, key in
   memory only), offering HTTP/1.1 only (ALPN); before it finishes the guest's handshake it
   connects to the original address from the uplink namespace and verifies the real
   certificate for the SNI name against the host's trust store or
   ``SMOLVM_UPSTREAM_CA_BUNDLE``: a host that cannot prove its name fails the guest's
   handshake, and nothing is sent;
3. reads each request with ``h11`` (bounded head size); the ``Host`` header must name the
   SNI host; a header carrying a placeholder of a secret that does not belong to that host
   refuses the request (403) and records ``secret NAME sent to HOST: refused``; the
   placeholders of the host's own secrets are replaced by their values, in header values
   only (bodies are streamed through untouched: see docs/secrets.md);
4. forwards the request and streams the response back (``h11`` both ways).

Bounds: ``MAX_CONNS`` connections per VM at once (more are closed at accept), ``RATE``
requests per second per VM (burst ``BURST``, then 429), request heads of ``MAX_HEAD``
bytes, ``IDLE`` seconds of idleness. Each VM has its own listener and threads, so one VM's
flood leaves the others served.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import socket
import ssl
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Final

from ..errors import NetworkError
from . import netns
from .credentials import Secret, SecretBook
from .policy import SECRETS_PROXY_PORT as PORT

log = logging.getLogger(__name__)

MAX_CONNS: Final = 16
RATE: Final = 20.0
BURST: Final = 40
MAX_HEAD: Final = 16 * 1024
IDLE: Final = 30.0
CONNECT_TIMEOUT: Final = 10.0
MAX_LEAVES: Final = 256
SO_ORIGINAL_DST: Final = 80
CHUNK: Final = 65536
UPSTREAM_CA_ENV: Final = "SMOLVM_UPSTREAM_CA_BUNDLE"


Handler = Callable[["SecretProxy", socket.socket], None]


class RunCA:
    """The run's CA (a fresh key per process, never written anywhere) and its leaves."""

    def __init__(self) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self._x509, self._hashes, self._ser = x509, hashes, serialization
        now = datetime.datetime.now(datetime.UTC)
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._leaf_key = ec.generate_private_key(ec.SECP256R1())
        self._name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"pytest-smolvm run CA {os.getpid()}")])
        self.cert = (x509.CertificateBuilder().subject_name(self._name).issuer_name(self._name)
                     .public_key(self._key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(hours=1))
                     .not_valid_after(now + datetime.timedelta(days=2))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                     .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                                    critical=True)
                     .sign(self._key, hashes.SHA256()))
        self.pem = self.cert.public_bytes(serialization.Encoding.PEM).decode()
        self._leaves: dict[str, ssl.SSLContext] = {}
        self._lock = threading.Lock()

    def context_for(self, host: str) -> ssl.SSLContext:
        """A server context whose certificate names ``host`` (cached, at most MAX_LEAVES)."""
        with self._lock:
            ctx = self._leaves.get(host)
            if ctx is None:
                if len(self._leaves) >= MAX_LEAVES:
                    self._leaves.clear()
                ctx = self._leaves[host] = self._mint(host)
            return ctx

    def _mint(self, host: str) -> ssl.SSLContext:
        x509 = self._x509
        now = datetime.datetime.now(datetime.UTC)
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, host)]))
                .issuer_name(self._name).public_key(self._leaf_key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
                .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .sign(self._key, self._hashes.SHA256()))
        ser = self._ser
        key_pem = self._leaf_key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption())
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_alpn_protocols(["http/1.1"])
        # load_cert_chain reads files only: a 0600 file in a private temporary directory, gone at once.
        with tempfile.TemporaryDirectory(prefix="smolvm-leaf-") as tmp:
            path = Path(tmp) / "leaf.pem"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(cert.public_bytes(ser.Encoding.PEM) + key_pem)
            ctx.load_cert_chain(path)
        return ctx


_ca: RunCA | None = None
_ca_lock = threading.Lock()


def run_ca() -> RunCA:
    """This process's CA, made on first use."""
    global _ca
    with _ca_lock:
        if _ca is None:
            _ca = RunCA()
        return _ca


def upstream_context() -> ssl.SSLContext:
    """How the proxy verifies real hosts: the host's trust store, or the PEM bundle named by
    ``SMOLVM_UPSTREAM_CA_BUNDLE`` (set from ``smolvm_upstream_ca_bundle`` by the plugin)."""
    bundle = os.environ.get(UPSTREAM_CA_ENV, "").strip()
    try:
        ctx = ssl.create_default_context(cafile=bundle or None)
    except (OSError, ssl.SSLError) as exc:
        raise NetworkError(f"cannot load {UPSTREAM_CA_ENV}={bundle!r}: {exc}") from exc
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


class _Bucket:
    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst, self.tokens, self.at = rate, burst, float(burst), time.monotonic()
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
            self.at = now
            if self.tokens < 1:
                return False
            self.tokens -= 1
            return True


class SecretProxy:
    """The proxy of one VM; :meth:`close` stops it (idempotent)."""

    def __init__(self, vm: str, ns: str, uplink: str | None, gateway: str, guest: str,
                 secrets: Mapping[str, Secret], placeholders: Mapping[str, str], handler: Handler) -> None:
        self.vm, self.ns, self.uplink, self.gateway, self.guest = vm, ns, uplink, gateway, guest
        self._handler = handler
        self.book = SecretBook(secrets, placeholders)
        self.hosts = self.book.hosts
        self.ca = run_ca()
        self.upstream_ctx = upstream_context()
        self._addresses: dict[str, float] = {}  # address -> expiry (monotonic)
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(MAX_CONNS)
        self._rate = _Bucket(RATE, BURST)
        self._stop = threading.Event()
        self._open: set[socket.socket] = set()
        self._listen = netns.new_socket(ns, socket.SOCK_STREAM)
        try:
            self._listen.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._listen.bind((gateway, PORT))
            self._listen.listen(64)
            self._listen.settimeout(0.2)
        except OSError as exc:
            self._listen.close()
            raise NetworkError(f"{vm}: cannot serve the secrets proxy on {gateway}:{PORT} in {ns}: {exc}") from exc
        self._thread = threading.Thread(target=self._accept_loop, name=f"smolvm-proxy-{vm}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ state

    def redirect(self, addresses: Mapping[str, int]) -> None:
        """The resolver answered a secret's host with ``addresses`` (address -> seconds)."""
        now = time.monotonic()
        with self._lock:
            self._addresses = {a: t for a, t in self._addresses.items() if t > now}
            self._addresses.update({a: now + t + 5 for a, t in addresses.items()})

    def _known(self, address: str) -> bool:
        with self._lock:
            return self._addresses.get(address, 0) > time.monotonic()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._listen.close()
        with self._lock:
            for s in list(self._open):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    # ------------------------------------------------------------------ serving

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                sock, peer = self._listen.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                continue
            if peer[0] != self.guest or not self._slots.acquire(blocking=False):
                if peer[0] == self.guest:
                    self.book.record("", "conns_refused")
                sock.close()
                continue
            with self._lock:
                self._open.add(sock)
            threading.Thread(target=self._serve, args=(sock,), name=f"smolvm-proxy-{self.vm}-conn",
                             daemon=True).start()

    def track(self, sock: socket.socket, *, add: bool = True) -> None:
        """Remember (or forget) a socket :meth:`close` must shut down."""
        with self._lock:
            if add and not self._stop.is_set():
                self._open.add(sock)
            elif add:
                sock.close()
            else:
                self._open.discard(sock)

    def _serve(self, sock: socket.socket) -> None:
        try:
            self._handler(self, sock)
        except Exception as exc:  # a hostile guest's bytes must not take the process down
            log.debug("%s: proxy connection ended: %s", self.vm, exc)
        finally:
            with self._lock:
                self._open.discard(sock)
            sock.close()
            self._slots.release()

    def original_destination(self, sock: socket.socket) -> str | None:
        """Where the guest meant to go, if nft redirected it to an address of a secret's host."""
        try:
            raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        except OSError:
            return None
        port, packed = struct.unpack("!2xH4s8x", raw)
        address = str(ipaddress.IPv4Address(packed))
        if port != 443 or address == self.gateway or not self._known(address):
            return None
        return address

    def take_request(self) -> bool:
        return self._rate.take()

    def upstream(self, address: str, host: str) -> ssl.SSLSocket:
        """A verified TLS connection to ``host`` at ``address``:443, from the uplink namespace."""
        with netns.entered(self.uplink):
            raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        raw.settimeout(CONNECT_TIMEOUT)
        try:
            raw.connect((address, 443))
            tls = self.upstream_ctx.wrap_socket(raw, server_hostname=host)
        except BaseException:
            raw.close()
            raise
        tls.settimeout(IDLE)
        return tls
