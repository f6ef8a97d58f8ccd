"""Our guest kernel, its boot modules and busybox, for images whose rootfs is not ours.

An imported or declared image boots the same kernel and boot layer as ``default``: the
kernel ELF, the virtio modules the initramfs loads and the static busybox, fetched once
from Debian (``apt-get download`` and ``dpkg-deb -x``: no root needed) into
``<cache>/kernels/<key>/`` and copied into every image that needs them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from filelock import FileLock, Timeout

from ..errors import ImageError
from ..paths import cache_dir
from . import build
from .recipe import BOOT_MODULES, BUILDER_VERSION, NET_MODULES, VSOCK_MODULES, Recipe

#: What every image directory holds besides its rootfs (store._load and the initramfs read them).
KERNEL_FILES = ("vmlinux", "busybox", "modules")


def kernel_key(recipe: Recipe) -> str:
    fields: dict[str, object] = {"builder": BUILDER_VERSION, "package": recipe.kernel_package, "arch": recipe.arch,
                                 "modules": [*BOOT_MODULES, *NET_MODULES, *VSOCK_MODULES]}
    for env in (build.KERNEL_DEB_ENV, build.BUSYBOX_DEB_ENV):  # local packages: their own kernel
        local = os.environ.get(env, "").strip()
        if local:
            try:
                fields[env] = [Path(local).name, Path(local).stat().st_size]
            except OSError:
                fields[env] = local  # the fetch says what is wrong with it
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def ensure_kernel(progress: build.Progress, recipe: Recipe | None = None) -> tuple[Path, dict[str, str]]:
    """The kernel directory (fetched on first use, under a file lock) and its manifest."""
    recipe = recipe or Recipe()
    root = cache_dir() / "kernels"
    root.mkdir(exist_ok=True)
    final = root / kernel_key(recipe)
    try:
        with FileLock(str(_fetch_lock(root, final.name)), timeout=1800):
            if not (final / "kernel.json").is_file():
                _fetch(recipe, final, progress)
    except Timeout as exc:
        raise ImageError(f"another process holds {exc.lock_file} for over 30 minutes") from exc
    meta = json.loads((final / "kernel.json").read_text())
    return final, {k: str(v) for k, v in meta.items()}


def prune_kernels(*, dry_run: bool = False) -> int:
    """Remove fetched kernels other than the current recipe's (every image holds its own
    copy, so an older one still boots): how many (would be) removed. One being fetched
    right now (its lock held) is left alone."""
    root = cache_dir() / "kernels"
    if not root.is_dir():
        return 0
    keep = kernel_key(Recipe())
    old = [d for d in root.iterdir()  # fetched kernels only: never a fetch's .kernel-* work dir
           if re.fullmatch(r"[0-9a-f]{16}", d.name) and d.is_dir() and not d.is_symlink() and d.name != keep]
    removed = 0
    for d in old:
        lock = FileLock(str(_fetch_lock(root, d.name)), timeout=0)
        try:
            lock.acquire()
        except Timeout:  # being fetched right now: leave it
            continue
        try:
            if not dry_run:
                shutil.rmtree(d)
            removed += 1
        finally:
            lock.release()
    return removed


def _fetch_lock(root: Path, key: str) -> Path:
    """The lock held while kernel ``key`` is fetched into ``root`` (and while prune removes it)."""
    return root / f".{key}.lock"


def _fetch(recipe: Recipe, final: Path, progress: build.Progress) -> None:
    # apt-get and dpkg-deb are optional (local packages, read in Python: a Mac has neither);
    # lz4 unpacks the amd64 kernel only; busybox comes from the host only on Linux.
    missing = [t for t in ("lz4",) if recipe.arch == "amd64" and shutil.which(t) is None]
    if recipe.arch == build._host_arch() and sys.platform.startswith("linux") and not build.BUSYBOX.exists() \
            and not os.environ.get(build.BUSYBOX_DEB_ENV):
        missing.append("busybox-static")
    if missing:
        raise ImageError(f"fetching the guest kernel needs {', '.join(missing)}: apt-get install -y "
                         f"{' '.join(missing)}")
    work = Path(tempfile.mkdtemp(prefix=".kernel-", dir=final.parent))
    try:
        b = build._Build(recipe, final, work, lambda msg: progress(f"  kernel {msg}"), time.monotonic(), total=2)
        b.out.mkdir()
        build._download_kernel(b)
        build._extract_kernel(b)
        (b.out / "kernel.json").write_text(json.dumps(
            {"kernel_package": b.kernel_package, "kernel_release": b.kernel_release}) + "\n")
        os.rename(b.out, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def copy_kernel(kernel_dir: Path, out: Path) -> None:
    """Put the kernel, modules and busybox of ``kernel_dir`` (or of another image) into ``out``."""
    for name in KERNEL_FILES:
        src = kernel_dir / name
        if src.is_dir():
            shutil.copytree(src, out / name)
        else:
            shutil.copyfile(src, out / name)
