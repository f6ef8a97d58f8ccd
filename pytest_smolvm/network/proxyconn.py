"""One guest connection through the secrets proxy (:mod:`.proxy`): TLS with the SNI's leaf,
then HTTP/1.1 requests framed by ``h11`` (imported here, so only VMs with secrets need it)."""

from __future__ import annotations

import socket
import ssl
from typing import Any

import h11

from ..errors import ConfigError
from .credentials import judge
from .names import allow_name
from .proxy import CHUNK, CONNECT_TIMEOUT, IDLE, MAX_HEAD, SecretProxy


def _sni_host(server_name: str | None) -> str | None:
    if not server_name or server_name.startswith("*"):
        return None
    try:
        return allow_name(server_name)
    except ConfigError:
        return None


def _handshake(proxy: SecretProxy, sock: socket.socket, dest: str) -> tuple[ssl.SSLSocket, ssl.SSLSocket, str] | None:
    """TLS with the guest; the real host is reached and verified first (inside the SNI
    callback), so a host that cannot prove its name fails the guest's handshake."""
    found: dict[str, Any] = {}

    def on_sni(conn: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _ctx: ssl.SSLContext) -> int | None:
        host = _sni_host(server_name)
        if host is None:
            proxy.book.record(f"TLS without a valid server name (SNI {str(server_name)[:64]!r}) to {dest}: refused")
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        try:
            found["up"] = proxy.upstream(dest, host)
        except ssl.SSLCertVerificationError as exc:
            proxy.book.record(f"{host} at {dest}: certificate not verified ({exc.verify_message}): refused", "failed")
            return ssl.ALERT_DESCRIPTION_HANDSHAKE_FAILURE
        except (OSError, ssl.SSLError) as exc:
            proxy.book.record(f"{host} at {dest}: unreachable ({type(exc).__name__}): refused", "failed")
            return ssl.ALERT_DESCRIPTION_HANDSHAKE_FAILURE
        found["host"] = host
        conn.context = proxy.ca.context_for(host)
        return None

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    ctx.sni_callback = on_sni
    sock.settimeout(CONNECT_TIMEOUT)
    tls = ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
    proxy.track(tls)  # from now on (the handshake included) the proxy's close() reaches it
    try:
        tls.do_handshake()
    except (OSError, ssl.SSLError):
        if "up" in found:
            found["up"].close()
        proxy.track(tls, add=False)
        tls.close()
        return None
    proxy.track(found["up"])
    tls.settimeout(IDLE)
    return tls, found["up"], found["host"]


def serve_connection(proxy: SecretProxy, sock: socket.socket) -> None:
    dest = proxy.original_destination(sock)
    if dest is None:
        return
    done = _handshake(proxy, sock, dest)
    if done is None:
        return
    tls, up, host = done
    try:
        guest = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        real = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
        while _one_request(proxy, host, tls, guest, up, real):
            guest.start_next_cycle()
            real.start_next_cycle()
    except h11.RemoteProtocolError as exc:
        if guest.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            _refuse(tls, guest, exc.error_status_hint, "bad request")
    finally:
        for s in (up, tls):
            proxy.track(s, add=False)
            s.close()


def _next(conn: h11.Connection, sock: ssl.SSLSocket) -> Any:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(sock.recv(CHUNK))


def _next_request(conn: h11.Connection, sock: ssl.SSLSocket) -> Any:
    """The guest's next request head, read MAX_HEAD + 1 bytes at most (h11 bounds only an
    *incomplete* head: a larger one arriving in one read would pass); then 431."""
    fed = 0
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        if fed > MAX_HEAD:
            raise h11.RemoteProtocolError("request head too large", error_status_hint=431)
        data = sock.recv(MAX_HEAD + 1 - fed)
        fed += len(data)
        conn.receive_data(data)


def _refuse(tls: ssl.SSLSocket, guest: h11.Connection, status: int, why: str) -> None:
    body = f"pytest-smolvm secrets proxy: {why}\n".encode()
    try:
        tls.sendall(guest.send(h11.Response(status_code=status, headers=[
            ("content-type", "text/plain"), ("content-length", str(len(body))), ("connection", "close")])) or b"")
        tls.sendall(guest.send(h11.Data(data=body)) or b"")
        tls.sendall(guest.send(h11.EndOfMessage()) or b"")
    except (OSError, h11.LocalProtocolError):
        pass


def _one_request(proxy: SecretProxy, host: str, tls: ssl.SSLSocket, guest: h11.Connection,
                 up: ssl.SSLSocket, real: h11.Connection) -> bool:
    """Relay one request and its response; True if both connections may carry another."""
    request = _next_request(guest, tls)
    if not isinstance(request, h11.Request):
        return False
    verdict = judge(proxy.book, host, request.target, request.headers)
    if verdict is None and not proxy.take_request():
        proxy.book.record("", "rate_refused")
        verdict = 429, "too many requests from this VM"
    if verdict is not None:
        _refuse(tls, guest, *verdict)
        return False
    headers = [(n, proxy.book.substitute(v.decode("latin-1"), host).encode("latin-1")) for n, v in request.headers]
    up.sendall(real.send(h11.Request(method=request.method, target=request.target, headers=headers)) or b"")
    while not isinstance(event := _next(guest, tls), h11.EndOfMessage):
        if not isinstance(event, h11.Data):
            return False
        up.sendall(real.send(event) or b"")
    up.sendall(real.send(event) or b"")
    _relay_response(real, up, guest, tls)
    proxy.book.record("", "forwarded")
    return guest.our_state is h11.DONE and real.our_state is h11.DONE and real.their_state is h11.DONE


def _relay_response(real: h11.Connection, up: ssl.SSLSocket, guest: h11.Connection, tls: ssl.SSLSocket) -> None:
    while True:
        event = _next(real, up)
        if isinstance(event, h11.InformationalResponse):
            continue  # 1xx: the guest gets the final response only
        if isinstance(event, h11.Response):
            tls.sendall(guest.send(h11.Response(status_code=event.status_code, headers=event.headers,
                                                reason=event.reason)) or b"")
        elif isinstance(event, (h11.Data, h11.EndOfMessage)):
            tls.sendall(guest.send(event) or b"")
            if isinstance(event, h11.EndOfMessage):
                return
        else:
            raise OSError(f"the real host ended the response early ({type(event).__name__})")
