"""Build an image base from Debian packages: kernel ELF, virtio modules, busybox, ext4 rootfs.

Needs root (mmdebstrap's default mode), the Debian tools named in :data:`TOOLS` and access
to the Debian archive through the host's own apt sources. The result is published
atomically under ``<cache>/images/<name>/<digest>`` and never modified afterwards.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from ..digest import sha256_file
from ..errors import ImageError
from ..host import find_tool
from . import deb, layers, tarstream
from .kmods import install_modules
from .recipe import BOOT_MODULES, NET_MODULES, VSOCK_MODULES, Recipe
from .store import Image, find_build, images_dir, load_image, resolve

TOOLS = {
    "mmdebstrap": "mmdebstrap",
    "mkfs.ext4": "e2fsprogs",
    "apt-get": "apt",
    "dpkg-deb": "dpkg",
    "lz4": "lz4",
    "musl-gcc": "musl-tools",  # the static guest agent (images/agentbin.py)
}
BUSYBOX = Path("/bin/busybox")
LZ4_MAGIC = b"\x02\x21\x4c\x18"

Progress = Callable[[str], None]


def _default_progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def missing_tools() -> list[str]:
    """Debian packages the builder needs that are not installed."""
    missing = [pkg for tool, pkg in TOOLS.items() if find_tool(tool) is None]
    if not BUSYBOX.exists():
        missing.append("busybox-static")
    return missing


def _run(argv: list[str], what: str, progress: Progress | None = None, **kw: object) -> str:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)  # type: ignore[call-overload]
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line.rstrip())
        if progress is not None and line.strip():
            progress(f"    {line.rstrip()}")
    if proc.wait() != 0:
        tail = "\n".join(lines[-25:])
        raise ImageError(f"{what} failed (exit {proc.returncode}): {' '.join(argv)}\n{tail}")
    return "\n".join(lines)


def host_apt_sources(suite: str) -> list[str]:
    """The host's apt source files that mention ``suite`` (passed to mmdebstrap as mirrors)."""
    env = os.environ.get("SMOLVM_APT_SOURCES")
    if env:
        return [p for p in env.split(os.pathsep) if p]
    found = []
    for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*"))]:
        if not path.endswith((".list", ".sources")):
            continue
        try:
            text = Path(path).read_text()
        except OSError:
            continue
        lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        if any(suite in ln.split() or f" {suite}" in ln for ln in lines):
            found.append(path)
    return found


def _host_acquire_options() -> list[str]:
    """``Acquire::`` settings of the host's apt (proxies, validity checks), for mmdebstrap."""
    opts = []
    for path in sorted(glob.glob("/etc/apt/apt.conf.d/*")):
        try:
            for line in Path(path).read_text().splitlines():
                if line.strip().startswith("Acquire::"):
                    opts.append(line.strip())
        except OSError:
            continue
    return opts


def _extract_elf(vmlinuz: Path, target: Path) -> None:
    """Debian's bzImage is LZ4-compressed; the ELF inside boots directly via PVH."""
    blob = vmlinuz.read_bytes()
    at = blob.find(LZ4_MAGIC)
    if at < 0:
        raise ImageError(f"no LZ4 stream in {vmlinuz}; cannot extract the kernel ELF")
    proc = subprocess.run(["lz4", "-dc"], input=blob[at:], capture_output=True)
    # lz4 complains about the bzImage trailer after the stream; the ELF is what matters.
    if not proc.stdout.startswith(b"\x7fELF"):
        raise ImageError(f"decompressing {vmlinuz} did not give an ELF kernel: {proc.stderr.decode()[-500:]}")
    target.write_bytes(proc.stdout)


