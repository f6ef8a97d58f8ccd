"""The resident guest agent: serves exec/put/get requests on the virtio-serial control port.

Runs inside the guest as a child of the guest's PID 1 (a shell that reaps orphans), with the
standard library only, copied into the initramfs next to ``protocol.py``. Its imports are
C modules only: under TCG each pure-Python stdlib import (subprocess, selectors, threading,
signal, json...) costs tens of milliseconds of boot time.

Semantics the host relies on:
- ``exec`` returns when the command's *own* process exits (noticed through a pidfd), not
  when its pipes close: background processes it started keep running and never hold up the
  reply. Their later output is read and discarded, so they never die of SIGPIPE.
- Each command runs in its own session; on timeout the whole process group gets SIGKILL.
- The agent and its commands share the cgroup ``smolvm`` (pids.max, memory.max). The agent
  keeps priority with nice -20 (commands start at 0) and an OOM score of -1000.
- Output is capped per stream at the requested ``max_output``; the rest is read and dropped
  (so the guest process is never blocked on a full pipe) and the reply says it was truncated.
- ``env`` arrives over the channel and is only ever held in memory.
"""

from __future__ import annotations

import _thread
import errno
import os
import select
import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

if __package__:
    from . import protocol
else:  # in the guest, protocol.py sits beside this file
    import protocol  # type: ignore[import-not-found,no-redef]

PORT_NAME = "smolvm.ctl"
VSOCK_PORT = 1024  # drivers/firecracker.py AGENT_VSOCK_PORT
MAX_REQUEST_BODY = 1 << 30
BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "USER": "root",
    "LOGNAME": "root",
}
# Literal signal numbers (Linux, x86_64 and arm64): importing `signal` pulls in `enum`.
SIGKILL, SIGPIPE, SIGXFSZ = 9, 13, 25
CGROUP = "/sys/fs/cgroup/smolvm/cgroup.procs"
RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207
READ = select.POLLIN | select.POLLHUP | select.POLLERR
CHUNK = 1 << 16
SPAWN_RETRY_SECONDS = 10.0

_spawn_lock = _thread.allocate_lock()


def log(msg: str) -> None:
    sys.stderr.write(f"smolvm-agent: {msg}\n")
    sys.stderr.flush()


def find_port() -> str:
    base = "/sys/class/virtio-ports"
    for _ in range(1000):
        try:
            for dev in sorted(os.listdir(base)):
                with open(f"{base}/{dev}/name") as f:
                    if f.read().strip() == PORT_NAME:
                        return f"/dev/{dev}"
        except OSError:
            pass
        time.sleep(0.01)
    raise SystemExit(f"smolvm-agent: no virtio port named {PORT_NAME}")


class Channel:
    """The guest end of the control port. Reads block; on the virtio port a host disconnect
    reads as EOF and is waited out (``wait_on_eof``), since the host may reconnect."""

    def __init__(self, fd: int, *, wait_on_eof: bool = True) -> None:
        self.fd = fd
        self.wait_on_eof = wait_on_eof
        self.wlock = _thread.allocate_lock()

    def read_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = os.read(self.fd, n - len(buf))
            if not chunk:
                if not self.wait_on_eof:
                    raise EOFError("control stream closed")
                time.sleep(0.005)
                continue
            buf += chunk
        return bytes(buf)

    def send(self, header: dict[str, Any], body: bytes = b"") -> None:
        data = memoryview(protocol.encode(header, body))
        with self.wlock:
            while data:
                try:
                    n = os.write(self.fd, data)
                except (BlockingIOError, InterruptedError):
                    time.sleep(0.001)
                    continue
                data = data[n:]


def which(name: str, path: str) -> str:
    """Resolve ``name`` on the command's own PATH (not the agent's)."""
    if "/" in name:
        return name
    for d in path.split(":"):
        cand = f"{d or '.'}/{name}"
        if os.access(cand, os.X_OK) and not os.path.isdir(cand):
            return cand
    raise FileNotFoundError(errno.ENOENT, "command not found", name)


