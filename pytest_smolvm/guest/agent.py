"""The resident guest agent: serves exec/put/get requests on the virtio-serial control port.

Runs inside the guest as a child of the guest's PID 1 (a shell that reaps orphans), with the
standard library only. It is copied into the initramfs next to ``protocol.py``.

Semantics the host relies on:
- ``exec`` returns when the command's *own* process exits (noticed through a pidfd), not
  when its pipes close: background processes it started keep running and never hold up the
  reply. Their later output is read and discarded, so they never die of SIGPIPE.
- On timeout the command's whole process group is killed with SIGKILL.
- Output is capped per stream at the requested ``max_output``; the rest is read and dropped
  (so the guest process is never blocked on a full pipe) and the reply says it was truncated.
- ``env`` arrives over the channel and is only ever held in memory.
"""

from __future__ import annotations

import errno
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

if __package__:
    from . import protocol
else:  # in the guest, protocol.py sits beside this file
    import protocol  # type: ignore[no-redef]

PORT_NAME = "smolvm.ctl"
MAX_REQUEST_BODY = 1 << 30
BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "USER": "root",
    "LOGNAME": "root",
}
RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207


def log(msg: str) -> None:
    sys.stderr.write(f"smolvm-agent: {msg}\n")
    sys.stderr.flush()


