"""Build the guest agent: ``guest/agent.c`` compiled into one static binary with musl.

The binary needs nothing from the guest's root filesystem (no Python, no shared library), so
any image can boot with it. It is built on first use, cached by content (the source, the
flags and the compiler's identity) in ``<cache>/agent/``, and published atomically, so
concurrent builders never see half a file. Debian: ``apt-get install musl-tools``.

Any guest architecture from any host (:func:`toolchain`): the host's musl-gcc for its own
architecture, Debian's cross gcc with musl's specs for another one, or ``zig cc`` (PyPI
``ziglang``), which also runs on macOS.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
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
#: Debian architecture -> the names ``platform.machine()`` gives a host of it.
MACHINES: Final = {"amd64": ("x86_64", "amd64"), "arm64": ("aarch64", "arm64")}
#: Debian architecture -> the GNU/zig CPU name in a target triple.
GNU_CPU: Final = {"amd64": "x86_64", "arm64": "aarch64"}
#: ``SMOLVM_AGENT_TOOLCHAIN``: ``auto`` (default), or force ``musl-gcc``, ``gcc-cross`` or ``zig``.
TOOLCHAIN_ENV: Final = "SMOLVM_AGENT_TOOLCHAIN"
TOOLCHAINS: Final = ("musl-gcc", "gcc-cross", "zig")


@dataclasses.dataclass(frozen=True)
class Toolchain:
    """How to compile the agent for one guest architecture: ``command`` (the compiler and
    any sub-command) plus ``flags`` before :data:`CFLAGS`. ``kind`` is one of
    :data:`TOOLCHAINS`; the default ``musl-gcc`` keeps the key agents had before toolchains."""

    kind: str
    arch: str
    command: tuple[str, ...]
    flags: tuple[str, ...] = ()

    def identity(self) -> str:
        """What the binary's key holds of the compiler: its version line (and, beyond
        the host's own musl-gcc, its kind, target and flags)."""
        if self.kind == "musl-gcc":
            return compiler_version(self.command[0])
        return "\0".join((self.kind, self.arch, *self.flags, _version_line(self.command)))


def host_arch() -> str | None:
    """This host's Debian architecture (``amd64``/``arm64``), or None for another CPU."""
    machine = platform.machine()
    return next((arch for arch, names in MACHINES.items() if machine in names), None)


def musl_specs(arch: str) -> Path:
    """musl's gcc specs file for ``arch`` (Debian multiarch: ``musl-dev:<arch>``)."""
    return Path(f"/usr/lib/{GNU_CPU[arch]}-linux-musl/musl-gcc.specs")


def _gcc_cross(arch: str) -> Toolchain | None:
    gcc = shutil.which(f"{GNU_CPU[arch]}-linux-gnu-gcc")
    specs = musl_specs(arch)
    return Toolchain("gcc-cross", arch, (gcc,), ("-specs", str(specs))) if gcc and specs.is_file() else None


def _zig(arch: str) -> Toolchain | None:
    if importlib.util.find_spec("ziglang") is None:
        return None
    return Toolchain("zig", arch, (sys.executable, "-m", "ziglang", "cc"), ("-target", f"{GNU_CPU[arch]}-linux-musl"))


def _musl_gcc(arch: str) -> Toolchain | None:
    native = sys.platform.startswith("linux") and host_arch() == arch
    return Toolchain("musl-gcc", arch, (COMPILER,)) if native and shutil.which(COMPILER) else None


def cross_install_hint(arch: str) -> str:
    """How to get a compiler that builds the agent for ``arch`` on this host."""
    cpu = GNU_CPU[arch]
    return (f"on Debian: dpkg --add-architecture {arch} && apt-get update && apt-get install "
            f"gcc-{cpu.replace('_', '-')}-linux-gnu musl-dev:{arch}; anywhere (macOS too): pip install ziglang")