def spawn(argv: list[str], env: dict[str, str], cwd: str, fds: tuple[int, int, int]) -> int:
    """posix_spawn (vfork-fast) in a new session. posix_spawn has no chdir in Python 3.11,
    so spawns are serialised and the agent, which only uses absolute paths, changes its own
    directory around each one."""
    exe = which(argv[0], env.get("PATH", BASE_ENV["PATH"]))
    actions = [(os.POSIX_SPAWN_DUP2, fd, target) for target, fd in enumerate(fds)]
    with _spawn_lock:
        os.chdir(cwd)
        try:
            pid = os.posix_spawn(exe, argv, env, file_actions=actions, setsid=True,
                                 setsigdef=(SIGPIPE, SIGXFSZ))
        finally:
            os.chdir("/")
    # The child inherits the agent's OOM shield (-1000); hand it back to the OOM killer. (Its
    # nice value was reset at birth by SCHED_RESET_ON_FORK; its cgroup is the agent's.)
    write_quietly(f"/proc/{pid}/oom_score_adj", "0")
    return pid


def write_quietly(path: str, value: str) -> None:
    """Write ``value`` to a kernel file (procfs, cgroupfs), ignoring failure: no O_TRUNC
    (cgroupfs refuses it) and no buffered text I/O (this runs on every exec)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.write(fd, value.encode())
    except OSError:
        pass
    finally:
        os.close(fd)


def protect_thread() -> None:
    """Give the calling agent thread priority over commands (nice -20) without passing it
    on: with SCHED_RESET_ON_FORK, anything it spawns starts at nice 0. Per thread, because a
    new thread is created with the flag (and nice) reset."""
    try:
        os.sched_setscheduler(0, os.SCHED_OTHER | os.SCHED_RESET_ON_FORK, os.sched_param(0))
        os.setpriority(os.PRIO_PROCESS, 0, -20)
    except (OSError, AttributeError):
        pass


def spawn_retrying(argv: list[str], env: dict[str, str], cwd: str, fds: tuple[int, int, int]) -> int:
    """spawn(), retrying while the guest is out of process slots (EAGAIN): right after a
    fork bomb is killed, its dying processes still count against pids.max for a moment."""
    deadline = time.monotonic() + SPAWN_RETRY_SECONDS
    delay = 0.01
    while True:
        try:
            return spawn(argv, env, cwd, fds)
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.5)


def _close(*fds: int) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def do_exec(chan: Channel, req: dict[str, Any], stdin_data: bytes) -> None:
    Execution(chan, req, stdin_data).run()


class Execution:
    """One ``exec`` request, from spawn to reply and beyond: a poll loop whose events (the
    command's exit, stdin room, output, the deadline) each have a method."""

    def __init__(self, chan: Channel, req: dict[str, Any], stdin_data: bytes) -> None:
        self.chan = chan
        self.rid = req["id"]
        self.argv = req["argv"]
        self.env = dict(BASE_ENV)
        self.env.update(req.get("env") or {})
        self.cwd = req.get("cwd") or "/root"
        self.cap = int(req.get("max_output", 16 << 20))
        self.start = time.monotonic()
        timeout = req.get("timeout")
        self.deadline = self.start + float(timeout) if timeout else None
        self.pending = memoryview(stdin_data)
        self.timed_out = self.exited = False
        self.poller = select.poll()
        self.pid = self.pidfd = -1

    def run(self) -> None:
        if not self.spawn():
            return
        self.watch()
        while not self.exited:
            self.wait()
        self.take_leftovers()
        self.reply()
        self.drain_background()

    def spawn(self) -> bool:
        """Start the command on fresh pipes; on failure reply as a shell would (127/126)."""
        self.out_r, out_w = os.pipe()
        self.err_r, err_w = os.pipe()
        if self.pending:
            in_r, self.in_w = os.pipe()
        else:
            in_r, self.in_w = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC), -1
        try:
            self.pid = spawn_retrying(self.argv, self.env, self.cwd, (in_r, out_w, err_w))
        except OSError as exc:
            _close(self.out_r, out_w, self.err_r, err_w, in_r, self.in_w)
            where = f"cwd {self.cwd}" if exc.filename == self.cwd else str(self.argv[0])
            msg = f"smolvm: cannot execute {where}: {exc.strerror}\n".encode()
            self.chan.send({"op": "result", "id": self.rid, "exit_code": 127 if exc.errno == errno.ENOENT else 126,
                            "stdout_len": 0, "duration": time.monotonic() - self.start}, msg)
            return False
        _close(out_w, err_w, in_r)
        return True

    def watch(self) -> None:
        self.pidfd = os.pidfd_open(self.pid)
        self.bufs = {self.out_r: bytearray(), self.err_r: bytearray()}
        self.truncated = {self.out_r: False, self.err_r: False}
        self.live = {self.out_r, self.err_r}
        for fd in self.live:
            os.set_blocking(fd, False)
            self.poller.register(fd, READ)
        self.poller.register(self.pidfd, select.POLLIN)
        if self.in_w >= 0:
            os.set_blocking(self.in_w, False)
            self.poller.register(self.in_w, select.POLLOUT | select.POLLERR)

    def wait(self) -> None:
        """One poll, and the events it returned."""
        deadline = self.deadline
        events = self.poller.poll(None if deadline is None else max(0.0, deadline - time.monotonic()) * 1000)
        if not events and deadline is not None and time.monotonic() >= deadline:
            self.kill_on_timeout()
            return
        for fd, _ in events:
            if fd == self.pidfd:
                self.exited = True  # noticed through the pidfd, not the pipes (see module docstring)
            elif fd == self.in_w:
                self.feed_stdin()
            elif fd in self.live:
                self.read_output(fd)

    def kill_on_timeout(self) -> None:
        self.timed_out, self.deadline = True, None
        try:
            os.killpg(self.pid, SIGKILL)
        except ProcessLookupError:
            pass

    def feed_stdin(self) -> None:
        try:
            self.pending = self.pending[os.write(self.in_w, self.pending[:CHUNK]):]
        except BlockingIOError:
            return
        except OSError:  # the command closed its stdin
            self.pending = self.pending[:0]
        if not self.pending:
            self.poller.unregister(self.in_w)
            _close(self.in_w)
            self.in_w = -1

    def read_output(self, fd: int) -> str:
        """Read one chunk, keeping up to the cap and dropping the rest: "data", "empty" or "eof"."""
        try:
            chunk = os.read(fd, CHUNK)
        except BlockingIOError:
            return "empty"
        if not chunk:
            self.poller.unregister(fd)
            self.live.discard(fd)
            return "eof"
        room = self.cap - len(self.bufs[fd])
        if room > 0:
            self.bufs[fd] += chunk[:room]
        if len(chunk) > room:
            self.truncated[fd] = True
        return "data"

    def take_leftovers(self) -> None:
        """What is already in the pipes once the command exited (bounded, since a background
        child that keeps writing must not hold up the reply)."""
        for fd in (self.out_r, self.err_r):
            for _ in range(1024):
                if fd not in self.live or self.read_output(fd) != "data":
                    break

    def reply(self) -> None:
        code = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        self.poller.unregister(self.pidfd)
        _close(self.pidfd)
        if self.in_w >= 0:
            self.poller.unregister(self.in_w)
            _close(self.in_w)
        out, err = self.out_r, self.err_r
        self.chan.send({
            "op": "result", "id": self.rid, "exit_code": code, "timed_out": self.timed_out,
            "stdout_len": len(self.bufs[out]), "stdout_truncated": self.truncated[out],
            "stderr_truncated": self.truncated[err], "duration": time.monotonic() - self.start,
        }, bytes(self.bufs[out]) + bytes(self.bufs[err]))

    def drain_background(self) -> None:
        """Read and discard from pipes still held by background children until they close,
        so those children never get SIGPIPE."""
        while self.live:
            for fd, _ in self.poller.poll():
                try:
                    if not os.read(fd, CHUNK):
                        self.poller.unregister(fd)
                        self.live.discard(fd)
                except BlockingIOError:
                    pass
        _close(self.out_r, self.err_r)


