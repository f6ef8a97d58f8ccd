"""``vm.forward()``: a port on the host's 127.0.0.1 that reaches a guest port.

The guest is only reachable from inside the run's namespace, so the forwarder listens in
the host's namespace and, for each connection it accepts, opens one from inside the run's
namespace (:meth:`VMNetwork.connect`) and copies bytes both ways. No firewall rule and no
extra process: closing the forward closes its listener and every connection.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
from collections.abc import Callable

CHUNK = 1 << 16


class PortForward:
    """Listens on ``127.0.0.1:<host_port>``; each connection is piped to ``connect()``."""

    def __init__(self, connect: Callable[[], socket.socket], name: str) -> None:
        self._connect = connect
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.host_port: int = self._listener.getsockname()[1]
        self._sel = selectors.DefaultSelector()
        self._peers: dict[socket.socket, socket.socket] = {}
        self._closed = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._sel.register(self._listener, selectors.EVENT_READ)
        self._sel.register(self._wake_r, selectors.EVENT_READ)
        self._thread = threading.Thread(target=self._loop, name=f"smolvm-forward-{name}", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        client, _ = self._listener.accept()
        try:
            upstream = self._connect()
        except Exception:
            client.close()  # the guest port is closed: the client sees the connection end
            return
        for a, b in ((client, upstream), (upstream, client)):
            self._peers[a] = b
            self._sel.register(a, selectors.EVENT_READ)

    def _drop(self, sock: socket.socket) -> None:
        other = self._peers.pop(sock, None)
        for s in (sock, other):
            if s is None:
                continue
            self._peers.pop(s, None)
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(s)
            s.close()

    def _loop(self) -> None:
        while not self._closed:
            for key, _ in self._sel.select(timeout=1.0):
                sock = key.fileobj
                if sock is self._wake_r:
                    return
                if sock is self._listener:
                    self._accept()
                    continue
                assert isinstance(sock, socket.socket)
                try:
                    data = sock.recv(CHUNK)
                except OSError:
                    data = b""
                peer = self._peers.get(sock)
                if peer is None:
                    continue
                if not data:
                    self._drop(sock)
                    continue
                try:
                    peer.sendall(data)
                except OSError:
                    self._drop(sock)

    def close(self) -> None:
        """Stop listening and close every forwarded connection. Idempotent."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        self._thread.join(timeout=5)
        for sock in list(self._peers):
            self._drop(sock)
        for s in (self._listener, self._wake_r, self._wake_w):
            s.close()
        self._sel.close()