def toolchain(arch: str | None = None) -> Toolchain:
    """The compiler that builds the agent for guest architecture ``arch`` (None: the host's).

    The host's own musl-gcc for its own architecture; for another architecture Debian's
    cross gcc with musl's specs (``gcc-aarch64-linux-gnu`` + ``musl-dev:arm64``: a compile
    takes under a second), else ``zig cc`` from PyPI's ``ziglang`` (works on macOS, where
    nothing else builds a static Linux binary; its first compile for a target builds musl,
    ~1 min, cached by zig). ``SMOLVM_AGENT_TOOLCHAIN`` forces one kind."""
    arch = arch or host_arch() or "amd64"
    if arch not in GNU_CPU:
        raise ImageError(f"invalid guest architecture {arch!r} for the agent: expected {', '.join(GNU_CPU)}")
    forced = os.environ.get(TOOLCHAIN_ENV, "auto").strip() or "auto"
    if forced not in ("auto", *TOOLCHAINS):
        raise ImageError(f"invalid {TOOLCHAIN_ENV}={forced!r} (from the environment): expected auto or "
                         f"{', '.join(TOOLCHAINS)}")
    finders = {"musl-gcc": _musl_gcc, "gcc-cross": _gcc_cross, "zig": _zig}
    for kind in TOOLCHAINS if forced == "auto" else (forced,):
        found = finders[kind](arch)
        if found is not None:
            return found
    if forced == "auto" and host_arch() == arch and sys.platform.startswith("linux"):
        raise ImageError(f"cannot build the guest agent: {COMPILER} is not on PATH; {INSTALL_HINT}")
    what = f"{TOOLCHAIN_ENV}={forced} (from the environment) is not usable here" if forced != "auto" else \
        "no compiler here builds it"
    raise ImageError(f"cannot build the {arch} guest agent on this {platform.machine()} host: {what}; "
                     f"{cross_install_hint(arch)}")


@functools.lru_cache(maxsize=8)
def _version_line(command: tuple[str, ...]) -> str:
    try:
        res = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ImageError(f"cannot run {' '.join(command)} --version: {exc}") from exc
    lines = res.stdout.splitlines()
    if res.returncode != 0 or not lines:
        raise ImageError(f"{' '.join(command)} --version failed (exit {res.returncode}): {res.stderr.strip()[-500:]}")
    return lines[0].strip()


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
        return _version_line((exe,))
    except ImageError as exc:
        raise ImageError(f"{exc}; {INSTALL_HINT}") from None


def agent_digest(arch: str | None = None) -> str:
    """Content key of the binary for guest architecture ``arch``: source, flags and the
    toolchain's identity (for the host's own musl-gcc: its version line, as always)."""
    h = hashlib.sha256(agent_source())
    h.update("\0".join((*CFLAGS, toolchain(arch).identity())).encode())
    return h.hexdigest()[:16]


def boot_key(arch: str | None = None) -> str:
    """What the boot layer's name holds of the agent's compiler: nothing for the host's own
    musl-gcc building for the host (so a boot layer made here or in a shared cache needs
    no compiler to be found), else the toolchain's identity: a new cross compiler gives
    a new boot layer."""
    native = arch in (None, host_arch()) and sys.platform.startswith("linux")
    if native and os.environ.get(TOOLCHAIN_ENV, "auto").strip() in ("", "auto", "musl-gcc"):
        return ""
    return toolchain(arch).identity()


def compile_agent(target: Path, *, compiler: str = COMPILER, flags: tuple[str, ...] = CFLAGS,
                  tc: Toolchain | None = None) -> Path:
    """Compile the agent to ``target`` (atomically: a temp file beside it, then rename),
    with ``tc`` if given, else ``compiler`` for the host."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".agent-build-") as tmp:
        src = Path(tmp, SOURCE_NAME)
        src.write_bytes(agent_source())
        out = Path(tmp, BINARY_NAME)
        command = [*tc.command, *tc.flags] if tc is not None else [compiler_path(compiler)]
        exe = " ".join(tc.command) if tc is not None else command[0]
        try:
            res = subprocess.run([*command, *flags, "-o", str(out), str(src)], capture_output=True, text=True,
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
    """The static agent for guest architecture ``arch`` (Debian's name; None: the host's),
    built into the cache with :func:`toolchain` if missing."""
    tc = toolchain(arch)
    target = cache_dir() / "agent" / f"{BINARY_NAME}-{agent_digest(tc.arch)}"
    if target.is_file():
        return target
    try:
        return compile_agent(target, tc=tc if tc.kind != "musl-gcc" else None)
    except OSError as exc:
        raise ImageError(f"cannot write the guest agent to {target}: {exc}") from exc


def prune_binaries(*, dry_run: bool = False) -> int:
    """Remove cached agents other than this version's, for every architecture a compiler
    here builds (boot layers hold their own copy, so an older build still boots): how many
    (would be) removed."""
    root = cache_dir() / "agent"
    if not root.is_dir():
        return 0
    keep = set()
    for arch in GNU_CPU:
        try:
            keep.add(f"{BINARY_NAME}-{agent_digest(arch)}")
        except ImageError:
            pass  # no compiler for it: every cached agent of it is an old one
    old = [p for p in root.glob(f"{BINARY_NAME}-*") if p.name not in keep]
    for path in old if not dry_run else ():
        path.unlink(missing_ok=True)
    return len(old)