def run_simple(argv: list[str]) -> tuple[int, str]:
    """Run a helper to completion and return (exit code, combined output)."""
    r, w = os.pipe()
    null = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    try:
        pid = spawn(argv, dict(BASE_ENV), "/", (null, w, w))
    finally:
        _close(w, null)
    out = bytearray()
    while chunk := os.read(r, CHUNK):
        out += chunk
    _close(r)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), out.decode(errors="replace")


def do_put(req: dict[str, Any], body: bytes) -> dict[str, Any]:
    path = req["path"]
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, int(req.get("mode", 0o644)))
    try:
        view = memoryview(body)
        while view:
            view = view[os.write(fd, view):]
        if "mode" in req:
            os.fchmod(fd, int(req["mode"]))
    finally:
        os.close(fd)
    return {"size": len(body)}


def do_get(req: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
    path = req["path"]
    limit = int(req.get("max", 1 << 30))
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise OSError(errno.EFBIG, f"file is {size} bytes, over the limit of {limit}", path)
        data = bytearray()
        while True:  # chunked: st_size may lie (procfs) and must not size an allocation
            chunk = f.read(min(1 << 20, limit + 1 - len(data)))
            if not chunk:
                break
            data += chunk
            if len(data) > limit:
                raise OSError(errno.EFBIG, f"file is over the limit of {limit} bytes", path)
    return {"size": len(data)}, bytes(data)


def do_setup(req: dict[str, Any], seed: bytes) -> dict[str, Any]:
    """Make this guest unique and current: clock, RNG, hostname, root filesystem size."""
    if "time_ns" in req:
        time.clock_settime_ns(time.CLOCK_REALTIME, int(req["time_ns"]))
    if seed:
        import _struct
        import fcntl

        with open("/dev/urandom", "wb") as f:
            try:  # credit the entropy and force a reseed, so clones diverge at once
                fcntl.ioctl(f, RNDADDENTROPY, _struct.pack("ii", len(seed) * 8, len(seed)) + seed)
                fcntl.ioctl(f, RNDRESEEDCRNG)
            except OSError:
                f.write(seed)
    if req.get("machine_id"):
        with open("/etc/machine-id", "w") as f:
            f.write(req["machine_id"] + "\n")
    if req.get("hostname"):
        log(f"setup: hostname {req['hostname']}")
        with open("/proc/sys/kernel/hostname", "w") as f:
            f.write(req["hostname"])
        with open("/etc/hostname", "w") as f:
            f.write(req["hostname"] + "\n")
    reply: dict[str, Any] = {}
    if req.get("net"):
        code, output = configure_nic(req["net"])
        reply["net"] = {"exit_code": code, "output": output[-2000:]}
    if req.get("grow_root"):
        code, output = run_simple(["resize2fs", req.get("root_device", "/dev/vda")])
        reply["resize"] = {"exit_code": code, "output": output[-2000:]}
    if req.get("volumes"):
        code, output = mount_volumes(req["volumes"])
        reply["volumes"] = {"exit_code": code, "output": output[-2000:]}
    return reply


BLKRRPART, BLKFLSBUF = 0x125F, 0x1261


def mount_volumes(volumes: list[dict[str, str]]) -> tuple[int, str]:
    """Mount each read-only volume, found by its virtio serial, at its target. First drop what
    the kernel cached of the device: a snapshot clone's volume may differ from its template's."""
    import fcntl

    devices = {}
    for name in os.listdir("/sys/block"):
        try:
            with open(f"/sys/block/{name}/serial") as f:
                devices[f.read().strip()] = f"/dev/{name}"
        except OSError:
            continue
    for vol in volumes:
        dev = devices.get(vol["serial"])
        if dev is None:
            return 1, f"no disk with serial {vol['serial']} for {vol['target']}"
        fd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, BLKFLSBUF)
            try:
                fcntl.ioctl(fd, BLKRRPART)
            except OSError:
                pass  # EINVAL: nothing to re-read on an unpartitioned disk
        finally:
            os.close(fd)
        os.makedirs(vol["target"], exist_ok=True)
        code, output = run_simple([BUSYBOX, "mount", "-t", "ext4", "-o", vol["options"], dev, vol["target"]])
        if code:
            return code, f"mount {dev} at {vol['target']}: {output.strip()}"
    return 0, ""


