"""Make sure an image exists, building it first if needed: :func:`ensure`.

- ``default`` is built from its recipe (:mod:`.build`) when this version's build is missing.
- A declared image (:mod:`.declared`) gets its base first (``default``, ``default`` with
  ``apt`` packages, or an OCI import), then its steps run **in a VM of that base**, which needs
  no root on the host: ``files`` arrive as read-only volumes (or ``put`` for single files) and
  are copied in; ``pip`` requirements are downloaded on the host (``pip download`` for the
  guest's Python, glibc and architecture, pip itself included) and installed in the guest from
  a volume with ``--no-index``, so the guest needs no network; ``run`` commands run as they are.
  The VM's disk is then converted (``qemu-img convert``) into the image's rootfs.
- Anything else is looked up by name.

Builds run under the image's file lock (``<cache>/images/<name>/.build.lock``), so xdist
workers and concurrent runs wait for one build, and report each step with the elapsed time.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from filelock import FileLock, Timeout

from ..config import VMConfig
from ..errors import ImageError
from ..host import find_tool
from ..reporting import sanitize
from ..results import RunResult
from ..volumes import check_volumes
from . import declared as dcl
from .imported import BUILD_LOCK_TIMEOUT, import_image, import_key, point_current, publish
from .recipe import Recipe
from .store import Image, find_build, images_dir, load_image, resolve

Progress = Callable[[str], None]


class BuildVM(Protocol):
    """What a declared image's build needs of a VM (a :class:`~pytest_smolvm.vm.SmolVM`)."""

    disk_path: Path | None

    def start(self) -> object: ...

    def run(self, command: str | Sequence[str], *, timeout: float | None = None) -> RunResult: ...

    def put(self, src: os.PathLike[str], dest: str, *, mode: int | None = None) -> None: ...

    def close(self) -> None: ...


#: Makes (does not start) the build's VMs: ``make_vm(config, name)``. The caller passes the
#: VM class (``SmolVM``), so image provisioning does not import the VM handle.
MakeVM = Callable[[VMConfig, str], BuildVM]
BUILD_MOUNT = "/mnt/.smolvm-build"
BUSYBOX = "/run/smolvm/busybox"  # the boot layer's busybox, in every guest whatever its image
STEP_TIMEOUT = 1800.0

#: Copies a files source (a volume: its lost+found is mkfs's, not the user's) into place and
#: gives what it copied to root; positional arguments keep paths out of the script text.
COPY_TREE = ('mkdir -p "$2" && cd "$1" && for e in * .[!.]* ..?*; do '
             '{ [ -e "$e" ] || [ -L "$e" ]; } && [ "$e" != lost+found ] || continue; '
             'cp -a "$e" "$2/" && chown -R -h 0:0 "$2/$e" || exit 1; done')
PROBE = ("import json, os, platform, sys; print(json.dumps({'python': '%d.%d' % sys.version_info[:2], "
         "'libc': ' '.join(platform.libc_ver()).strip(), 'machine': platform.machine()}))")


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def ensure(name: str, make_vm: MakeVM, *, pyproject: Path | None = None, progress: Progress = _stderr,
           force: bool = False) -> Image:
    """The image ``name``, built first if it is declared in ``pyproject`` (or is ``default``)
    and this content's build is missing; a declared image's steps run in VMs of ``make_vm``."""
    decls = dcl.load(pyproject) if pyproject is not None and pyproject.is_file() else {}
    if name in decls:
        return ensure_declared(decls[name], make_vm, progress=progress, force=force)
    if name == "default":
        return ensure_default(progress)
    return resolve(name)


def default_built() -> bool:
    return find_build("default", Recipe().digest()) is not None


def ensure_default(progress: Progress = _stderr) -> Image:
    """``default``, built (with progress) when this version's build is missing."""
    if not default_built():
        from .build import build

        progress("smolvm: building the guest image 'default' (once; about a minute)")
        build(Recipe(), progress=progress)
    return resolve("default")


