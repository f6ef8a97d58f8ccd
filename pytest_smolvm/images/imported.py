"""``image import SRC --name NAME``: a container image as a guest image, with no root.

The layers are applied in order into a private directory (:mod:`.layers`), our mount points
are added (``/dev``, ``/proc``, ``/sys``, ``/run``, ``/tmp``, ``/root``, ``/etc``), and the tree
is written as ext4 with the layers' owners and modes; our kernel, boot modules and busybox
join it (:mod:`.kernel`), and the boot layer is derived from them like any image's. The
result is keyed by the layers' ``diff_id``\\ s and the kernel, published atomically under
``<cache>/images/<name>/<key>``, and ``current`` points at it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from ..digest import sha256_file
from ..errors import ImageError
from ..paths import check_name
from . import layers as lay
from . import oci
from . import tarstream as ts
from .kernel import copy_kernel, ensure_kernel, kernel_key
from .recipe import BUILDER_VERSION, Recipe, arm64_recipe
from .store import Image, images_dir, resolve

Progress = Callable[[str], None]

#: Bounds of one import (uncompressed bytes of all layers, tar entries).
DEFAULT_MAX_MIB = 8192
MAX_ENTRIES = 1_000_000
#: Directories every guest needs (the init scripts mount on them; the agent's cwd is /root).
MOUNT_POINTS = {"dev": 0o755, "proc": 0o555, "sys": 0o555, "run": 0o755, "tmp": 0o1777, "root": 0o700,
                "etc": 0o755}
BUILD_LOCK_TIMEOUT = 3600.0


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def check_image_name(name: str) -> str:
    check_name(name, "image name")
    if name in ("default", "default-arm64"):
        raise ImageError(f"image name {name!r} is reserved for the built-in image; choose another --name")
    return name


def kernel_recipe(arch: str) -> Recipe:
    """The recipe whose kernel an imported image of Debian architecture ``arch`` boots."""
    return arm64_recipe() if arch == "arm64" else Recipe(arch=arch)


def import_key(source: str, base: Path | None = None, arch: str = "amd64") -> tuple[str, oci.Layers]:
    """The content key an import of ``source`` gets (layers' diff_ids and our kernel), and
    its layers, read and checked but not applied."""
    src = oci.parse_source(source, base)
    image = oci.read_layers(src, arch)
    if not image.openers:
        raise ImageError(f"image source {source!r} has no layers")
    blob = {"builder": BUILDER_VERSION, "import": 1, "diff_ids": image.diff_ids,
            "kernel": kernel_key(kernel_recipe(arch))}
    return hashlib.sha256(json.dumps(blob).encode()).hexdigest()[:16], image


def import_image(source: str, name: str, *, base: Path | None = None, progress: Progress = _stderr,
                 max_mib: int = DEFAULT_MAX_MIB, force: bool = False, arch: str = "amd64") -> Image:
    """Import the ``linux/<arch>`` container image ``source`` (``oci:DIR[:TAG]``,
    ``docker-archive:FILE``) as the guest image ``name`` unless an identical import exists;
    return it. Needs no Linux tool but mkfs.ext4: the kernel comes from Debian's package,
    read in Python when dpkg is missing (:mod:`.deb`)."""
    check_image_name(name)
    recipe = kernel_recipe(arch)
    key, image = import_key(source, base, arch)
    name_dir = images_dir() / name
    name_dir.mkdir(parents=True, exist_ok=True)
    final = name_dir / key
    try:
        with FileLock(str(name_dir / ".build.lock"), timeout=BUILD_LOCK_TIMEOUT):
            if (final / "manifest.json").is_file() and not force:
                progress(f"image {name!r} ({key}) from {source} is already imported at {final}")
            else:
                kernel_dir, kernel = ensure_kernel(progress, recipe)
                manifest = {"name": name, "digest": key, "source": source, "arch": arch,
                            "config_digest": image.config_digest,
                            "diff_ids": image.diff_ids, "config": oci.image_env(image.config), **kernel}
                _build(image, final, kernel_dir, manifest, progress, max_mib)
            point_current(name_dir, key)
    except Timeout as exc:
        raise ImageError(f"another build of image {name!r} holds {exc.lock_file} for over an hour") from exc
    return resolve(name)


def _build(image: oci.Layers, final: Path, kernel_dir: Path, manifest: dict[str, Any],
           progress: Progress, max_mib: int) -> None:
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix=".import-", dir=final.parent))
    try:
        tree = lay.Tree(work / "root")
        tree.root.mkdir(mode=0o700)
        apply_layers(tree, image, ts.Budget(max_mib << 20, MAX_ENTRIES), progress, started)
        out = work / "out"
        out.mkdir()
        add_mount_points(tree)
        manifest.update(inspect(tree))
        size = rootfs_size_mib(tree.used_bytes())
        progress(f"writing the ext4 rootfs ({size} MiB, sparse) (+{time.monotonic() - started:.1f}s)")
        lay.write_ext4(tree, out / "rootfs.ext4", size)
        shutil.rmtree(tree.root)
        copy_kernel(kernel_dir, out)
        publish(out, final, {**manifest, "rootfs_mib": size})
        progress(f"imported image {manifest['name']!r} ({final.name}) at {final} in "
                 f"{time.monotonic() - started:.1f}s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def apply_layers(tree: lay.Tree, image: oci.Layers, budget: ts.Budget, progress: Progress, started: float) -> None:
    """Apply every layer in order, checking each against its ``diff_id``."""
    for i, ((digest, opener), diff_id) in enumerate(zip(image.openers, image.diff_ids, strict=True), start=1):
        where = f"layer {i}/{len(image.openers)} ({digest[:19]})"
        progress(f"[{i}/{len(image.openers)}] applying layer {digest[:19]} (+{time.monotonic() - started:.1f}s)")
        with oci.opened(opener) as raw, ts.open_layer(raw, where) as layer:
            stream = ts.Counted(layer, budget, where)
            tree.apply(stream, where)
        if stream.diff_id() != diff_id:
            raise ImageError(f"{where}: its content does not match the config's diff_id {diff_id} "
                             f"(got {stream.diff_id()}): corrupt or tampered")
    if tree.skipped_devices:
        progress(f"    skipped {tree.skipped_devices} device node(s): the guest's /dev is a devtmpfs")
    if tree.skipped_xattrs:
        progress(f"    skipped {tree.skipped_xattrs} extended attribute(s): only security.capability and user.* "
                 f"are kept")


def add_mount_points(tree: lay.Tree) -> None:
    """Our mount points and the agent's home, as real directories (whatever a layer put there)."""
    for name, mode in MOUNT_POINTS.items():
        path = tree.root / name
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            path.unlink()
            tree.meta.pop(name, None)
        if not path.is_dir():
            path.mkdir(mode=0o700)
            tree.meta[name] = lay.Meta(stat.S_IFDIR | mode)


def inspect(tree: lay.Tree) -> dict[str, object]:
    """What the host needs to know about a rootfs: its Python (for the agent's bytecode) and
    whether it has a shell for ``run("string")``."""
    python = None
    for cand in ("usr/bin/python3", "usr/local/bin/python3", "bin/python3"):
        real = tree.resolve(cand)
        if real is not None:
            ver = real.rsplit("/", 1)[-1].removeprefix("python")
            python = ver if ver.replace(".", "").isdigit() and "." in ver else None
            break
    return {"guest_python": python, "shell": tree.resolve("bin/sh") is not None}


def rootfs_size_mib(used: int) -> int:
    """Room for the tree plus as much again (at least 512 MiB), in 64 MiB steps; sparse."""
    need = used + max(used, 512 << 20) + (64 << 20)
    return -(-need // (64 << 20)) * 64


def publish(out: Path, final: Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest.json`` (with every file's size and sha256) and rename ``out`` to ``final``."""
    files = {}
    for f in sorted(p for p in out.rglob("*") if p.is_file()):
        files[str(f.relative_to(out))] = {"size": f.stat().st_size, "sha256": sha256_file(f)}
    manifest = {**manifest, "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "files": files}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.rename(out, final)


def point_current(name_dir: Path, digest: str) -> None:
    from .build import _point_current

    _point_current(name_dir, digest)