BUSYBOX = "/run/smolvm/busybox"


def configure_nic(net: dict[str, str]) -> tuple[int, str]:
    """Give the guest's NIC the MAC, address and default route the host leased for it (the
    VMM's argv carries one fixed MAC, so that snapshots are shared)."""
    try:
        ifname = next(n for n in sorted(os.listdir("/sys/class/net")) if n != "lo")
    except StopIteration:
        return 1, "no network interface in the guest"
    script = (f"{BUSYBOX} ip link set {ifname} address {net['mac']} && "
              f"{BUSYBOX} ip addr add {net['address']} dev {ifname} && "
              f"{BUSYBOX} ip link set {ifname} up && "
              f"{BUSYBOX} ip route replace default via {net['gateway']} dev {ifname}")
    return run_simple([BUSYBOX, "sh", "-c", script])


def _uptime() -> float:
    with open("/proc/uptime") as f:
        return float(f.read().split()[0])


def handle(chan: Channel, req: dict[str, Any], body: bytes) -> None:
    rid = req.get("id")
    op = req["op"]
    try:
        if op == "exec":
            _thread.start_new_thread(_exec_guarded, (chan, req, body))
            return
        if op == "hello":
            chan.send({"op": "hello", "id": rid, "version": protocol.PROTOCOL_VERSION,
                       "uptime": _uptime(), "pid": os.getpid()})
        elif op == "ping":
            chan.send({"op": "pong", "id": rid})
        elif op == "put":
            chan.send({"op": "ok", "id": rid, **do_put(req, body)})
        elif op == "get":
            hdr, data = do_get(req)
            chan.send({"op": "ok", "id": rid, **hdr}, data)
        elif op == "setup":
            chan.send({"op": "ok", "id": rid, **do_setup(req, body)})
        elif op == "sync":
            os.sync()
            chan.send({"op": "ok", "id": rid})
        else:
            chan.send({"op": "error", "id": rid, "error": f"unknown op {op!r}"})
    except OSError as exc:
        chan.send({"op": "error", "id": rid, "error": exc.strerror or str(exc),
                   "errno": exc.errno or 0, "path": exc.filename})
    except Exception as exc:
        chan.send({"op": "error", "id": rid, "error": f"{type(exc).__name__}: {exc}"})


