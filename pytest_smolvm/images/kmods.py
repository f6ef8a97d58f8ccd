"""Kernel modules installed into an image's rootfs (``Recipe.rootfs_modules``).

The guest boots the kernel the builder extracted from the Debian package, not one installed
in the rootfs, so ``modprobe`` in the guest finds nothing unless the builder copies the
modules a recipe asks for (and their dependencies, read from each module's ``.modinfo``)
into ``/lib/modules/<release>/`` with a ``modules.dep``. A KVM host image (L1 of the nested
harness) needs ``kvm_amd`` this way.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from ..errors import ImageError


def module_depends(ko: Path) -> list[str]:
    """The ``depends=`` entry of a module's ``.modinfo`` (module names, ``-`` spelt ``_``)."""
    data = ko.read_bytes()
    at = data.find(b"\0depends=")
    if at < 0:
        return []
    value = data[at + len(b"\0depends="):data.index(b"\0", at + 1)].decode()
    return [name for name in value.split(",") if name]


def _index(moddir: Path) -> dict[str, Path]:
    """Every ``.ko`` under ``moddir`` by module name (``kvm-amd.ko`` is module ``kvm_amd``)."""
    return {ko.name.removesuffix(".ko").replace("-", "_"): ko for ko in moddir.rglob("*.ko")}


def resolve_modules(moddir: Path, names: Sequence[str]) -> list[Path]:
    """The ``.ko`` files of ``names`` and everything they depend on, dependencies first."""
    index = _index(moddir)
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        key = name.replace("-", "_")
        if key in seen:
            return
        if key not in index:
            via = f" (needed by {' -> '.join(chain)})" if chain else ""
            raise ImageError(f"kernel modules in {moddir} have no module {name!r}{via}")
        seen.add(key)
        for dep in module_depends(index[key]):
            visit(dep, (*chain, key))
        order.append(index[key])

    for name in names:
        visit(name, ())
    return order


def install_modules(kernel_root: Path, release: str, rootfs: Path, names: Sequence[str]) -> list[str]:
    """Copy ``names`` (and dependencies) from the extracted kernel package ``kernel_root`` into
    ``rootfs``, keeping their paths, and index them for ``modprobe``. Returns the copied paths."""
    if not names:
        return []
    src = kernel_root / "lib" / "modules" / release
    dst = rootfs / "lib" / "modules" / release
    copied = []
    lines = []
    for ko in resolve_modules(src, names):
        rel = ko.relative_to(src)
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ko, dst / rel)
        deps = [str(p.relative_to(src)) for p in resolve_modules(src, module_depends(ko))]
        lines.append(f"{rel}: {' '.join(reversed(deps))}".rstrip())
        copied.append(str(rel))
    for meta in ("modules.builtin", "modules.builtin.modinfo", "modules.order"):
        if (src / meta).exists():
            shutil.copyfile(src / meta, dst / meta)
    (dst / "modules.dep").write_text("".join(f"{line}\n" for line in lines))
    # The rootfs's own depmod writes the binary indexes modprobe needs. lexists: Debian's
    # /sbin/depmod is an absolute symlink (to /bin/kmod), which only resolves inside the chroot.
    if any(os.path.lexists(rootfs / d / "depmod") for d in ("sbin", "usr/sbin", "bin", "usr/bin")):
        res = subprocess.run(["chroot", str(rootfs), "depmod", "-a", release], capture_output=True, text=True)
        if res.returncode != 0:
            raise ImageError(f"depmod in the image rootfs failed: {res.stderr.strip()[-500:]}")
    return copied