def _extract_arm64_image(vmlinuz: Path, target: Path) -> None:
    """Debian's arm64 vmlinuz is an ``Image`` that QEMU ``-M virt`` boots as it is: bookworm
    ships it uncompressed (an EFI stub: ``MZ``), other releases gzip it (``Image.gz``).
    Either way the result has the arm64 magic ``ARM\x64`` at offset 56 (it is not an ELF)."""
    import gzip

    data = vmlinuz.read_bytes()
    if data[:2] == GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise ImageError(f"cannot decompress the arm64 kernel {vmlinuz}: {exc}") from exc
    if data[56:60] != ARM64_IMAGE_MAGIC:
        raise ImageError(f"{vmlinuz} does not hold an arm64 Image (neither a raw Image nor a gzipped one: "
                         f"no ARM\\x64 magic at offset 56; it starts with {data[:4]!r})")
    target.write_bytes(data)


GZIP_MAGIC = b"\x1f\x8b"
#: ELF ``e_machine`` of each Debian architecture's binaries.
ELF_MACHINES = {"amd64": 0x3E, "arm64": 0xB7}


def check_elf_arch(path: Path, arch: str, what: str) -> None:
    """ImageError unless ``path`` is a 64-bit little-endian ELF for ``arch`` (Debian's name)."""
    with open(path, "rb") as f:
        head = f.read(20)
    if head[:4] != b"\x7fELF" or len(head) < 20:
        raise ImageError(f"{what} {path} is not an ELF binary")
    machine = int.from_bytes(head[18:20], "little")
    if machine != ELF_MACHINES[arch]:
        found = next((a for a, m in ELF_MACHINES.items() if m == machine), f"e_machine {machine:#x}")
        raise ImageError(f"{what} {path} is built for {found}, not for the image's architecture {arch}")


ARM64_IMAGE_MAGIC = b"ARM\x64"


def build(recipe: Recipe, *, force: bool = False, progress: Progress = _default_progress) -> Image:
    """Build ``recipe`` into the cache unless an identical build exists (here, or in a shared
    cache of ``SMOLVM_IMAGE_PATH``, which is then used as it is); return the image."""
    shared = None if force else find_build(recipe.name, recipe.digest())
    if shared is not None and not shared.is_relative_to(images_dir()):
        progress(f"image {recipe.name!r} ({recipe.digest()}) is already built at {shared} (SMOLVM_IMAGE_PATH)")
        return load_image(shared, recipe.name)
    missing = missing_tools()
    if missing:
        raise ImageError(
            f"the image builder needs Debian packages that are not installed: {', '.join(missing)}; "
            f"install them with: apt-get install -y {' '.join(missing)}"
        )
    foreign = binfmt_problem(recipe.arch)
    if foreign is not None:
        raise ImageError(f"cannot build image {recipe.name!r}: {foreign}")
    if os.geteuid() != 0:
        why = unshare_problem()
        if why is not None:
            raise ImageError(
                f"building the Debian rootfs of image {recipe.name!r} needs root (mmdebstrap's root mode) or, as "
                f"an ordinary user, mmdebstrap --mode=unshare, which cannot run here: {why}. Either run: sudo "
                f"python -m pytest_smolvm image build{'' if recipe.name == 'default' else ' --name ' + recipe.name}"
                f"; or have an admin give you subordinate ids (apt-get install uidmap; usermod --add-subuids "
                f"100000-165535 --add-subgids 100000-165535 {_user()}); or, with no Debian packages to add, "
                f"import a container image instead: python -m pytest_smolvm image import oci:DIR:TAG --name NAME")
    digest = recipe.digest()
    name_dir = images_dir() / recipe.name
    final = name_dir / digest
    name_dir.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(str(name_dir / ".build.lock"), timeout=3600):
            if final.is_dir() and not force:
                progress(f"image {recipe.name!r} ({digest}) is already built at {final}")
            else:
                _build_into(recipe, final, progress)
            _point_current(name_dir, digest)
    except Timeout as exc:
        raise ImageError(f"another build of image {recipe.name!r} holds {exc.lock_file} for over an hour") from exc
    return resolve(str(final)) if recipe.name != "default" else resolve("default")


BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")
#: Debian architecture -> qemu-user's name for it (binfmt_misc entry ``qemu-<name>``).
QEMU_USER_CPU = {"amd64": "x86_64", "arm64": "aarch64"}


def binfmt_problem(arch: str) -> str | None:
    """Why this host cannot run ``arch``'s programs (mmdebstrap runs the image's maintainer
    scripts), or None: the host's own architecture, or another one registered with
    binfmt_misc (qemu-user-static)."""
    if arch == _host_arch():
        return None
    entry = BINFMT_DIR / f"qemu-{QEMU_USER_CPU[arch]}"
    try:
        state = entry.read_text().split("\n", 1)[0].strip()
    except OSError:
        state = "missing"
    if state == "enabled":
        return None
    return (f"an {arch} image on this {_host_arch()} host runs {arch} programs through qemu-user, but "
            f"binfmt_misc has no enabled {entry} ({state}); fix (as root): apt-get install qemu-user-static, then "
            f"register it: systemctl restart systemd-binfmt, or without systemd: mount -t binfmt_misc binfmt_misc "
            f"{BINFMT_DIR}; cat /usr/lib/binfmt.d/qemu-{QEMU_USER_CPU[arch]}.conf > {BINFMT_DIR}/register "
            f"(scripts/setup does this)")


def _user() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def unshare_problem() -> str | None:
    """Why ``mmdebstrap --mode=unshare`` cannot run for this user, or None if it can: it
    needs newuidmap/newgidmap and a range of subordinate uids and gids."""
    if shutil.which("newuidmap") is None or shutil.which("newgidmap") is None:
        return "newuidmap/newgidmap are missing (apt-get install uidmap)"
    user, uid = _user(), str(os.getuid())
    for path in ("/etc/subuid", "/etc/subgid"):
        try:
            lines = Path(path).read_text().splitlines()
        except OSError:
            lines = []
        if not any(ln.split(":")[0] in (user, uid) for ln in lines if ln.count(":") == 2):
            return f"{path} gives {user} no subordinate ids"
    return None


def _point_current(name_dir: Path, digest: str) -> None:
    tmp = name_dir / f".current.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(digest)
    os.replace(tmp, name_dir / "current")


@dataclass
class _Build:
    """One build's working state, which each step reads and fills in for the next."""

    recipe: Recipe
    final: Path
    work: Path
    progress: Progress
    started: float
    done: int = 0
    kernel_deb: Path = Path()
    kernel_package: str = ""
    kernel_release: str = ""
    guest_python: str | None = None
    total: int = 0  # steps announced as [i/total]; 0: all of _STEPS
    tree: layers.Tree | None = None  # a rootless build's rootfs, owners kept aside (images/layers.py)

    @property
    def out(self) -> Path:
        return self.work / "out"

    @property
    def kernel_root(self) -> Path:
        return self.work / "kernel"

    @property
    def rootfs_dir(self) -> Path:
        return self.work / "root"

    def announce(self, msg: str) -> None:
        self.done += 1
        self.progress(f"[{self.done}/{self.total or len(_STEPS)}] {msg} (+{self.elapsed():.1f}s)")

    def elapsed(self) -> float:
        return time.monotonic() - self.started


def concrete_kernel_package(apt_cache_depends: str) -> str | None:
    """The kernel package a metapackage depends on, from ``apt-cache depends`` output,
    without an architecture qualifier (apt-cache names a foreign architecture's dependency
    ``linux-image-6.1.0-57-cloud-arm64:arm64``); None if it names none."""
    for line in apt_cache_depends.splitlines():
        if line.strip().startswith("Depends:") and "linux-image-" in line:
            return line.split(":", 1)[1].strip().split(":", 1)[0]
    return None


def qualified(package: str, arch: str) -> str:
    """``package`` as apt names it for ``arch``: bare for this host's architecture."""
    return package if arch == _host_arch() else f"{package}:{arch}"


def _host_arch() -> str:
    from .agentbin import host_arch

    return host_arch() or "amd64"