def find_port() -> str:
    base = "/sys/class/virtio-ports"
    for _ in range(500):
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
    """The guest end of the control port. Reads block; a host disconnect is waited out."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDWR)
        self.wlock = threading.Lock()
        self.poller = selectors.DefaultSelector()
        self.poller.register(self.fd, selectors.EVENT_READ)

    def read_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = os.read(self.fd, n - len(buf))
            if not chunk:  # host side not connected (or reconnecting): wait for it
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
                except OSError as exc:
                    if exc.errno in (errno.EAGAIN, errno.EINTR):
                        time.sleep(0.001)
                        continue
                    raise
                data = data[n:]


def _read_capped(fd: int, buf: bytearray, cap: int) -> tuple[str, bool]:
    """Read once from non-blocking fd into buf, keeping at most cap bytes.

    Returns (state, truncated) with state "data", "eof" or "empty" (nothing to read now).
    """
    try:
        chunk = os.read(fd, 1 << 16)
    except BlockingIOError:
        return "empty", False
    if not chunk:
        return "eof", False
    room = cap - len(buf)
    if room > 0:
        buf += chunk[:room]
    return "data", len(chunk) > room


def do_exec(chan: Channel, req: dict[str, Any], stdin_data: bytes) -> None:
    rid = req["id"]
    argv = req["argv"]
    env = dict(BASE_ENV)
    env.update(req.get("env") or {})
    cwd = req.get("cwd") or "/root"
    timeout = req.get("timeout")
    cap = int(req.get("max_output", 16 << 20))
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if stdin_data else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=env,
            start_new_session=True,
            close_fds=True,
        )
    except OSError as exc:
        what = f"cwd {cwd}" if exc.filename == cwd and cwd not in argv[:1] else f"{argv[0]}"
        msg = f"smolvm: cannot execute {what}: {exc.strerror}\n".encode()
        code = 127 if exc.errno == errno.ENOENT else 126
        chan.send({"op": "result", "id": rid, "exit_code": code, "stdout_len": 0,
                   "duration": time.monotonic() - start}, msg)
        return
    assert proc.stdout is not None and proc.stderr is not None
    pidfd = os.pidfd_open(proc.pid)
    sel = selectors.DefaultSelector()
    out, err = bytearray(), bytearray()
    streams = {proc.stdout.fileno(): out, proc.stderr.fileno(): err}
    truncated = {proc.stdout.fileno(): False, proc.stderr.fileno(): False}
    for fd in streams:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ, "read")
    sel.register(pidfd, selectors.EVENT_READ, "exit")
    pending = memoryview(stdin_data)
    if stdin_data:
        assert proc.stdin is not None
        os.set_blocking(proc.stdin.fileno(), False)
        sel.register(proc.stdin.fileno(), selectors.EVENT_WRITE, "write")
    deadline = start + float(timeout) if timeout else None
    timed_out = exited = False
    while not exited:
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        events = sel.select(wait)
        if not events and deadline is not None and time.monotonic() >= deadline:
            timed_out, deadline = True, None
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            continue
        for key, _ in events:
            fd = int(key.fd)
            if key.data == "exit":
                exited = True
            elif key.data == "write":
                try:
                    n = os.write(fd, pending[: 1 << 16])
                    pending = pending[n:]
                except BlockingIOError:
                    continue
                except BrokenPipeError:
                    pending = pending[:0]
                if not pending:
                    sel.unregister(fd)
                    proc.stdin.close()  # type: ignore[union-attr]
            else:
                state, trunc = _read_capped(fd, streams[fd], cap)
                truncated[fd] = truncated[fd] or trunc
                if state == "eof":
                    sel.unregister(fd)
    # The command exited: take what is already in the pipes, without waiting for
    # background children that may still hold them open.
    # (Bounded: a background child that keeps writing must not hold up the reply.)
    registered = {k.fd for k in sel.get_map().values() if k.data == "read"}
    for fd, buf in streams.items():
        for _ in range(1024 if fd in registered else 0):
            state, trunc = _read_capped(fd, buf, cap)
            truncated[fd] = truncated[fd] or trunc
            if state == "eof":
                sel.unregister(fd)
            if state != "data":
                break
    code = proc.wait()
    for key in list(sel.get_map().values()):
        if key.data != "read":
            sel.unregister(key.fd)
    os.close(pidfd)
    if proc.stdin is not None and not proc.stdin.closed:
        try:
            proc.stdin.close()
        except OSError:
            pass
    header = {
        "op": "result", "id": rid, "exit_code": code, "timed_out": timed_out,
        "stdout_len": len(out), "stdout_truncated": truncated[proc.stdout.fileno()],
        "stderr_truncated": truncated[proc.stderr.fileno()],
        "duration": time.monotonic() - start,
    }
    chan.send(header, bytes(out) + bytes(err))
    _discard_until_eof(sel, streams)
    proc.stdout.close()
    proc.stderr.close()


def _discard_until_eof(sel: selectors.BaseSelector, streams: dict[int, bytearray]) -> None:
    """Keep reading pipes that background children still hold, so they never get SIGPIPE."""
    live = {k.fd for k in sel.get_map().values() if k.data == "read"}
    while live:
        for key, _ in sel.select():
            if key.data != "read":
                continue
            try:
                chunk = os.read(int(key.fd), 1 << 16)
            except BlockingIOError:
                continue
            if not chunk:
                sel.unregister(key.fd)
                live.discard(int(key.fd))
    sel.close()


def do_put(req: dict[str, Any], body: bytes) -> dict[str, Any]:
    path = req["path"]
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, int(req.get("mode", 0o644)))
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
    import fcntl
    import struct

    if "time_ns" in req:
        time.clock_settime_ns(time.CLOCK_REALTIME, int(req["time_ns"]))
    if seed:
        with open("/dev/urandom", "wb") as f:
            try:  # credit the entropy and force a reseed, so clones diverge at once
                fcntl.ioctl(f, RNDADDENTROPY, struct.pack("ii", len(seed) * 8, len(seed)) + seed)
                fcntl.ioctl(f, RNDRESEEDCRNG)
            except OSError:
                f.write(seed)
    if req.get("hostname"):
        socket.sethostname(req["hostname"])
        with open("/etc/hostname", "w") as f:
            f.write(req["hostname"] + "\n")
    reply: dict[str, Any] = {}
    if req.get("grow_root"):
        res = subprocess.run(["resize2fs", req.get("root_device", "/dev/vda")],
                             capture_output=True, text=True)
        reply["resize"] = {"exit_code": res.returncode, "output": (res.stdout + res.stderr)[-2000:]}
    return reply


def handle(chan: Channel, req: dict[str, Any], body: bytes) -> None:
    rid = req.get("id")
    op = req["op"]
    try:
        if op == "exec":
            threading.Thread(target=_exec_guarded, args=(chan, req, body), daemon=True).start()
            return
        if op == "hello":
            with open("/proc/uptime") as f:
                uptime = float(f.read().split()[0])
            chan.send({"op": "hello", "id": rid, "version": protocol.PROTOCOL_VERSION,
                       "uptime": uptime, "pid": os.getpid()})
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
    except Exception as exc:  # noqa: BLE001 - the agent must survive any request
        chan.send({"op": "error", "id": rid, "error": f"{type(exc).__name__}: {exc}"})


def _exec_guarded(chan: Channel, req: dict[str, Any], body: bytes) -> None:
    try:
        do_exec(chan, req, body)
    except Exception as exc:  # noqa: BLE001
        log(f"exec failed: {exc!r}")
        chan.send({"op": "error", "id": req.get("id"), "error": f"{type(exc).__name__}: {exc}"})


def _uptime() -> float:
    with open("/proc/uptime") as f:
        return float(f.read().split()[0])


def main() -> None:
    imported = _uptime()
    with open("/proc/self/stat") as f:
        started = int(f.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
    chan = Channel(find_port())
    log(f"ready at {_uptime():.2f}s (python started {started:.2f}s, imports done {imported:.2f}s)")
    while True:
        try:
            req, body = protocol.decode(chan.read_exact, MAX_REQUEST_BODY)
        except protocol.FrameError as exc:
            log(f"dropping malformed request: {exc}")
            continue
        handle(chan, req, body)


if __name__ == "__main__":
    main()
