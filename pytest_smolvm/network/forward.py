"""``vm.forward()``: a port on the host's 127.0.0.1 that reaches a guest port.

The guest is only reachable from inside the run's namespace, so the forwarder listens in
the host's namespace and, for each connection it accepts, opens one from inside the run's
namespace (:meth:`VMNetwork.connect`) and copies bytes both ways. No firewall rule and no
extra process: closing the forward closes its listener and every connection.

The guest is not trusted to keep up: one selector thread moves bytes with non-blocking
sockets and a bounded buffer per direction (a full one stops reading from the sender), and
each upstream connect runs in a thread of its own, so a guest that never reads, or never
answers a SYN, stalls only that connection. Connections, pending connects and buffers are
all bounded, so a stalling guest cannot make the host hold more than a few MiB per forward.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
from collections.abc import Callable

CHUNK = 1 << 16
#: Bytes held for one direction of one connection before the forwarder stops reading its sender.
HIGH_WATER = 4 * CHUNK
#: Connections one forward carries at once, and upstream connects it waits for at once; a
#: client beyond either is closed at once.
MAX_CONNECTIONS = 64
MAX_PENDING = 16


class _Side:
    """One socket of a forwarded connection and the bytes waiting to be written to it."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.out = bytearray()
        self.peer: _Side = self
        self.read_eof = False  # this socket's sender is done
        self.write_shut = False  # we passed that on to this socket
        self.events = 0


class PortForward:
    """Listens on ``127.0.0.1:<host_port>``; each connection is piped to ``connect()``."""

    def __init__(self, connect: Callable[[], socket.socket], name: str) -> None:
        self._connect = connect
        self._name = name
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.setblocking(False)
        self.host_port: int = self._listener.getsockname()[1]
        self._sel = selectors.DefaultSelector()
        self._sides: set[_Side] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._pending = 0
        self._connected: list[tuple[socket.socket, socket.socket]] = []
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_w.setblocking(False)
        self._sel.register(self._listener, selectors.EVENT_READ)
        self._sel.register(self._wake_r, selectors.EVENT_READ)
        self._thread = threading.Thread(target=self._loop, name=f"smolvm-forward-{name}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------- connecting

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # e.g. EMFILE: the client is left in the backlog and retried later
            with self._lock:
                full = self._pending >= MAX_PENDING or len(self._sides) // 2 + self._pending >= MAX_CONNECTIONS
                if not full:
                    self._pending += 1
            if full:
                client.close()
                continue
            threading.Thread(target=self._connect_upstream, args=(client,), daemon=True,
                             name=f"smolvm-forward-{self._name}-connect").start()

    def _connect_upstream(self, client: socket.socket) -> None:
        """In a thread of its own: a guest that never answers delays only this client."""
        upstream = None
        try:
            upstream = self._connect()
        except BaseException:
            pass  # the guest port is closed or silent: the client sees its connection end
        with self._lock:
            self._pending -= 1
            adopted = not self._closed
            if upstream is not None and adopted:
                self._connected.append((client, upstream))
        if upstream is None or not adopted:
            client.close()
            if upstream is not None:
                upstream.close()
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def _adopt_connected(self) -> None:
        with contextlib.suppress(OSError):
            while self._wake_r.recv(4096, socket.MSG_DONTWAIT):
                pass
        with self._lock:
            pairs, self._connected = self._connected, []
        for client, upstream in pairs:
            a, b = _Side(client), _Side(upstream)
            a.peer, b.peer = b, a
            self._sides.update((a, b))
            self._update(a)
            self._update(b)

    # ------------------------------------------------------------- copying

    def _update(self, side: _Side) -> None:
        """Register for what ``side`` can do now: read while its peer's buffer has room,
        write while it has bytes waiting."""
        events = 0
        if not side.read_eof and len(side.peer.out) < HIGH_WATER:
            events |= selectors.EVENT_READ
        if side.out:
            events |= selectors.EVENT_WRITE
        if events == side.events:
            return
        if side.events == 0:
            self._sel.register(side.sock, events, side)
        elif events == 0:
            self._sel.unregister(side.sock)
        else:
            self._sel.modify(side.sock, events, side)
        side.events = events

    def _readable(self, side: _Side) -> None:
        data = side.sock.recv(CHUNK)
        if data:
            side.peer.out += data
        else:
            side.read_eof = True

    def _writable(self, side: _Side) -> None:
        sent = side.sock.send(side.out)
        del side.out[:sent]

    def _settle(self, side: _Side) -> None:
        """Pass a finished direction's end on, and drop the pair once both are done."""
        for s in (side, side.peer):
            if s.peer.read_eof and not s.out and not s.write_shut:
                s.sock.shutdown(socket.SHUT_WR)
                s.write_shut = True
        if side.write_shut and side.peer.write_shut:
            self._drop(side)
            return
        self._update(side)
        self._update(side.peer)

    def _drop(self, side: _Side) -> None:
        for s in (side, side.peer):
            if s in self._sides:
                self._sides.discard(s)
                if s.events:
                    with contextlib.suppress(KeyError, ValueError, OSError):
                        self._sel.unregister(s.sock)
                s.events = 0
                s.sock.close()

    def _loop(self) -> None:
        while not self._closed:
            for key, mask in self._sel.select(timeout=1.0):
                if key.fileobj is self._wake_r:
                    if self._closed:
                        return
                    self._adopt_connected()
                elif key.fileobj is self._listener:
                    self._accept()
                elif key.data in self._sides:  # (not dropped earlier in this round)
                    self._service(key.data, mask)

    def _service(self, side: _Side, mask: int) -> None:
        try:
            if mask & selectors.EVENT_WRITE:
                with contextlib.suppress(BlockingIOError, InterruptedError):
                    self._writable(side)
            if mask & selectors.EVENT_READ:
                with contextlib.suppress(BlockingIOError, InterruptedError):
                    self._readable(side)
            self._settle(side)
        except Exception:  # a reset, or anything else: this connection ends, the others go on
            self._drop(side)

    def close(self) -> None:
        """Stop listening and close every forwarded connection. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pairs, self._connected = self._connected, []
        self._wake()
        self._thread.join(timeout=5)
        for side in list(self._sides):
            self._drop(side)
        for client, upstream in pairs:
            client.close()
            upstream.close()
        for s in (self._listener, self._wake_r, self._wake_w):
            s.close()
        self._sel.close()