#: Local Debian packages to use instead of ``apt-get download`` (a Mac has no apt): the kernel
#: package the recipe names, and ``busybox-static`` of the image's architecture.
KERNEL_DEB_ENV, BUSYBOX_DEB_ENV = "SMOLVM_KERNEL_DEB", "SMOLVM_BUSYBOX_DEB"


def local_deb(env: str, arch: str, package: str) -> Path | None:
    """The ``.deb`` file ``env`` names (checked: a package of ``arch`` whose name starts with
    ``package``), or None when ``env`` is not set."""
    value = os.environ.get(env, "").strip()
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_file():
        raise ImageError(f"invalid {env}={value!r} (from the environment): no such file")
    fields = deb.control(path)
    if fields.get("Architecture") not in (arch, "all") or not fields.get("Package", "").startswith(package):
        raise ImageError(f"invalid {env}={value!r} (from the environment): it is {fields.get('Package')} "
                         f"for {fields.get('Architecture')}, not {package} for {arch}")
    return path


def unpack(package: Path, dest: Path, want: Callable[[str], bool] = lambda _p: True) -> None:
    """Extract a ``.deb`` into ``dest``: with dpkg-deb where there is one, else in Python."""
    if shutil.which("dpkg-deb") is not None:
        _run(["dpkg-deb", "-x", str(package), str(dest)], "dpkg-deb -x")
    else:
        deb.extract(package, dest, want)


def _kernel_files(path: str) -> bool:
    return path.startswith(("boot/vmlinuz-", "lib/modules/"))


def _download_kernel(b: _Build) -> None:
    recipe = b.recipe
    b.announce(f"downloading kernel package {recipe.kernel_package}")
    local = local_deb(KERNEL_DEB_ENV, recipe.arch, "linux-image-")
    if local is not None:
        b.kernel_deb, b.kernel_package = local, deb.control(local)["Package"]
    else:
        b.kernel_deb, b.kernel_package = _apt_kernel(b)
    unpack(b.kernel_deb, b.kernel_root, _kernel_files)


def _apt_kernel(b: _Build) -> tuple[Path, str]:
    recipe = b.recipe
    if shutil.which("apt-get") is None:
        raise ImageError(f"fetching the {recipe.arch} kernel needs apt-get, which this host lacks; download "
                         f"{recipe.kernel_package}'s kernel package (https://packages.debian.org/{recipe.suite}/"
                         f"{recipe.arch}/{recipe.kernel_package}: the linux-image-* .deb it depends on) and set "
                         f"{KERNEL_DEB_ENV} to the file")
    deps = _run(["apt-cache", "depends", "--important", qualified(recipe.kernel_package, recipe.arch)],
                "apt-cache depends")
    concrete = concrete_kernel_package(deps)
    if concrete is None:
        raise ImageError(f"cannot resolve {recipe.kernel_package} to a kernel package; run 'apt-get update' "
                         f"first{_foreign_hint(recipe.arch)} (apt-cache said: {deps[-300:]})")
    dl = b.work / "dl"
    dl.mkdir()
    _run(["apt-get", "download", qualified(concrete, recipe.arch)], "apt-get download", cwd=dl)
    return next(dl.glob("*.deb")), concrete


def _foreign_hint(arch: str) -> str:
    if arch == _host_arch():
        return ""
    return f" (another architecture's packages need: dpkg --add-architecture {arch} && apt-get update)"


def busybox_for(b: _Build) -> Path:
    """The static busybox of the image's architecture: ``SMOLVM_BUSYBOX_DEB``'s if set, the
    host's ``/bin/busybox`` on Linux of that architecture, else ``busybox-static:<arch>``
    downloaded with apt and unpacked into the build."""
    arch = b.recipe.arch
    dl = b.work / "busybox-dl"
    package = local_deb(BUSYBOX_DEB_ENV, arch, "busybox-static")
    if package is None and arch == _host_arch() and sys.platform.startswith("linux"):
        return BUSYBOX
    if package is None:
        if shutil.which("apt-get") is None:
            raise ImageError(f"an {arch} image needs busybox-static for {arch}, and this host has no apt-get to "
                             f"fetch it; download it (https://packages.debian.org/{b.recipe.suite}/{arch}/"
                             f"busybox-static) and set {BUSYBOX_DEB_ENV} to the file")
        dl.mkdir(exist_ok=True)
        _run(["apt-get", "download", qualified("busybox-static", arch)], "apt-get download", cwd=dl)
        package = next(dl.glob("*.deb"))
    unpack(package, dl / "root", lambda p: p == "bin/busybox")
    return dl / "root" / "bin" / "busybox"


