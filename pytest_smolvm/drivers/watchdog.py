"""No VMM outlives the engine process that started it, however that process ends.

One watchdog process per engine process, started at the first VMM launch. It holds the read
end of a pipe whose write end only the engine holds (close-on-exec, and closed in forked
children), so the pipe reaches end-of-file exactly when the engine is gone: exit, crash,
``os._exit`` or ``kill -9``. Before each VMM starts, the engine sends the VM directory over
the pipe; after the VMM is reaped it takes it back. At end-of-file the watchdog kills every
process of ours (or of the user VMMs drop to) whose argv names a registered directory.

Registering before the spawn makes this race-free, unlike ``PR_SET_PDEATHSIG``, which is set
after fork, fires when the *thread* that spawned the child ends, is cleared when the child
changes uid, and needs ``preexec_fn`` (unsafe in a threaded parent).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import psutil

#: Basenames (prefixes) of the VMM binaries the drivers start: the only processes the
#: watchdog and the reaper ever kill (never a shell or `tail -f` that merely names a VM dir).
VMM_NAMES = ("qemu-system", "firecracker")


def owner_uids(dropped: int | None) -> set[int]:
    """Whose processes may be our VMMs: ours, and ``dropped``, the user VMMs drop to as root."""
    return {os.getuid(), os.geteuid()} | ({dropped} if dropped is not None else set())


#: Runs in ``python3 -I -S``: stdlib only until the engine is gone, then psutil (whose
#: directory argv[2] names) to find and kill what is left. argv[3] is VMM_NAMES.
WATCHDOG_SOURCE = r"""
import os, signal, sys, time
for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(s, signal.SIG_IGN)
uids = {int(u) for u in sys.argv[1].split(",")}
VMMS = tuple(sys.argv[3].split(","))
paths, buf = set(), b""
while True:
    try:
        chunk = os.read(0, 65536)
    except InterruptedError:
        continue
    if not chunk:
        break
    *lines, buf = (buf + chunk).split(b"\n")
    for line in lines:
        if line[:1] == b"!":  # replaced by a new watchdog: leave everything to it
            sys.exit(0)
        path = bytes.fromhex(line[1:].decode()).decode("utf-8", "surrogateescape") + "/"
        (paths.add if line[:1] == b"+" else paths.discard)(path)
if not paths:
    sys.exit(0)
sys.path.insert(0, sys.argv[2])
import psutil
# A VMM forked just before the engine died may still be exec'ing: look again a few times.
for delay in (0, 0.2, 0.3, 0.5, 1.0):
    time.sleep(delay)
    for proc in psutil.process_iter(["cmdline", "uids"]):
        try:
            argv = proc.info["cmdline"] or []
            if (proc.info["uids"].real in uids and argv and os.path.basename(argv[0]).startswith(VMMS)
                    and any(p in a for a in argv for p in paths)):
                proc.kill()
        except (psutil.Error, TypeError, AttributeError):
            pass
"""


class Watchdog:
    """The engine's end of the watchdog: (re)starts it and tells it which VM directories to guard."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._write_fd: int | None = None
        self._paths: dict[str, int] = {}
        self.uids: tuple[int, ...] = ()

    def register(self, workdir: Path, vmm_uid: int | None) -> None:
        """Guard processes whose argv names ``workdir``: call *before* spawning the VMM."""
        key = os.fspath(workdir).rstrip("/")
        with self._lock:
            uids = tuple(sorted(owner_uids(vmm_uid)))
            if self._proc is None or self._proc.poll() is not None or not set(uids) <= set(self.uids):
                self._start(uids)
            self._paths[key] = self._paths.get(key, 0) + 1
            self._send(b"+", key)

    def unregister(self, workdir: Path) -> None:
        """Stop guarding ``workdir`` (its VMM is reaped). Unknown directories are ignored."""
        key = os.fspath(workdir).rstrip("/")
        with self._lock:
            count = self._paths.get(key, 0)
            if count <= 0:
                return
            if count > 1:
                self._paths[key] = count - 1
                return
            del self._paths[key]
            if self._write_fd is not None:
                self._send(b"-", key)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _start(self, uids: tuple[int, ...]) -> None:
        """Start a watchdog and hand it every directory guarded so far; then retire the old
        one, if any (it died, or guarded too few uids): the new one guards before the old
        one lets go, so there is no unguarded moment."""
        old_fd, old_proc = self._write_fd, self._proc
        read_fd, write_fd = os.pipe()  # both close-on-exec (PEP 446)
        try:
            site = os.path.dirname(os.path.dirname(psutil.__file__))
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", WATCHDOG_SOURCE, ",".join(map(str, uids)), site,
                 ",".join(VMM_NAMES)],
                stdin=read_fd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                close_fds=True, start_new_session=True, cwd="/")
        except BaseException:
            os.close(write_fd)
            raise
        finally:
            os.close(read_fd)
        self._write_fd = write_fd
        self.uids = uids
        for key in self._paths:
            self._send(b"+", key, restart=False)
        if old_fd is not None:
            try:
                os.write(old_fd, b"!\n")
            except OSError:
                pass
            os.close(old_fd)
        if old_proc is not None:
            old_proc.poll()

    def _send(self, op: bytes, key: str, *, restart: bool = True) -> None:
        assert self._write_fd is not None
        line = op + os.fsencode(key).hex().encode() + b"\n"
        try:
            os.write(self._write_fd, line)  # one line < PIPE_BUF: atomic
        except BrokenPipeError:
            if not restart:
                raise
            self._start(self.uids)  # the watchdog was killed: a new one guards everything again

    def _after_fork_in_child(self) -> None:
        """A forked child must not keep the parent's watchdog alive, nor guard its VMMs."""
        self._lock = threading.Lock()
        if self._write_fd is not None:
            try:
                os.close(self._write_fd)
            except OSError:
                pass
        self._write_fd = None
        self._proc = None
        self._paths = {}
        self.uids = ()


WATCHDOG = Watchdog()
os.register_at_fork(after_in_child=WATCHDOG._after_fork_in_child)
