"""Simulated CI hosts for multi-host tests: each one an execnet socket server (the gateway
``pytest --tx socket=…`` reaches) in namespaces of its own, on this machine.

A host here has its own mount namespace (private ``/tmp`` and ``/run``, so its runtime
directory and ``/run/netns`` are its own), UTS namespace (its own host name) and PID namespace
(its own process table, as the watchdog and the reaper see it). A holder process is the PID
namespace's init, so the "machine" outlives its socket server: killing the server is a CI
worker dying, killing the holder is the machine going away. The network namespace is the
real one (the server listens on loopback, where the controller reaches it): the kernel's
network objects are shared, see docs/scaling-out.md ("What the simulation shares") for what that means.

Everything a host runs is in its own session, so it is killed by process group, never by name.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import execnet
import psutil

SOCKETSERVER = Path(execnet.__file__).parent / "script" / "socketserver.py"
#: The runtime directory inside every simulated host: the same path on each, as the default
#: (/tmp/smolvm-<uid>) would be on real machines.
RUNTIME = "/tmp/smolvm-rt"
SUITE = "/tmp/suite"
#: Environment variables of the outer test run that must not leak into a host's workers.
DROP_ENV = ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID", "PYTEST_CURRENT_TEST",
            "SMOLVM_RUN_ID", "PYTEST_ADDOPTS", "COV_CORE_SOURCE")

#: Where a host sees the package (its PYTHONPATH) and the tests' helper modules: read-only
#: bind mounts made before the private /tmp hides them (a checkout under /tmp, as CI's clone
#: is, would otherwise vanish inside the host).
SRC, TESTS = "/run/smolvm-src", "/run/smolvm-tests"
#: $0 host name, $1 the package's directory, $2 the tests directory, $3 shared images or "".
SETUP = ("mount -t tmpfs -o mode=755 tmpfs /run && mkdir -m 755 /run/netns && "
         f"mkdir {SRC} {TESTS} && mount --bind \"$1\" {SRC} && mount -o remount,bind,ro {SRC} && "
         f"mount --bind \"$2\" {TESTS} && mount -o remount,bind,ro {TESTS} && "
         "if [ -n \"$3\" ]; then mkdir /run/shared-images && mount --bind \"$3\" /run/shared-images && "
         "mount -o remount,bind,ro /run/shared-images; fi && "
         "mount -t tmpfs -o mode=1777 tmpfs /tmp && hostname \"$0\" && echo ready && exec sleep infinity")
#: Where a host given ``shared_images`` sees them: read-only, as an NFS export would be.
SHARED_IMAGES = "/run/shared-images"
#: The private cache of such a host (snapshots, probes, the agent build, derived boot layers).
PRIVATE_CACHE = "/tmp/smolvm-cache"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SimHost:
    """One simulated host. ``start()`` brings it up, ``stop()`` takes it down (idempotent)."""

    def __init__(self, name: str, logs: Path, pythonpath: str, shared_images: Path | None = None) -> None:
        """``shared_images``: an image cache this host sees read-only (``SMOLVM_IMAGE_PATH``),
        with a cache of its own that starts empty; else it uses the machine's cache."""
        self.name = name
        self.shared_images = shared_images
        self.logs = logs
        self.pythonpath = pythonpath
        self.holder: subprocess.Popen[bytes] | None = None
        self.server: subprocess.Popen[bytes] | None = None
        self.init_pid = 0  # the holder's child: init of the host's PID namespace
        self.port = 0
        #: With ``start(internet=True)``: the host's stand-in uplink namespace (tests/nettopo.py).
        self.uplink: str | None = None

    # ------------------------------------------------------------------ namespaces

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in DROP_ENV}
        env.update(SMOLVM_RUNTIME_DIR=RUNTIME, PYTHONPATH=SRC, PYTHONUNBUFFERED="1")
        if self.shared_images is not None:
            env.update(SMOLVM_CACHE_DIR=PRIVATE_CACHE, SMOLVM_IMAGE_PATH=SHARED_IMAGES)
        if self.uplink is not None:
            env.update(SMOLVM_UPLINK=self.uplink)
        return env

    def nsenter(self, argv: list[str]) -> list[str]:
        """``argv`` as a command run inside this host (its mount, UTS and PID namespaces)."""
        assert self.init_pid
        return ["nsenter", f"--target={self.init_pid}", "--mount", "--uts", "--pid", "--", *argv]

    def run(self, argv: list[str], *, timeout: float = 60,
            stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside this host and wait for it."""
        proc = subprocess.Popen(self.nsenter(argv), env=self.env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True, cwd="/")
        try:
            out, err = proc.communicate(stdin, timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        return subprocess.CompletedProcess(proc.args, proc.returncode, out.decode(errors="replace"),
                                           err.decode(errors="replace"))

    # ------------------------------------------------------------------ lifecycle

    def start(self, suite: Path, *, internet: bool = False) -> None:
        """Boot the host, copy ``suite`` into its private /tmp, start its socket server. With
        ``internet``, the host gets its own "host uplink" and "internet" namespaces (in its own
        /run/netns; tests/nettopo.py), and its VMs' ``nat`` traffic leaves through them."""
        with open(self.logs / f"{self.name}-holder.log", "wb") as err:
            self.holder = subprocess.Popen(
                ["unshare", "--mount", "--uts", "--pid", "--fork", "--mount-proc", "--propagation", "private",
                 "sh", "-c", SETUP, self.name, self.pythonpath, str(Path(__file__).parent),
                 str(self.shared_images or "")],
                stdout=subprocess.PIPE, stderr=err, start_new_session=True)
        assert self.holder.stdout is not None
        if self.holder.stdout.readline().strip() != b"ready":
            raise RuntimeError(f"simulated host {self.name} did not come up (see {self.logs})")
        children = psutil.Process(self.holder.pid).children()
        if len(children) != 1:
            raise RuntimeError(f"simulated host {self.name}: expected one init process, found {children}")
        self.init_pid = children[0].pid
        # Nothing is shared with the controller but what a CI host would also have: the
        # installed package (PYTHONPATH, bound read-only at SRC) and the image cache. The
        # suite travels as a tar.
        res = self.run(["sh", "-c", f"mkdir -p {SUITE} && tar -C {SUITE} -xf -"], stdin=_tar(suite))
        if res.returncode != 0:
            raise RuntimeError(f"copying the suite into {self.name} failed: {res.stderr}")
        if internet:
            self._start_internet()
        self.start_server()

    def _start_internet(self) -> None:
        script = ("import signal, sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
                  "from nettopo import Internet; net = Internet.create(Path('/tmp/internet')); "
                  "print(net.uplink, flush=True); signal.pause()")
        with open(self.logs / f"{self.name}-internet.log", "wb") as err:
            helper = subprocess.Popen(self.nsenter([sys.executable, "-c", script, TESTS]),
                                      env=self.env(), stdout=subprocess.PIPE, stderr=err, start_new_session=True,
                                      cwd="/")
        assert helper.stdout is not None
        line = helper.stdout.readline().decode().strip()  # it dies with the host's init
        if not line:
            raise RuntimeError(f"the internet stand-in of {self.name} did not come up (see {self.logs})")
        self.uplink = line

    def start_server(self) -> None:
        self.port = free_port()
        log = self.logs / f"{self.name}-server.log"
        argv = self.nsenter([sys.executable, "-u", str(SOCKETSERVER), f"127.0.0.1:{self.port}"])
        with open(log, "wb") as out:
            self.server = subprocess.Popen(argv, env=self.env(), stdout=out, stderr=subprocess.STDOUT,
                                           start_new_session=True, cwd="/")
        deadline = time.monotonic() + 30
        while b"Entering Accept loop" not in log.read_bytes():
            if self.server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"socket server of {self.name} did not start: {log.read_text()}")
            time.sleep(0.05)

    @property
    def tx(self) -> str:
        """The ``--tx`` spec that reaches this host's server."""
        return f"socket=127.0.0.1:{self.port}//chdir={SUITE}"

    def kill_server(self) -> None:
        """SIGKILL the socket server and the worker it runs (a CI worker dying); the host stays."""
        if self.server is not None and self.server.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.server.pid, signal.SIGKILL)
            self.server.wait(10)

    def stop(self) -> None:
        """Kill the server, then the holder: the PID namespace's init, whose death kills every
        process left in the host."""
        self.kill_server()
        if self.holder is not None and self.holder.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.holder.pid, signal.SIGKILL)
            self.holder.wait(10)

    # ------------------------------------------------------------------ inspection

    def leftovers(self) -> dict[str, list[str]]:
        """What is left on this host: VMM processes, runtime directory entries (besides the
        lock), pytest-smolvm's network namespaces in its /run/netns."""
        script = (
            "import os, json\n"
            "procs = []\n"
            "for pid in filter(str.isdigit, os.listdir('/proc')):\n"
            "    try: argv = open(f'/proc/{pid}/cmdline','rb').read().split(b'\\0')\n"
            "    except OSError: continue\n"
            "    if os.path.basename(argv[0]).startswith((b'qemu-system', b'firecracker')):\n"
            "        procs.append(b' '.join(argv).decode(errors='replace')[:300])\n"
            f"rt = sorted(os.listdir({RUNTIME!r})) if os.path.isdir({RUNTIME!r}) else []\n"
            "print(json.dumps({'vmms': procs, 'runtime': [e for e in rt if e != 'net.lock'],"
            " 'netns': sorted(n for n in os.listdir('/run/netns') if n.startswith('smolvm-'))}))\n")
        res = self.run([sys.executable, "-c", script])
        if res.returncode != 0:
            raise RuntimeError(f"inspecting {self.name} failed: {res.stderr}")
        import json

        data: dict[str, list[str]] = json.loads(res.stdout)
        return data


def _tar(path: Path) -> bytes:
    import io

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for entry in sorted(path.iterdir()):
            if entry.name not in (".pytest_cache", "__pycache__"):
                tar.add(entry, arcname=entry.name)
    return buf.getvalue()
