"""Find a built image in the cache and check it is whole (no building here).

Images are looked up in the cache's ``images/`` first, then in each directory of
``SMOLVM_IMAGE_PATH`` (``os.pathsep``-separated): image caches another host built and shares,
typically read-only over a network filesystem. Those are only read, never locked or written:
an image build is immutable and named by its content digest, and a builder publishes it by
``rename`` (``current`` is a relative symlink swapped the same way), so a reader on another
host sees a whole build or none without any lock (file locks are not trusted to work across
hosts). What is derived from an image on use, its boot layer, goes into this host's own
cache when the shared directory lacks it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path

from ..errors import ImageError
from ..paths import cache_dir, check_safe_path
from .agentbin import agent_binary, boot_key
from .initramfs import build_initramfs
from .recipe import Recipe, boot_digest

BUILD_HINT = "python -m pytest_smolvm image build"
EXT4_MAGIC_OFFSET = 1080


@dataclasses.dataclass(frozen=True)
class Image:
    """A resolved, verified guest image."""

    name: str
    path: Path
    kernel: Path
    initrd: Path
    rootfs: Path
    rootfs_mib: int
    digest: str
    kernel_release: str
    ssh_host_key_pub: str
    #: The guest's Debian architecture (``amd64``, ``arm64``): it picks the QEMU machine.
    arch: str = "amd64"

    @property
    def id(self) -> str:
        """Identity of everything the guest boots: base digest + boot-layer digest."""
        return f"{self.digest}-{self.initrd.stem.removeprefix('boot-')}"


def images_dir() -> Path:
    return cache_dir() / "images"


def shared_image_dirs() -> list[Path]:
    """Read-only image caches from ``SMOLVM_IMAGE_PATH``, in order."""
    raw = os.environ.get("SMOLVM_IMAGE_PATH", "")
    return [Path(p).expanduser() for p in raw.split(os.pathsep) if p.strip()]


def find_build(name: str, digest: str) -> Path | None:
    """The build ``digest`` of image ``name``: in this host's cache, else in a shared one.
    A shared build is used only if no one but us or root could have swapped it
    (:func:`~pytest_smolvm.paths.check_safe_path`): a ConfigError says which directory is not."""
    path = images_dir() / name / digest
    if (path / "manifest.json").is_file():
        return path
    for base in shared_image_dirs():
        path = base / name / digest
        if (path / "manifest.json").is_file():
            return check_safe_path(path, "shared image build", "SMOLVM_IMAGE_PATH")
    return None


def _hint(name: str) -> str:
    if os.sep in name or name.startswith("."):
        return f"{BUILD_HINT} --name NAME (the image this directory was built as)"
    return BUILD_HINT if name == "default" else f"{BUILD_HINT} --name {name}"


def resolve(name_or_path: str) -> Image:
    """Return the image called ``name_or_path`` (a built name or an image directory)."""
    looks_like_path = os.sep in name_or_path or name_or_path.startswith(".")
    if looks_like_path:
        path = Path(name_or_path).expanduser().resolve()
        if not (path / "manifest.json").is_file():
            raise ImageError(
                f"image path {name_or_path!r} is not an image directory (no manifest.json); "
                f"build one with: {BUILD_HINT} --name NAME, then use the name"
            )
        return _load(path, name_or_path)
    name = name_or_path
    if name == "default":
        found = find_build(name, Recipe().digest())
        if found is None:
            older = _current(name)
            extra = f" (an older build is at {older}, from a different recipe)" if older else ""
            raise ImageError(
                f"guest image 'default' is not built for this version of pytest-smolvm{extra}; "
                f"build it (needs root, mmdebstrap and network access to the Debian archive) with: "
                f"{BUILD_HINT}"
            )
        return _load(found, name)
    current = _current(name)
    if current is None:
        where = ", ".join(str(d) for d in [images_dir(), *shared_image_dirs()])
        raise ImageError(f"no guest image named {name!r} in {where}; build it with: {_hint(name)}")
    return _load(current, name)


def _current(name: str) -> Path | None:
    for base in [images_dir(), *shared_image_dirs()]:
        try:
            found = (base / name / "current").resolve(strict=True)
        except OSError:
            continue
        if base != images_dir():
            check_safe_path(found, "shared image build", "SMOLVM_IMAGE_PATH")
        return found
    return None


def load_image(path: Path, name: str) -> Image:
    """The image build at ``path`` (verified), named ``name``."""
    return _load(path, name)


def _load(path: Path, name: str) -> Image:
    st = (path / "manifest.json").stat() if (path / "manifest.json").exists() else None
    return _load_cached(path, name, st.st_mtime_ns if st else 0)


@functools.lru_cache(maxsize=32)
def _load_cached(path: Path, name: str, _mtime: int) -> Image:
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError) as exc:
        raise ImageError(f"image {name!r} at {path} has an unreadable manifest ({exc}); "
                         f"rebuild it with: {_hint(name)} --force") from exc
    for fname, meta in manifest.get("files", {}).items():
        f = path / fname
        try:
            size = f.stat().st_size
        except OSError:
            raise ImageError(f"image {name!r} is missing {f}; rebuild it with: {_hint(name)} --force") from None
        if size != meta["size"]:
            raise ImageError(f"image {name!r} file {f} has {size} bytes, expected {meta['size']} "
                             f"(corrupt); rebuild it with: {_hint(name)} --force")
    with open(path / "vmlinux", "rb") as f:
        head = f.read(64)
        # An ELF (amd64, booted via PVH) or an arm64 Image (magic ARM\x64 at offset 56).
        if head[:4] != b"\x7fELF" and head[56:60] != b"ARM\x64":
            raise ImageError(f"image {name!r} kernel {path / 'vmlinux'} is not an ELF file (corrupt); "
                             f"rebuild it with: {_hint(name)} --force")
    with open(path / "rootfs.ext4", "rb") as f:
        f.seek(EXT4_MAGIC_OFFSET)
        if f.read(2) != b"\x53\xef":
            raise ImageError(f"image {name!r} rootfs {path / 'rootfs.ext4'} has no ext4 superblock "
                             f"(corrupt); rebuild it with: {_hint(name)} --force")
    initrd = _boot_layer(path, name, manifest)
    return Image(
        name=name,
        path=path,
        kernel=path / "vmlinux",
        initrd=initrd,
        rootfs=path / "rootfs.ext4",
        rootfs_mib=int(manifest["rootfs_mib"]),
        digest=str(manifest["digest"]),
        kernel_release=str(manifest.get("kernel_release", "")),
        ssh_host_key_pub=(path / "ssh_host_ed25519_key.pub").read_text().strip()
        if (path / "ssh_host_ed25519_key.pub").exists() else "",
        arch=image_arch(manifest),
    )


def image_arch(manifest: dict[str, object]) -> str:
    """The Debian architecture an image's manifest says it was built for (``amd64`` for
    builds made before images had one)."""
    recipe = manifest.get("recipe", {})
    arch = recipe.get("arch", "amd64") if isinstance(recipe, dict) else "amd64"
    return str(manifest.get("arch", arch))


def _boot_layer(path: Path, name: str, manifest: dict[str, object]) -> Path:
    """The image's boot layer for this version's agent: beside the image, or, for an image
    in a shared cache that lacks it, derived into this host's cache (never written there)."""
    arch = image_arch(manifest)
    initrd = path / f"boot-{boot_digest(boot_key(arch))}.cpio"
    if initrd.exists():
        return initrd
    if not path.is_relative_to(images_dir()) and any(path.is_relative_to(d) for d in shared_image_dirs()):
        local = cache_dir() / "bootlayers" / str(manifest.get("digest", "unknown"))
        local.mkdir(parents=True, exist_ok=True)
        initrd = local / initrd.name
        if initrd.exists():
            return initrd
    try:
        build_initramfs(path, initrd, agent_binary(arch))
    except OSError as exc:
        raise ImageError(f"cannot write the boot layer of image {name!r} at {initrd}: {exc}") from exc
    return initrd


def list_images() -> list[tuple[str, Path, dict[str, object]]]:
    """Every built image: (name, path, manifest)."""
    out: list[tuple[str, Path, dict[str, object]]] = []
    root = images_dir()
    if not root.is_dir():
        return out
    for name_dir in sorted(root.iterdir()):
        for build in sorted(name_dir.iterdir()):
            if build.name == "current" or not (build / "manifest.json").is_file():
                continue
            try:
                out.append((name_dir.name, build, json.loads((build / "manifest.json").read_text())))
            except (OSError, ValueError):
                out.append((name_dir.name, build, {"error": "unreadable manifest"}))
    return out