def _exec_guarded(chan: Channel, req: dict[str, Any], body: bytes) -> None:
    protect_thread()
    try:
        do_exec(chan, req, body)
    except Exception as exc:
        log(f"exec failed: {exc!r}")
        chan.send({"op": "error", "id": req.get("id"), "error": f"{type(exc).__name__}: {exc}"})


def main() -> None:
    imported = _uptime()
    with open("/proc/self/stat") as f:
        started = int(f.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
    os.chdir("/")
    # A memory hog or fork bomb in a test must never take the agent with it.
    protect_thread()
    write_quietly("/proc/self/oom_score_adj", "-1000")
    write_quietly(CGROUP, str(os.getpid()))
    with open("/proc/cmdline") as f:
        vsock = " smolvm.vsock=1 " in f" {f.read().strip()} "
    if vsock:  # Firecracker: the channel is AF_VSOCK (the host reaches it via hybrid vsock)
        import _socket

        listener = _socket.socket(_socket.AF_VSOCK, _socket.SOCK_STREAM)
        listener.bind((_socket.VMADDR_CID_ANY, VSOCK_PORT))
        listener.listen(1)
        log(f"ready at {_uptime():.2f}s on vsock port {VSOCK_PORT} (python started {started:.2f}s, "
            f"imports done {imported:.2f}s)")
        serve_listener(listener)
    chan = Channel(os.open(find_port(), os.O_RDWR | os.O_CLOEXEC))
    log(f"ready at {_uptime():.2f}s (python started {started:.2f}s, imports done {imported:.2f}s)")
    serve(chan)


def serve_listener(listener: Any) -> None:
    """Serve one connection at a time from a listening socket (``_socket.socket``); when the
    host disconnects, wait for it to connect again, as on the virtio port."""
    while True:
        fd, _ = listener._accept()
        chan = Channel(fd, wait_on_eof=False)
        try:
            serve(chan)
        except (EOFError, OSError):
            pass
        finally:
            _close(fd)


def serve(chan: Channel) -> None:
    """Answer requests on ``chan`` until a frame breaks the protocol.

    After a bad frame the stream cannot be resynchronised (bytes of the rejected frame would
    be read as new requests), so the agent stops; the guest's init then powers the VM off
    and the host sees the VM die instead of a desynchronised agent.
    """
    while True:
        try:
            req, body = protocol.decode(chan.read_exact, MAX_REQUEST_BODY)
        except protocol.FrameError as exc:
            log(f"malformed request, stopping: {exc}")
            raise SystemExit(3) from None
        handle(chan, req, body)


if __name__ == "__main__":
    main()
