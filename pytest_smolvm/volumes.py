"""Read-only volumes (``VMConfig.volumes``): host data a guest reads and can never write back.

A volume is a host directory or an ext4 image file, mounted read-only at a guest path.

- A **directory** is imaged into an ext4 file (``mkfs.ext4 -d``, no journal) at
  ``<cache>/volumes/<digest>.ext4``, keyed by a digest of the tree (names, types, modes,
  owners, contents, link targets), built once under a file lock and published by a rename.
  ext4 because the guest kernel has it built in (squashfs and erofs are modules the boot
  layer does not carry, and their decompression runs emulated under TCG), mke2fs is already
  a builder dependency, and it keeps holes: a 1.1 GiB tree with a sparse 1 GiB file took
  4.2 s (squashfs: 34 s gzip, 2.0 s lz4; erofs: 5.1 s, not sparse; 3.3 s lz4).
- An **image file** is attached as it is.

QEMU gets each as a descriptor opened read-only here (``-add-fd``, ``readonly=on``): a path
swapped after validation is never opened, and the guest's device refuses writes. The agent
mounts each at setup (``ro,noload,nosuid,nodev``), found by its virtio serial.

Snapshot clones get volumes too. The devices are part of the argv, so a snapshot's template
has them; the key covers their number and sizes (the guest keeps the capacity it saw), not
their content: before mounting, the agent drops what the kernel cached of each device, so a
clone reads its own image even when the template had another of the same size. Directory
images are sized up to a power of two so that edits to a data set rarely change the key.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import stat
import subprocess
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Final, NamedTuple

from filelock import FileLock, Timeout

from .errors import ConfigError
from .guest.replies import StepResult
from .host import find_tool

MAX_VOLUMES: Final = 16
EXT4_MAGIC_OFFSET: Final = 1080
MIN_IMAGE_MIB: Final = 64
#: Mount points that would hide what the guest itself runs on (or the agent's own files).
FORBIDDEN_TARGETS: Final = frozenset({"/", "/bin", "/boot", "/etc", "/lib", "/lib64", "/root", "/sbin", "/tmp",
                                      "/usr", "/var"})
FORBIDDEN_TREES: Final = ("/proc", "/sys", "/dev", "/run")
MOUNT_OPTIONS: Final = "ro,noload,nosuid,nodev"
BUILD_LOCK_TIMEOUT: Final = 600.0


class Volume(NamedTuple):
    """A host ``source`` (directory or ext4 image file, absolute) mounted read-only at the
    guest path ``target``."""

    source: str
    target: str


def _bad(value: object, why: str) -> ConfigError:
    return ConfigError(f"invalid volumes={value!r}: {why}")


def _pairs(value: object) -> Iterable[tuple[object, object]]:
    """(source, target) pairs from the accepted spellings: ``{guest: host}``, a list of
    ``Volume``/``(host, guest)``/``"HOST:GUEST"``, or ``"HOST:GUEST[,HOST:GUEST...]"``."""
    if isinstance(value, Mapping):
        return [(src, dst) for dst, src in value.items()]
    if isinstance(value, str):
        value = [part for part in value.split(",") if part.strip()]
    if not isinstance(value, (list, tuple)):
        raise _bad(value, "expected {'/guest/path': 'host/path'} or a list of 'HOST:GUEST'")
    pairs = []
    for item in value:
        if isinstance(item, str):
            src, sep, dst = item.strip().rpartition(":")
            if not sep or not src:
                raise _bad(item, "expected 'HOST:GUEST' (host path, colon, absolute guest path)")
            pairs.append((src, dst))
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            pairs.append((item[0], item[1]))
        else:
            raise _bad(item, "expected 'HOST:GUEST', (host, guest) or a Volume")
    return pairs


def check_target(target: object) -> str:
    """A normalised absolute guest mount point, or ConfigError naming it."""
    if not isinstance(target, str) or not target.startswith("/") or "\0" in target:
        raise _bad(target, "the guest mount point must be an absolute path")
    stripped = target.rstrip("/") or "/"
    norm = posixpath.normpath(stripped)
    if norm.startswith("//"):
        norm = "/" + norm.lstrip("/")
    if norm != stripped:
        raise _bad(target, f"the guest mount point must be a normalised path (such as {norm!r})")
    if norm in FORBIDDEN_TARGETS or any(norm == t or norm.startswith(t + "/") for t in FORBIDDEN_TREES):
        raise _bad(target, f"cannot mount over {norm}: the guest needs it; use a path such as /mnt/data")
    return norm


def check_source(source: object) -> str:
    """An absolute host path to a readable directory or ext4 image, or ConfigError naming it."""
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str) or not source.strip() or "\0" in source:
        raise _bad(source, "the host source must be a path to a directory or an ext4 image file")
    path = os.path.abspath(os.path.expanduser(source.strip()))
    try:
        st = os.stat(path)
    except OSError as exc:
        raise _bad(source, f"host path {path} cannot be used: {exc.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        if not os.access(path, os.R_OK | os.X_OK):
            raise _bad(source, f"host directory {path} is not readable by this user")
        return path
    if not stat.S_ISREG(st.st_mode):
        raise _bad(source, f"host path {path} is neither a directory nor an image file")
    try:
        with open(path, "rb") as f:
            f.seek(EXT4_MAGIC_OFFSET)
            magic = f.read(2)
    except OSError as exc:
        raise _bad(source, f"host file {path} cannot be read: {exc.strerror}") from None
    if magic != b"\x53\xef":
        raise _bad(source, f"host file {path} is not an ext4 image (the guest kernel mounts ext4; "
                           f"give a directory to have it imaged)")
    return path


def check_volumes(value: object) -> tuple[Volume, ...]:
    """Validate and normalise ``volumes`` (sorted by guest path): each source exists and is
    usable, each mount point is absolute, allowed, unique, and not inside another."""
    if value is None or value == "" or value == () or value == []:
        return ()
    vols = sorted((Volume(check_source(src), check_target(dst)) for src, dst in _pairs(value)),
                  key=lambda v: v.target)
    if len(vols) > MAX_VOLUMES:
        raise _bad(value, f"at most {MAX_VOLUMES} volumes")
    for i, a in enumerate(vols):
        for b in vols[i + 1:]:
            if a.target == b.target or b.target.startswith(a.target + "/"):
                raise _bad(value, f"mount points {a.target} and {b.target} overlap")
    return tuple(vols)


# ---------------------------------------------------------------- host side: images


def volumes_dir() -> Path:
    from .paths import cache_dir

    return cache_dir() / "volumes"


class _Tree(NamedTuple):
    fingerprint: str  # stat-only: changes whenever any entry's metadata does
    files: int
    data_bytes: int


def _walk(root: str) -> Iterable[tuple[str, os.stat_result]]:
    """Every entry under ``root`` (itself included, as ``.``), sorted, never following links."""
    stack = ["."]
    while stack:
        rel = stack.pop()
        full = root if rel == "." else os.path.join(root, rel)
        st = os.lstat(full)
        yield rel, st
        if stat.S_ISDIR(st.st_mode):
            names = sorted(os.listdir(full), reverse=True)
            stack.extend(n if rel == "." else f"{rel}/{n}" for n in names)


def _entry_kind(root: str, rel: str, st: os.stat_result) -> str:
    if stat.S_ISDIR(st.st_mode):
        return "d"
    if stat.S_ISREG(st.st_mode):
        return "f"
    if stat.S_ISLNK(st.st_mode):
        return "l"
    raise ConfigError(f"invalid volumes source {root}: {rel} is not a file, directory or symlink "
                      f"(devices, sockets and FIFOs are not imaged)")


def _survey(root: str) -> _Tree:
    h = hashlib.sha256()
    files = data = 0
    for rel, st in _walk(root):
        kind = _entry_kind(root, rel, st)
        h.update(f"{rel}\0{kind}\0{st.st_mode}\0{st.st_uid}\0{st.st_gid}\0{st.st_size}\0{st.st_mtime_ns}\0"
                 f"{st.st_ctime_ns}\0{st.st_ino}\n".encode())
        files += 1
        if kind == "f":
            data += min(st.st_size, st.st_blocks * 512) + 4096
        else:
            data += 4096
    return _Tree(h.hexdigest(), files, data)


def tree_digest(root: str) -> str:
    """Digest of a directory's content: names, types, modes, owners, file contents, links."""
    h = hashlib.sha256(b"smolvm-volume-1\n")
    for rel, st in _walk(root):
        kind = _entry_kind(root, rel, st)
        h.update(f"{rel}\0{kind}\0{stat.S_IMODE(st.st_mode)}\0{st.st_uid}\0{st.st_gid}\0".encode())
        full = os.path.join(root, rel)
        if kind == "l":
            h.update(os.readlink(full).encode(errors="surrogateescape"))
        elif kind == "f":
            with open(full, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    h.update(chunk)
        h.update(b"\n")
    return h.hexdigest()[:32]


_known: dict[tuple[str, str], str] = {}  # (source, stat fingerprint) -> content digest
_known_lock = threading.Lock()


def image_size_mib(tree: _Tree) -> int:
    """A size with room for the data and its inodes, rounded up to a power of two MiB."""
    need = (tree.data_bytes + tree.files * 512) * 11 // 10 + (16 << 20)
    mib = MIN_IMAGE_MIB
    while mib << 20 < need:
        mib *= 2
    return mib


def _mkfs(source: str, target: Path, tree: _Tree) -> None:
    """``mkfs.ext4 -d``, doubling the size if the estimate was short."""
    size = image_size_mib(tree)
    for _ in range(4):
        target.unlink(missing_ok=True)
        mkfs = find_tool("mkfs.ext4") or "mkfs.ext4"
        res = subprocess.run([mkfs, "-q", "-F", "-O", "^has_journal", "-m", "0", "-L", "smolvm-vol",
                              "-N", str(tree.files + 256), "-E", "root_owner=0:0", "-d", source, str(target),
                              f"{size}M"], capture_output=True, text=True)
        if res.returncode == 0:
            return
        if "space" not in res.stderr.lower() and "allocate" not in res.stderr.lower():
            break
        size *= 2
    raise ConfigError(f"invalid volumes source {source}: mkfs.ext4 could not image it: {res.stderr.strip()[-500:]}")


def prepare(volume: Volume) -> Path:
    """The image file QEMU attaches for ``volume``: the file itself, or the directory's ext4
    image from the content cache (built on first use)."""
    if not os.path.isdir(volume.source):
        return Path(volume.source)
    if find_tool("mkfs.ext4") is None:
        raise ConfigError("volumes from directories need mkfs.ext4: apt-get install -y e2fsprogs")
    tree = _survey(volume.source)
    with _known_lock:
        digest = _known.get((volume.source, tree.fingerprint))
    if digest is None:
        digest = tree_digest(volume.source)
    root = volumes_dir()
    root.mkdir(parents=True, exist_ok=True)
    image = root / f"{digest}.ext4"
    if not image.exists():
        _build(volume.source, image, tree)
    with _known_lock:
        _known[(volume.source, tree.fingerprint)] = digest
    return image


def _build(source: str, image: Path, tree: _Tree) -> None:
    try:
        with FileLock(str(image) + ".lock", timeout=BUILD_LOCK_TIMEOUT):
            if image.exists():
                return
            tmp = image.with_name(f".{image.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            try:
                _mkfs(source, tmp, tree)
                if _survey(source).fingerprint != tree.fingerprint:
                    raise ConfigError(f"invalid volumes source {source}: it changed while it was being "
                                      f"imaged; nothing was cached, try again")
                os.chmod(tmp, 0o600)
                os.replace(tmp, image)
            finally:
                tmp.unlink(missing_ok=True)
    except Timeout as exc:
        raise ConfigError(f"another process holds {exc.lock_file} for over {BUILD_LOCK_TIMEOUT:.0f}s") from exc


def prune_images(*, dry_run: bool = False) -> int:
    """Remove every cached directory image (rebuilt on demand); returns how many."""
    root = volumes_dir()
    found = sorted(root.glob("*.ext4")) if root.is_dir() else []
    if not dry_run:
        for image in found:
            image.unlink(missing_ok=True)
    return len(found)


def open_volumes(volumes: Sequence[Volume]) -> list[int]:
    """A read-only descriptor of each volume's image, in order (the caller closes them)."""
    from . import host

    if volumes and host.is_macos():
        raise ConfigError("volumes are not supported on macOS hosts yet")
    fds: list[int] = []
    try:
        for vol in volumes:
            fds.append(os.open(prepare(vol), os.O_RDONLY | os.O_CLOEXEC))
    except OSError as exc:
        for fd in fds:
            os.close(fd)
        raise ConfigError(f"invalid volumes source {exc.filename}: cannot open it: {exc.strerror}") from None
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def volume_sizes(volumes: Sequence[Volume]) -> list[int]:
    """The byte size of each volume's image (part of the snapshot key)."""
    return [prepare(vol).stat().st_size for vol in volumes]


def serial(index: int) -> str:
    """The virtio serial of volume ``index``: how the agent finds its device."""
    return f"smolvm-vol{index}"


def qemu_volume_args(fds: Sequence[int], first_set: int = 2) -> list[str]:
    """``-add-fd``/``-drive``/``-device`` for read-only volumes on inherited descriptors (pure).
    They must come after the root disk's device: the guest names disks in argv order, and
    the initramfs mounts ``/dev/vda``."""
    argv: list[str] = []
    for i, fd in enumerate(fds):
        fdset = first_set + i
        argv += ["-add-fd", f"fd={fd},set={fdset},opaque={serial(i)}",
                 "-drive", f"id=vol{i},file=/dev/fdset/{fdset},format=raw,if=none,readonly=on",
                 "-device", f"virtio-blk-device,drive=vol{i},serial={serial(i)}"]
    return argv


def guest_mounts(volumes: Sequence[Volume]) -> list[dict[str, str]]:
    """The ``volumes`` of the agent's ``setup`` request."""
    return [{"serial": serial(i), "target": vol.target, "options": MOUNT_OPTIONS}
            for i, vol in enumerate(volumes)]


def check_mounted(step: StepResult | None, volumes: Sequence[Volume], name: str) -> None:
    """Raise ConfigError when the agent's ``setup`` reply says a volume was not mounted."""
    if step is None or step.exit_code:
        listed = ", ".join(f"{v.source} at {v.target}" for v in volumes)
        raise ConfigError(f"{name}: mounting volumes ({listed}) failed in the guest: "
                          f"{step.output if step else 'the agent did not say'}")


__all__ = ["Volume", "check_volumes", "open_volumes", "prepare"]