def _base(decl: dcl.Declared, progress: Progress) -> Image:
    recipe = decl.base_recipe()
    if recipe is None:
        return import_image(decl.base, f"{decl.name}.base", progress=progress)
    if recipe == Recipe():
        return ensure_default(progress)
    from .build import build

    return build(recipe, progress=progress)


def base_id(decl: dcl.Declared) -> str:
    """The base's identity without building it (so an unchanged image is found at once)."""
    recipe = decl.base_recipe()
    return recipe.digest() if recipe is not None else import_key(decl.base)[0]


def ensure_declared(decl: dcl.Declared, make_vm: MakeVM, *, progress: Progress = _stderr,
                    force: bool = False) -> Image:
    key = dcl.key(decl, base_id(decl))
    name_dir = images_dir() / decl.name
    found = find_build(decl.name, key)
    if found is not None and not found.is_relative_to(images_dir()) and not force:
        return load_image(found, decl.name)  # built by another host, shared read-only
    final = name_dir / key
    if (final / "manifest.json").is_file() and not force:
        point_current(name_dir, key)
        return resolve(decl.name)
    name_dir.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(str(name_dir / ".build.lock"), timeout=BUILD_LOCK_TIMEOUT):
            if force or not (final / "manifest.json").is_file():
                _build(decl, key, final, progress, make_vm)
            point_current(name_dir, key)
    except Timeout as exc:
        raise ImageError(f"another build of image {decl.name!r} holds {exc.lock_file} for over an hour") from exc
    return resolve(decl.name)


class _Steps:
    """Progress as ``[i/n] what (+elapsed)``."""

    def __init__(self, name: str, total: int, progress: Progress) -> None:
        self.name, self.total, self.progress = name, total, progress
        self.done = 0
        self.started = time.monotonic()

    def __call__(self, msg: str) -> None:
        self.done += 1
        self.progress(f"[{self.done}/{self.total}] {self.name}: {msg} (+{self.elapsed():.1f}s)")

    def elapsed(self) -> float:
        return time.monotonic() - self.started


