"""Build the guest agent: ``guest/agent.c`` compiled into one static binary with musl.

The binary needs nothing from the guest's root filesystem (no Python, no shared library), so
any image can boot with it. It is built on first use, cached by content (the source, the
flags and the compiler's version) in ``<cache>/agent/``, and published atomically, so
concurrent builders never see half a file. Debian: ``apt-get install musl-tools``.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path
from typing import Final

from ..errors import ImageError
from ..paths import cache_dir

COMPILER: Final = "musl-gcc"
#: Warnings are errors: the agent is what a hostile guest talks to first.
CFLAGS: Final = ("-static", "-Os", "-s", "-std=gnu11", "-Wall", "-Wextra", "-Werror", "-pthread")
SOURCE_NAME: Final = "agent.c"
BINARY_NAME: Final = "smolvm-agent"
INSTALL_HINT: Final = "install the musl C compiler with: apt-get install musl-tools"
COMPILE_TIMEOUT: Final = 300.0
#: Debian architecture -> machine name: musl-gcc builds for the host's architecture only.
MACHINES: Final = {"amd64": ("x86_64",), "arm64": ("aarch64", "arm64")}


def agent_source() -> bytes:
    """The agent's C source, as shipped in the package."""
    return resources.files("pytest_smolvm.guest").joinpath(SOURCE_NAME).read_bytes()


def compiler_path(compiler: str = COMPILER) -> str:
    """The compiler's path; ImageError saying how to install it if it is not on PATH."""
    exe = shutil.which(compiler)
    if exe is None:
        raise ImageError(f"cannot build the guest agent: {compiler} is not on PATH; {INSTALL_HINT}")
    return exe


@functools.lru_cache(maxsize=4)
def compiler_version(compiler: str = COMPILER) -> str:
    """First line of ``compiler --version`` (part of the binary's cache key)."""
    exe = compiler_path(compiler)
    try:
        res = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ImageError(f"cannot run {exe} --version: {exc}; {INSTALL_HINT}") from exc
    lines = res.stdout.splitlines()
    if res.returncode != 0 or not lines:
        raise ImageError(f"{exe} --version failed (exit {res.returncode}): {res.stderr.strip()[-500:]}")
    return lines[0].strip()


def agent_digest(compiler: str = COMPILER) -> str:
    """Content key of the binary: source, flags and compiler version."""
    h = hashlib.sha256(agent_source())
    h.update("\0".join((*CFLAGS, compiler_version(compiler))).encode())
    return h.hexdigest()[:16]


def compile_agent(target: Path, *, compiler: str = COMPILER, flags: tuple[str, ...] = CFLAGS) -> Path:
    """Compile the agent to ``target`` (atomically: a temp file beside it, then rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".agent-build-") as tmp:
        src = Path(tmp, SOURCE_NAME)
        src.write_bytes(agent_source())
        out = Path(tmp, BINARY_NAME)
        exe = compiler_path(compiler)
        try:
            res = subprocess.run([exe, *flags, "-o", str(out), str(src)], capture_output=True, text=True,
                                 timeout=COMPILE_TIMEOUT)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ImageError(f"compiling the guest agent with {exe} failed: {exc}") from exc
        if res.returncode != 0:
            raise ImageError(f"compiling the guest agent with {exe} failed (exit {res.returncode}):\n"
                             f"{res.stderr.strip()[-3000:]}")
        os.chmod(out, 0o755)
        os.replace(out, target)
    return target


def agent_binary(arch: str | None = None) -> Path:
    """The static agent for this source and compiler, built into the cache if missing, for
    the guest architecture ``arch`` (Debian's name; None: the host's)."""
    host = platform.machine()
    if arch is not None and host not in MACHINES.get(arch, ()):
        raise ImageError(f"the guest agent is built with {COMPILER} for this host's architecture ({host}); "
                         f"an {arch} image needs it built on an {arch} host (cross-compiling is not supported)")
    target = cache_dir() / "agent" / f"{BINARY_NAME}-{agent_digest()}"
    if target.is_file():
        return target
    try:
        return compile_agent(target)
    except OSError as exc:
        raise ImageError(f"cannot write the guest agent to {target}: {exc}") from exc


def prune_binaries(*, dry_run: bool = False) -> int:
    """Remove cached agents other than this version's (boot layers hold their own copy, so an
    older build still boots): how many (would be) removed."""
    root = cache_dir() / "agent"
    if not root.is_dir():
        return 0
    try:
        keep = f"{BINARY_NAME}-{agent_digest()}"
    except ImageError:
        keep = ""  # no compiler: every cached agent is an old one
    old = [p for p in root.glob(f"{BINARY_NAME}-*") if p.name != keep]
    for path in old if not dry_run else ():
        path.unlink(missing_ok=True)
    return len(old)
