"""Bounded host files for what a guest (or its VMM) prints.

A guest controls its serial console, and a VMM's stderr can echo guest-triggered errors: both
reach the host as pipes, and one collector thread per engine process reads all of them
(``selectors``) into :class:`CappedLog` files that keep the start and a rolling tail with a
marker where bytes were cut, and cut overlong lines. When the collector falls behind, the
pipe fills and the guest's UART waits, like a real one; the engine itself never waits on it
except, bounded, for a dead VMM's last bytes. Every reader of these files reads a bounded
amount (:func:`read_bounded`, ``reporting.tail``).
"""

from __future__ import annotations

import os
import selectors
import threading
import time
from pathlib import Path

HEAD = 1 << 20
TAIL = 1 << 20
MAX_LINE = 4096
#: How stale a cut file may get while the stream keeps flowing (its tail is rewritten).
FLUSH_INTERVAL = 0.25
#: The most any reader takes from one such file (head + marker + tail, with room to spare).
READ_LIMIT = HEAD + TAIL + 4096
#: A UART writes byte by byte: after a read the collector lets output pile up this long
#: (far less than a pipe holds at any guest's rate) instead of waking for every byte.
BATCH_DELAY = 0.01


class CappedLog:
    """A byte stream mirrored to ``path`` as: the first ``head`` bytes, a marker line naming
    how many bytes were cut, the last ``tail`` bytes. Lines longer than ``max_line`` bytes
    are cut too. Fed by one thread (the collector)."""

    def __init__(self, path: Path, *, what: str = "console output", head: int | None = None,
                 tail: int | None = None, max_line: int | None = None) -> None:
        self.path = path
        self.what = what
        self.head = HEAD if head is None else head
        self.tail = TAIL if tail is None else tail
        self.max_line = MAX_LINE if max_line is None else max_line
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        self._head_len = 0
        self._tail = bytearray()
        self.cut = 0
        self.total = 0
        self._col = 0
        self._line_cut = 0
        self._dirty = False
        self._flushed_at = 0.0
        self.closed = threading.Event()

    def feed(self, data: bytes) -> None:
        self.total += len(data)
        self._store(self._cap_lines(data))

    def _store(self, data: bytes) -> None:
        room = self.head - self._head_len
        if room > 0:
            self._write(data[:room])
            self._head_len += min(room, len(data))
            data = data[room:]
        if not data:
            return
        if not self.cut and len(self._tail) + len(data) <= self.tail:
            self._write(data)  # nothing cut yet: the file is still the whole stream
            self._tail += data
            return
        self._tail += data
        excess = len(self._tail) - self.tail
        if excess > 0:
            del self._tail[:excess]
            self.cut += excess
        self._dirty = True

    def _cap_lines(self, data: bytes) -> bytes:
        parts = data.split(b"\n")
        if not self._line_cut and self._col + len(parts[0]) <= self.max_line \
                and max(map(len, parts)) <= self.max_line:
            self._col = self._col + len(parts[0]) if len(parts) == 1 else len(parts[-1])
            return data
        out = bytearray()
        for i, part in enumerate(parts):
            if i:
                out += self._line_marker() + b"\n"
                self._col = 0
            keep = part[:max(self.max_line - self._col, 0)]
            out += keep
            self._col += len(keep)
            self._line_cut += len(part) - len(keep)
        return bytes(out)

    def _line_marker(self) -> bytes:
        if not self._line_cut:
            return b""
        cut, self._line_cut = self._line_cut, 0
        return f" [... {cut} bytes of this line cut ...]".encode()

    def marker(self) -> bytes:
        return f"\n[... {self.cut} bytes of {self.what} cut ...]\n".encode()

    def flush(self, *, force: bool = False) -> None:
        """Rewrite the rolling tail after the head (at most every FLUSH_INTERVAL unless forced)."""
        if not self._dirty or self._fd is None:
            return
        now = time.monotonic()
        if not force and now - self._flushed_at < FLUSH_INTERVAL:
            return
        data = self.marker() + bytes(self._tail)
        try:
            os.pwrite(self._fd, data, self._head_len)
            os.ftruncate(self._fd, self._head_len + len(data))
        except OSError:
            self._broken()
        self._dirty = False
        self._flushed_at = now

    @property
    def dirty(self) -> bool:
        return self._dirty

    def finish(self) -> None:
        """The stream ended: write what is pending and close the file."""
        self._store(self._line_marker())
        self.flush(force=True)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.closed.set()

    def _write(self, data: bytes) -> None:
        if self._fd is None:
            return
        try:
            os.write(self._fd, data)
        except OSError:
            self._broken()

    def _broken(self) -> None:
        """The file cannot be written (disk full, ...): keep draining the pipe, stop writing."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Collector:
    """One thread that drains every VMM's output pipes of this process into their logs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: list[tuple[int, CappedLog]] = []
        self._thread: threading.Thread | None = None
        self._wake: tuple[int, int] | None = None

    def add(self, fd: int, log: CappedLog) -> None:
        """Drain the pipe ``fd`` (now owned by the collector) into ``log``."""
        os.set_blocking(fd, False)
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._wake = os.pipe()
                os.set_blocking(self._wake[0], False)
                os.set_blocking(self._wake[1], False)
                self._thread = threading.Thread(target=self._run, args=(self._wake[0],),
                                                name="smolvm-console", daemon=True)
                self._thread.start()
            self._pending.append((fd, log))
            assert self._wake is not None
            try:
                os.write(self._wake[1], b"\0")
            except BlockingIOError:
                pass  # already woken

    def _run(self, wake_fd: int) -> None:
        sel = selectors.DefaultSelector()
        sel.register(wake_fd, selectors.EVENT_READ, None)
        logs: dict[int, CappedLog] = {}
        while True:
            timeout = FLUSH_INTERVAL if any(log.dirty for log in logs.values()) else None
            events = sel.select(timeout)
            for key, _ in events:
                if key.data is None:
                    self._take_pending(sel, wake_fd, logs)
                else:
                    self._pump(sel, key.fd, logs)
            for log in logs.values():
                log.flush()
            if events:
                time.sleep(BATCH_DELAY)

    def _take_pending(self, sel: selectors.BaseSelector, wake_fd: int, logs: dict[int, CappedLog]) -> None:
        try:
            os.read(wake_fd, 4096)
        except BlockingIOError:
            pass
        with self._lock:
            pending, self._pending = self._pending, []
        for fd, log in pending:
            logs[fd] = log
            sel.register(fd, selectors.EVENT_READ, log)

    @staticmethod
    def _pump(sel: selectors.BaseSelector, fd: int, logs: dict[int, CappedLog]) -> None:
        log = logs[fd]
        try:
            data = os.read(fd, 1 << 16)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            log.feed(data)
            log.flush()
            return
        sel.unregister(fd)
        os.close(fd)
        del logs[fd]
        log.finish()

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()
        self._pending = []
        self._thread = None
        self._wake = None


COLLECTOR = Collector()
os.register_at_fork(after_in_child=COLLECTOR._after_fork_in_child)


def read_bounded(path: Path, limit: int = READ_LIMIT) -> str:
    """The text of ``path``, or its first and last ``limit // 2`` bytes around a marker."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size <= limit:
                data = f.read(limit)
            else:
                half = limit // 2
                head = f.read(half)
                f.seek(size - half)
                data = head + f"\n[... {size - 2 * half} bytes of {path.name} not read ...]\n".encode() + f.read(half)
    except OSError:
        return ""
    return data.decode(errors="replace")