def _build(decl: dcl.Declared, key: str, final: Path, progress: Progress, make_vm: MakeVM) -> None:
    total = 2 + bool(decl.has_steps) * (1 + len(decl.files) + 2 * bool(decl.pip) + len(decl.run))
    steps = _Steps(decl.name, total, progress)
    progress(f"smolvm: building image {decl.name!r} ({key}) declared in {decl.pyproject}")
    steps(f"base {decl.base}" + (f" with apt {', '.join(decl.apt)}" if decl.apt else ""))
    base = _base(decl, progress)
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=final.parent))
    try:
        out = work / "out"
        out.mkdir()
        for name in ("vmlinux", "busybox", "modules"):
            _link_or_copy(base.path / name, out / name)
        if decl.has_steps:
            _provision(decl, base, work, out / "rootfs.ext4", steps, make_vm)
        else:
            _link_or_copy(base.rootfs, out / "rootfs.ext4")
        steps("publishing")
        base_manifest = json.loads((base.path / "manifest.json").read_text())
        size = (out / "rootfs.ext4").stat().st_size >> 20
        publish(out, final, {"name": decl.name, "digest": key, "declared": dcl.describe(decl), "base": base.id,
                             "kernel_package": base_manifest.get("kernel_package"),
                             "kernel_release": base.kernel_release, "rootfs_mib": size,
                             "guest_python": base_manifest.get("guest_python"),
                             "shell": base_manifest.get("shell", True)})
        progress(f"built image {decl.name!r} ({key}) at {final} in {steps.elapsed():.1f}s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _link_or_copy(src: Path, dst: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dst, copy_function=_link_or_copy_file)
    else:
        _link_or_copy_file(str(src), str(dst))


def _link_or_copy_file(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # images are never modified once published: sharing the inode is safe
    except OSError:
        shutil.copyfile(src, dst)


def _provision(decl: dcl.Declared, base: Image, work: Path, rootfs: Path, steps: _Steps, make_vm: MakeVM) -> None:
    """Run the declaration's steps in a VM of ``base`` and write its disk to ``rootfs``."""
    dirs = [(f"{BUILD_MOUNT}/f{i}", host) for i, (_, host) in enumerate(decl.files) if os.path.isdir(host)]
    wheels = _download_wheels(decl, base, work, steps, make_vm) if decl.pip else None
    volumes = dict(dirs) | ({f"{BUILD_MOUNT}/wheels": str(wheels)} if wheels else {})
    steps(f"booting a build VM of {decl.base}" + (" with the apt packages" if decl.apt else ""))
    cfg = VMConfig(image=str(base.path), snapshot=False, network="none", memory_mib=1024, timeout=STEP_TIMEOUT,
                   disk_size_mib=decl.size_mib, volumes=check_volumes(volumes), retain_disk_on_delete=True)
    vm = make_vm(cfg, f"build-{decl.name}"[:64])
    done = False
    try:
        vm.start()
        _copy_files(vm, decl, dict((host, mnt) for mnt, host in dirs), steps)
        if wheels is not None:
            _pip_install(vm, decl, steps)
        for i, cmd in enumerate(decl.run):
            steps(f"run {cmd}")
            _check(vm.run(cmd, timeout=STEP_TIMEOUT), decl, f"run[{i}] {cmd!r}")
        _check(vm.run([BUSYBOX, "sh", "-c", _FINISH, "sh", BUILD_MOUNT]), decl, "cleaning up")
        done = True
    finally:
        vm.close()
        if not done and vm.disk_path is not None:  # a failed build keeps no retained disk
            vm.disk_path.unlink(missing_ok=True)
    disk = vm.disk_path
    if disk is None or not disk.exists():
        raise ImageError(f"the build VM of image {decl.name!r} left no disk behind")
    try:
        _to_raw(disk, rootfs)
    finally:
        disk.unlink(missing_ok=True)


#: Unmount the build volumes, reset what every boot sets, and flush.
_FINISH = ('for m in "$1"/*; do umount "$m" 2>/dev/null; rmdir "$m" 2>/dev/null; done; rmdir "$1" 2>/dev/null; '
           '[ -e /etc/machine-id ] && : > /etc/machine-id; [ -d /etc ] && echo smolvm > /etc/hostname; sync; '
           'mount -o remount,ro / 2>/dev/null; sync; true')


def _check(result: RunResult, decl: dcl.Declared, what: str) -> None:
    if result.exit_code != 0:
        output = sanitize((result.stdout + result.stderr)[-2000:])  # guest text: no terminal escapes
        raise ImageError(f"building image {decl.name!r} ({decl.pyproject}): {what} failed with exit "
                         f"{result.exit_code}:\n{output}")


def _copy_files(vm: BuildVM, decl: dcl.Declared, mounts: dict[str, str], steps: _Steps) -> None:
    for guest, host in decl.files:
        steps(f"files {guest} <- {host}")
        if host in mounts:
            _check(vm.run([BUSYBOX, "sh", "-c", COPY_TREE, "sh", mounts[host], guest]), decl, f"files {guest!r}")
        else:
            vm.put(Path(host), guest, mode=os.stat(host).st_mode & 0o7777)


def _download_wheels(decl: dcl.Declared, base: Image, work: Path, steps: _Steps, make_vm: MakeVM) -> Path:
    """``pip download`` on the host for the guest's interpreter: its Python version, glibc and
    machine come from probing a VM of the base (they decide which wheels fit)."""
    steps(f"pip: downloading {', '.join(decl.pip)} on the host")
    vm = make_vm(VMConfig(image=str(base.path), snapshot=False, network="none"), f"probe-{decl.name}"[:64])
    try:
        vm.start()
        probe = vm.run(["python3", "-c", PROBE])
    finally:
        vm.close()
    if probe.exit_code != 0:
        raise ImageError(f"[tool.smolvm.images.{decl.name}] pip in {decl.pyproject}: the image has no "
                         f"working python3 ({sanitize(probe.stderr.strip()[-300:])})")
    guest = parse_probe(probe.stdout, decl)
    wheels = work / "wheels"
    wheels.mkdir()
    argv = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--only-binary=:all:",
            "--python-version", guest["python"], "--implementation", "cp", "-d", str(wheels),
            *platform_args(guest["libc"], guest["machine"]), "pip", *decl.pip]
    proc = subprocess.run(argv, capture_output=True, text=True, errors="replace", check=False)
    if proc.returncode != 0:
        raise ImageError(f"[tool.smolvm.images.{decl.name}] pip in {decl.pyproject}: pip download failed "
                         f"(only wheels can be installed without network in the guest):\n{proc.stderr[-1500:]}")
    return wheels


def parse_probe(text: str, decl: dcl.Declared) -> dict[str, str]:
    """The guest's answer to :data:`PROBE`, checked: it picks wheels, so it is held to the
    shapes a real interpreter gives."""
    try:
        guest = json.loads(text)
        ok = (isinstance(guest, dict) and re.fullmatch(r"3\.\d{1,3}", str(guest.get("python")))
              and re.fullmatch(r"(glibc 2\.\d{1,3})?", str(guest.get("libc")))
              and re.fullmatch(r"[a-z0-9_]{1,32}", str(guest.get("machine"))))
    except ValueError:
        ok = None
    if not ok:
        raise ImageError(f"[tool.smolvm.images.{decl.name}] pip in {decl.pyproject}: the image's python3 "
                         f"described itself as {sanitize(text[:200])!r}, not as a CPython 3")
    return {k: str(guest[k]) for k in ("python", "libc", "machine")}


def platform_args(libc: str, machine: str) -> list[str]:
    """``--platform`` options for every manylinux tag a guest with this glibc can load (pure)."""
    args = ["--platform", f"linux_{machine}"]
    if libc.startswith("glibc "):
        major, minor = (int(x) for x in libc.split()[1].split(".")[:2])
        for m in range(5, minor + 1) if major == 2 else ():
            args += ["--platform", f"manylinux_2_{m}_{machine}"]
        legacy = {"manylinux1": 5, "manylinux2010": 12, "manylinux2014": 17}
        args += [a for tag, m in legacy.items() if minor >= m for a in ("--platform", f"{tag}_{machine}")]
    return args


def _pip_install(vm: BuildVM, decl: dcl.Declared, steps: _Steps) -> None:
    steps(f"pip: installing {', '.join(decl.pip)} in the guest")
    wheels = f"{BUILD_MOUNT}/wheels"
    found = vm.run([BUSYBOX, "sh", "-c", f'ls "{wheels}" | grep "^pip-.*\\.whl$" | head -n 1'])
    pip = f"{wheels}/{found.stdout.strip()}/pip"
    _check(vm.run(["python3", pip, "install", "--no-index", "--find-links", wheels, "--break-system-packages",
                   "--root-user-action=ignore", "--no-cache-dir", "--disable-pip-version-check",
                   "--no-warn-script-location", *decl.pip], timeout=STEP_TIMEOUT), decl, "pip install")


def _to_raw(overlay: Path, rootfs: Path) -> None:
    """The build VM's disk (a qcow2 overlay on the base) as a sparse raw ext4, checked."""
    for argv, ok in (
        (["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(overlay), str(rootfs)], (0,)),
        (["e2fsck", "-f", "-y", str(rootfs)], (0, 1)),  # 1: the journal was replayed or nits fixed
    ):
        exe = find_tool(argv[0])
        if exe is None:
            raise ImageError(f"{argv[0]} is not installed (apt-get install -y qemu-utils e2fsprogs)")
        proc = subprocess.run([exe, *argv[1:]], capture_output=True, text=True, errors="replace", check=False)
        if proc.returncode not in ok:
            raise ImageError(f"{argv[0]} failed (exit {proc.returncode}): {' '.join(argv)}\n"
                             f"{(proc.stdout + proc.stderr)[-1500:]}")