def _extract_kernel(b: _Build) -> None:
    b.announce(f"extracting the kernel ELF and modules from {b.kernel_deb.name}")
    vmlinuz = next(b.kernel_root.glob("boot/vmlinuz-*"))
    b.kernel_release = vmlinuz.name.removeprefix("vmlinuz-")
    if b.recipe.arch == "arm64":
        _extract_arm64_image(vmlinuz, b.out / "vmlinux")  # same name: the kernel the VMM boots
    else:
        _extract_elf(vmlinuz, b.out / "vmlinux")
    (b.out / "modules").mkdir()
    for mod in BOOT_MODULES + NET_MODULES:
        if not _copy_module(b, mod):
            raise ImageError(f"kernel {b.kernel_release} has no module {mod}.ko")
    for mod in VSOCK_MODULES:  # optional: only Firecracker's vsock channel needs them
        _copy_module(b, mod)
    busybox = busybox_for(b)
    check_elf_arch(busybox, b.recipe.arch, "busybox")
    shutil.copyfile(busybox, b.out / "busybox")


def _copy_module(b: _Build, mod: str) -> bool:
    hits = list(b.kernel_root.glob(f"lib/modules/{b.kernel_release}/kernel/**/{mod}.ko"))
    if hits:
        shutil.copyfile(hits[0], b.out / "modules" / f"{mod}.ko")
    return bool(hits)


def _bootstrap_rootfs(b: _Build) -> None:
    recipe = b.recipe
    b.announce(f"building the {recipe.suite} rootfs with mmdebstrap ({', '.join(recipe.packages)})")
    sources = host_apt_sources(recipe.suite)
    if not sources:
        raise ImageError(f"no apt source on this host mentions suite {recipe.suite!r}; "
                         f"point SMOLVM_APT_SOURCES at a sources file for it")
    optfile = b.work / "apt-acquire.conf"
    optfile.write_text("".join(f"{o}\n" for o in _host_acquire_options()))
    arch_opt = [] if recipe.arch == "amd64" else [f"--architectures={recipe.arch}"]
    # Not root: mmdebstrap builds in a user namespace (subordinate ids) and hands over a
    # tarball, applied like an image layer so its owners reach the ext4 without chown.
    rootless = os.geteuid() != 0
    fmt, target = (["--mode=unshare", "--format=tar"], b.work / "rootfs.tar") if rootless else \
        (["--format=directory"], b.rootfs_dir)
    _run(["mmdebstrap", "--variant=minbase", *arch_opt, f"--include={','.join(recipe.packages)}",
          f"--aptopt={optfile}", *fmt, recipe.suite, str(target), *sources], "mmdebstrap", b.progress)
    if rootless:
        b.tree = _tree_from_tar(target, b.rootfs_dir)
    _customise_rootfs(b.rootfs_dir, b.out, b.tree)
    install_modules(b.kernel_root, b.kernel_release, b.rootfs_dir, recipe.rootfs_modules)
    b.guest_python = _guest_python(b.rootfs_dir)


def _tree_from_tar(tarball: Path, root: Path) -> layers.Tree:
    root.mkdir(mode=0o700)
    tree = layers.Tree(root)
    with open(tarball, "rb") as f:
        stream = tarstream.Counted(f, tarstream.Budget(64 << 30, 10_000_000), str(tarball))
        tree.apply(stream, f"the mmdebstrap tarball {tarball}")
    tarball.unlink()
    return tree


def _write_ext4(b: _Build) -> None:
    b.announce(f"writing the ext4 rootfs ({b.recipe.rootfs_mib} MiB, sparse)")
    if b.tree is not None:
        layers.write_ext4(b.tree, b.out / "rootfs.ext4", b.recipe.rootfs_mib)
        shutil.rmtree(b.rootfs_dir)
        return
    _run([find_tool("mkfs.ext4") or "mkfs.ext4", "-q", "-F", "-L", "smolvm-root", "-d", str(b.rootfs_dir),
          str(b.out / "rootfs.ext4"), f"{b.recipe.rootfs_mib}M"], "mkfs.ext4")
    shutil.rmtree(b.rootfs_dir)


def _publish(b: _Build) -> None:
    b.announce("publishing")
    files = {}
    for f in sorted(p for p in b.out.rglob("*") if p.is_file()):
        files[str(f.relative_to(b.out))] = {"size": f.stat().st_size, "sha256": sha256_file(f)}
    recipe = b.recipe
    manifest = {
        "name": recipe.name, "digest": recipe.digest(), "recipe": recipe.to_json(),
        "kernel_package": b.kernel_package, "kernel_release": b.kernel_release, "rootfs_mib": recipe.rootfs_mib,
        "guest_python": b.guest_python,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "files": files,
    }
    (b.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if b.final.exists():
        shutil.rmtree(b.final)
    try:
        os.rename(b.out, b.final)
    except OSError:
        if not (b.final / "manifest.json").exists():  # not a lost race: a real failure
            raise


#: Run in order; each announces itself as ``[i/n]`` and leaves in :class:`_Build` what the next needs.
_STEPS: tuple[Callable[[_Build], None], ...] = (
    _download_kernel, _extract_kernel, _bootstrap_rootfs, _write_ext4, _publish,
)


def _build_into(recipe: Recipe, final: Path, progress: Progress) -> None:
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=final.parent))
    try:
        b = _Build(recipe, final, work, progress, started)
        b.out.mkdir()
        for step in _STEPS:
            step(b)
        progress(f"built image {recipe.name!r} ({recipe.digest()}) at {final} in {b.elapsed():.1f}s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _guest_python(root: Path) -> str | None:
    """``3.11`` for a rootfs whose python3 is Python 3.11."""
    try:
        target = os.readlink(root / "usr/bin/python3")
    except OSError:
        return None
    ver = target.rsplit("python", 1)[-1]
    return ver if ver.replace(".", "").isdigit() else None


def _customise_rootfs(root: Path, out: Path, tree: layers.Tree | None = None) -> None:
    """The image's identity files: a neutral hostname, an empty machine-id, no resolv.conf
    (mmdebstrap copies the build host's, whose resolvers mean nothing in a guest: a networked
    guest's is written at setup, naming the run's resolver). ``tree``: a rootless build's,
    which must forget what is removed (its owners are written into the ext4 entry by entry)."""
    if tree is not None:
        tree.remove("etc/resolv.conf")
    else:
        (root / "etc/resolv.conf").unlink(missing_ok=True)  # a symlink too: the link goes, not its target
    (root / "etc/hostname").write_text("smolvm\n")
    (root / "etc/machine-id").write_text("")
    pub = root / "etc/ssh/ssh_host_ed25519_key.pub"
    if pub.exists():
        shutil.copyfile(pub, out / "ssh_host_ed25519_key.pub")
    (root / "run").mkdir(exist_ok=True)


def verify(path: Path) -> list[str]:
    """Full check of an image directory against its manifest's hashes; returns problems."""
    problems = []
    manifest = json.loads((path / "manifest.json").read_text())
    for rel, meta in manifest["files"].items():
        f = path / rel
        if not f.exists():
            problems.append(f"missing {rel}")
        elif sha256_file(f) != meta["sha256"]:
            problems.append(f"{rel} does not match its sha256")
    return problems
