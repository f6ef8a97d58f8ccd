"""Files into and out of a running guest: :class:`Files` (``vm.put``, ``vm.get``,
``vm.get_dir``), and directory trees as one tar stream each way.

``vm.put(Path(dir), dest)``: the host packs the tree (:func:`pack`) from ``lstat`` through
directory file descriptors, so nothing inside it is followed: a symlink travels as a link
(its target verbatim, wherever it points), and a directory swapped for a symlink while we
read is refused, never entered. Only regular files, directories and symlinks are packed;
anything else (a FIFO, socket or device) is refused naming the path. Entries belong to root
(uid/gid 0, no names); modes and mtimes are kept. The guest extracts it with the boot
layer's busybox (``/run/smolvm/busybox``, in every guest whatever its image): one exec
whose stdin is the tar.

``vm.get_dir(src, local)``: the guest runs ``busybox tar -c`` with its stdout capped at
``max_size``, and the host extracts what arrives with the hardened layer applier of
:mod:`pytest_smolvm.images.layers` (written for untrusted OCI layers): ``..`` refused,
every symlink met on the way resolved inside the new tree, the last component never
followed, files created ``O_EXCL|O_NOFOLLOW``. The guest is hostile: a symlink in its tree
arrives as a symlink and is never written through; devices, FIFOs and sockets are skipped
(:class:`TransferWarning`); setuid, setgid and sticky bits are dropped; nothing is chowned
(files belong to the caller). The tree is assembled in a private directory beside
``local`` and renamed into place at the end, so a failure leaves nothing behind.
"""

from __future__ import annotations

import errno
import io
import os
import secrets
import shutil
import stat
import tarfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .commands import REPLY_GRACE
from .errors import ConfigError, GuestFileError, GuestTimeout, ImageError, SmolVMError
from .guest import replies
from .guest.client import GuestClient
from .guest.replies import ExecReply
from .images import layers
from .images import tarstream as ts
from .session import GuestSession
from .timeouts import scaled

BUSYBOX = "/run/smolvm/busybox"  # the boot layer's busybox, in every guest whatever its image
DEFAULT_GET_LIMIT = 256 * 1024 * 1024
MAX_PUT = 1 << 30  # the agent's request-body limit
GET_TIMEOUT = 120.0
#: Room for a tree transfer's tar messages (its stderr) in the reply.
TRANSFER_MESSAGES = 64 * 1024
#: Deepest directory nesting packed or extracted (the layer applier's bound).
MAX_DEPTH = layers.MAX_DEPTH
#: Most entries a tree from the guest may have (each costs at least 512 bytes of the cap anyway).
MAX_ENTRIES = 1 << 20
#: Room a tar needs beyond its files' data: a header per entry, the end-of-archive record.
HEADER_ROOM = 3 * ts.BLOCK + tarfile.RECORDSIZE

#: Creates ``$1`` (and its parents) with mode ``$2`` if it is missing, then extracts stdin
#: into it. An existing directory is merged into; its own mode and owner are left alone.
#: Paths travel as positional arguments, never in the script text.
PUT_SCRIPT = ('B=$0; d=$1; if [ ! -e "$d" ] && [ ! -L "$d" ]; then '
              '"$B" mkdir -p "$d" && "$B" chmod "$2" "$d" || exit 1; fi; '
              'exec "$B" tar -x -C "$d"')
#: Writes the tree ``$1`` as a tar to stdout; a missing ``$1`` exits 2, a non-directory 20.
GET_SCRIPT = ('B=$0; d=$1; if [ ! -e "$d" ]; then echo "$d: No such file or directory" >&2; exit 2; fi; '
              'if [ ! -d "$d" ]; then echo "$d: Not a directory" >&2; exit 20; fi; '
              'exec "$B" tar -c -C "$d" .')
_EXIT_ERRNO = {2: errno.ENOENT, 20: errno.ENOTDIR}
_STRERROR = {os.strerror(e): e for e in (errno.ENOENT, errno.EACCES, errno.EROFS, errno.ENOSPC, errno.ENOTDIR,
                                          errno.EEXIST, errno.EDQUOT)}


class TransferWarning(UserWarning):
    """``get_dir()`` skipped entries the host does not take from a guest (devices, FIFOs)."""


@dataclass(frozen=True)
class Packed:
    """A host tree as a tar: the stream, what is in it, and the mode of its top directory."""

    data: bytes
    files: int
    dirs: int
    symlinks: int
    root_mode: int


# ------------------------------------------------------------------ host -> guest


def put_argv(dest: str, root_mode: int) -> list[str]:
    return [BUSYBOX, "sh", "-c", PUT_SCRIPT, BUSYBOX, dest, f"{root_mode & 0o7777:o}"]


def get_argv(src: str) -> list[str]:
    return [BUSYBOX, "sh", "-c", GET_SCRIPT, BUSYBOX, src]


class _Packer:
    """Walks a host tree through directory file descriptors into a tar, never following a
    symlink below the top, and refuses to grow past ``limit`` bytes."""

    def __init__(self, src: Path, limit: int, tar: tarfile.TarFile, buf: io.BytesIO) -> None:
        self.src, self.limit, self.tar, self.buf = src, limit, tar, buf
        self.counts = {"files": 0, "dirs": 0, "symlinks": 0}

    def _info(self, rel: str, st: os.stat_result, kind: bytes) -> tarfile.TarInfo:
        info = tarfile.TarInfo(rel)
        info.type, info.mode, info.mtime = kind, stat.S_IMODE(st.st_mode), int(st.st_mtime)
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info

    def _room(self, rel: str, size: int) -> None:
        if self.buf.tell() + size + HEADER_ROOM + 1024 > self.limit:
            raise ConfigError(f"put({str(self.src)!r}): the tree is over the {self.limit}-byte limit of one "
                              f"transfer (reached at {rel!r}); copy it in parts")

    def directory(self, fd: int, rel: str, depth: int) -> None:
        """Pack the entries of the open directory ``fd`` (``rel`` inside the tree)."""
        if depth > MAX_DEPTH:
            raise ConfigError(f"put({str(self.src)!r}): {rel!r} is nested over {MAX_DEPTH} deep")
        with os.scandir(fd) as it:
            names = sorted(e.name for e in it)
        for name in names:
            self.entry(fd, f"{rel}/{name}" if rel else name, name, depth)

    def entry(self, dir_fd: int, rel: str, name: str, depth: int) -> None:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        self._room(rel, st.st_size if stat.S_ISREG(st.st_mode) else 0)
        if stat.S_ISLNK(st.st_mode):
            info = self._info(rel, st, tarfile.SYMTYPE)
            info.linkname = os.readlink(name, dir_fd=dir_fd)
            self.tar.addfile(info)
            self.counts["symlinks"] += 1
        elif stat.S_ISDIR(st.st_mode):
            fd = _open(name, dir_fd, os.O_DIRECTORY)
            try:
                self.tar.addfile(self._info(rel, os.fstat(fd), tarfile.DIRTYPE))
                self.counts["dirs"] += 1
                self.directory(fd, rel, depth + 1)
            finally:
                os.close(fd)
        elif stat.S_ISREG(st.st_mode):
            self.regular(dir_fd, rel, name)
        else:
            raise ConfigError(f"put({str(self.src)!r}): {rel!r} is not a regular file, directory or symlink "
                              f"(a {_kind(st.st_mode)}); only those can be copied into the guest")

    def regular(self, dir_fd: int, rel: str, name: str) -> None:
        fd = _open(name, dir_fd, os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise ConfigError(f"put({str(self.src)!r}): {rel!r} changed while it was read")
            self._room(rel, st.st_size)
            info = self._info(rel, st, tarfile.REGTYPE)
            info.size = st.st_size
            try:
                self.tar.addfile(info, f)
            except OSError as exc:  # tarfile's "unexpected end of data": the file shrank
                raise ConfigError(f"put({str(self.src)!r}): {rel!r} changed while it was read ({exc})") from None
        self.counts["files"] += 1


def _open(name: str, dir_fd: int, flags: int) -> int:
    """``name`` in ``dir_fd``, never through a symlink (one swapped in since the lstat is refused)."""
    return os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | flags, dir_fd=dir_fd)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return f"file of mode {mode:o}"


def pack(src: Path, limit: int) -> Packed:
    """The tree ``src`` as a tar of at most ``limit`` bytes (ConfigError naming what is wrong).
    ``src`` itself may be a symlink to a directory (the caller named it); nothing below is followed."""
    try:
        fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError(f"put({str(src)!r}): the local directory does not exist") from None
    except NotADirectoryError:
        raise ConfigError(f"put({str(src)!r}): not a directory") from None
    buf = io.BytesIO()
    try:
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            packer = _Packer(src, limit, tar, buf)
            root_mode = stat.S_IMODE(os.fstat(fd).st_mode)
            packer.directory(fd, "", 0)
    except OSError as exc:
        raise ConfigError(f"put({str(src)!r}): cannot read the tree: {exc}") from None
    finally:
        os.close(fd)
    data, c = buf.getvalue(), packer.counts
    if len(data) > limit:  # a long link's pax record can outgrow the room _room keeps
        raise ConfigError(f"put({str(src)!r}): the tree is over the {limit}-byte limit of one transfer")
    return Packed(data, c["files"], c["dirs"], c["symlinks"], root_mode)


def guest_failure(reply: ExecReply, what: str, path: str) -> GuestFileError:
    """What a failed transfer command in the guest said, as a GuestFileError (errno guessed
    from the exit status or the message, EIO if neither says)."""
    message = reply.stderr.decode(errors="replace").strip() or f"exit status {reply.exit_code}"
    code = _EXIT_ERRNO.get(reply.exit_code) or next(
        (e for text, e in _STRERROR.items() if text in message), errno.EIO)
    return GuestFileError(code, f"{what} failed in the guest: {message[-2000:]}", path)


# ------------------------------------------------------------------ guest -> host


def check_local(local: object, what: str) -> Path:
    """``local`` as a Path that may receive a tree: missing (its parent existing) or an empty
    directory (not a symlink to one). ConfigError naming it otherwise."""
    if not isinstance(local, (str, os.PathLike)):
        raise ConfigError(f"invalid local path {local!r} for {what}: expected a pathlib.Path")
    path = Path(local)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if not path.parent.is_dir():
            raise ConfigError(f"{what}: the parent of {str(path)!r} does not exist (create it first)") from None
        return path
    if not stat.S_ISDIR(st.st_mode) or any(path.iterdir()):
        raise ConfigError(f"{what}: {str(path)!r} already exists; give a new path or an empty directory")
    return path


class _Received(layers.Tree):
    """A guest's tree applied by the layer applier's rules, minus what only layers mean:
    no whiteouts (``.wh.x`` is an ordinary name here), only files, directories, symlinks
    and hard links (others are counted in ``skipped``)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.skipped: list[str] = []

    def _entry(self, m: ts.Member, data: ts.Counted, where: str) -> None:
        if "\0" in m.name or "\0" in m.linkname:
            raise ImageError(f"{where}: a NUL byte in a name (refused)")
        parts = [p for p in m.name.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise ImageError(f"{where}: climbs out with '..' (refused)")
        if not parts:  # the top directory itself: only its mode
            if m.type == ts.DIRECTORY:
                self.meta[""] = layers.Meta(stat.S_IFDIR | m.mode)
            return
        if m.type not in (ts.REGULAR, "7", ts.DIRECTORY, ts.SYMLINK, ts.HARDLINK):
            self.skipped.append(m.name)
            return
        parent = self.walk(parts[:-1], create=True, where=where)
        rel = "/".join([*parent, parts[-1]])
        if m.type == ts.DIRECTORY:
            self._directory(rel, m)
        else:
            self._clear(rel)
            self._place(rel, m, data, where)

    def set_modes(self) -> None:
        """Give every file and directory its mode from the guest (setuid, setgid, sticky
        dropped), deepest first so a read-only directory is set after its contents."""
        for rel, meta in sorted(self.meta.items(), key=lambda kv: -kv[0].count("/") - (kv[0] != "")):
            if stat.S_ISLNK(meta.mode):
                continue
            path = os.path.join(self.root, rel) if rel else str(self.root)
            try:
                st = os.lstat(path)  # every parent is a real directory of ours (Tree.walk made it so)
            except FileNotFoundError:
                continue
            if stat.S_IFMT(st.st_mode) == stat.S_IFMT(meta.mode):
                os.chmod(path, meta.mode & 0o777)

    def discard(self) -> None:
        """Remove the tree, whatever modes set_modes gave its directories."""
        for rel, meta in self.meta.items():
            if stat.S_ISDIR(meta.mode):
                try:
                    os.chmod(os.path.join(self.root, rel) if rel else self.root, 0o700)
                except OSError:
                    pass
        shutil.rmtree(self.root, ignore_errors=True)


def _publish(staging: Path, local: Path, what: str) -> None:
    """Rename the finished tree into place: over nothing, or over an empty directory."""
    try:
        os.rename(staging, local)
    except OSError as exc:  # local appeared, or was filled, since check_local
        raise ConfigError(f"{what}: cannot create {str(local)!r}: {exc.strerror or exc}") from None


def unpack(data: bytes, local: Path, what: str) -> list[str]:
    """Extract the guest's tar ``data`` as ``local`` (see :func:`check_local`), atomically:
    built beside it, renamed into place. Returns the names of the entries skipped.
    A tar the layer rules refuse is a GuestFileError (the guest sent it)."""
    staging = local.parent / f".{local.name}.smolvm-{secrets.token_hex(4)}"
    try:
        os.mkdir(staging, 0o700)
    except OSError as exc:
        raise ConfigError(f"{what}: cannot write beside {str(local)!r}: {exc.strerror or exc}") from None
    tree = _Received(staging)
    try:
        stream = ts.Counted(io.BytesIO(data), ts.Budget(len(data), MAX_ENTRIES), "the guest's tar")
        tree.apply(stream, "the guest's tar")
        tree.set_modes()
        _publish(staging, local, what)
    except ImageError as exc:
        tree.discard()
        raise GuestFileError(errno.EPROTO, f"{what}: refused {exc}", str(local)) from None
    except BaseException:
        tree.discard()
        raise
    if tree.skipped:
        shown = ", ".join(repr(n[:100]) for n in tree.skipped[:5])
        warnings.warn(f"{what}: skipped {len(tree.skipped)} entries that are not files, directories or "
                      f"symlinks (devices, FIFOs): {shown}{', ...' if len(tree.skipped) > 5 else ''}",
                      TransferWarning, stacklevel=3)
    return tree.skipped


def check_guest_path(path: object, what: str) -> None:
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
        raise ConfigError(f"invalid guest path {path!r} for {what}(): expected an absolute path")


class Files:
    """``put``, ``get`` and ``get_dir`` for the VM ``name`` (the docstrings the user reads
    are :class:`~pytest_smolvm.vm.SmolVM`'s). Arguments are checked from the start; calls
    reach the guest once :meth:`attach` gave the running guest."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._session: GuestSession | None = None

    def attach(self, session: GuestSession) -> None:
        self._session = session

    @property
    def session(self) -> GuestSession:
        if self._session is None:
            raise SmolVMError(f"{self.name} is not running (it was not started, or its start failed)")
        return self._session

    def put(self, src: bytes | bytearray | memoryview | os.PathLike[str], dest: str,
            *, mode: int | None = None) -> None:
        if isinstance(src, str):
            raise TypeError(f"put() takes bytes or a pathlib.Path, not str ({src[:40]!r}); "
                            f"use Path(...) for a local file or .encode() for text")
        check_guest_path(dest, "put")
        if not isinstance(src, (bytes, bytearray, memoryview)):
            local = Path(src)
            if local.is_dir():
                if mode is not None:
                    raise ConfigError(f"put({str(local)!r}, {dest!r}, mode={mode!r}): mode= is for a file; "
                                      f"a directory's entries keep their own modes")
                return self._put_tree(local, dest)
            if not local.exists():
                raise ConfigError(f"put({str(local)!r}, {dest!r}): the local source does not exist")
        data = bytes(src) if isinstance(src, (bytes, bytearray, memoryview)) else Path(src).read_bytes()
        if len(data) > MAX_PUT:
            raise ConfigError(f"put({dest!r}): {len(data)} bytes is over the {MAX_PUT}-byte limit of one transfer")
        timeout = 60.0 + len(data) / 5e6
        self._file_call(lambda guest: guest.put(dest, data, mode=mode, timeout=timeout), timeout=timeout,
                        what=f"put({dest!r})", path=dest)

    def _put_tree(self, src: Path, dest: str) -> None:
        packed = pack(src, MAX_PUT)
        what = f"put({str(src)!r}, {dest!r})"
        reply = self._tar(what, dest, put_argv(dest, packed.root_mode), packed.data,
                          timeout=60.0 + len(packed.data) / 5e6, max_output=TRANSFER_MESSAGES)
        if reply.exit_code != 0:
            raise guest_failure(reply, f"{self.name}: {what}", dest)

    def get_dir(self, src: str, local: str | os.PathLike[str], *, max_size: int, timeout: float) -> Path:
        check_guest_path(src, "get_dir")
        what = f"get_dir({src!r})"
        if isinstance(max_size, bool) or not isinstance(max_size, int) or not 0 < max_size <= MAX_PUT:
            raise ConfigError(f"invalid max_size={max_size!r} for {what}: expected bytes in 1..{MAX_PUT}")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ConfigError(f"invalid timeout={timeout!r} for {what}: expected seconds > 0")
        path = check_local(local, what)
        reply = self._tar(what, src, get_argv(src), b"", timeout=float(timeout), max_output=max_size)
        if reply.stdout_truncated:
            raise GuestFileError(errno.EFBIG, f"{self.name}: {what}: the tree is over the limit of {max_size} "
                                 f"bytes as a tar (max_size=); nothing was written to {str(path)!r}", src)
        if reply.exit_code != 0:
            raise guest_failure(reply, f"{self.name}: {what}", src)
        unpack(reply.stdout, path, f"{self.name}: {what}")
        return path

    def _tar(self, what: str, path: str, argv: list[str], stdin: bytes, *, timeout: float,
             max_output: int) -> replies.ExecReply:
        """One tar command of a tree transfer in the guest (busybox, no shell of the image needed)."""
        grace = scaled(REPLY_GRACE)
        parsed = self.session.call(what, lambda guest: guest.exec(argv, timeout=timeout, wait=timeout + grace,
                                                                  max_output=max_output, cwd="/", stdin=stdin),
                                   wait=timeout + grace)
        if isinstance(parsed, replies.AgentError):
            raise GuestFileError(parsed.errno or errno.EIO, f"{self.name}: {what} failed in the guest: "
                                 f"{parsed.message}", path)
        if parsed.timed_out:
            raise GuestTimeout(f"{self.name}: {what} did not finish within {timeout:g}s; its tar was killed")
        return parsed

    def get(self, path: str, *, max_size: int) -> bytes:
        check_guest_path(path, "get")
        return self._file_call(lambda guest: guest.get(path, max_size=max_size, timeout=GET_TIMEOUT),
                               timeout=GET_TIMEOUT, what=f"get({path!r})", path=path)

    def _file_call(self, op: Callable[[GuestClient], bytes | replies.AgentError | None], *, timeout: float,
                   what: str, path: str) -> bytes:
        """One ``put``/``get`` round trip: a silent agent is a GuestTimeout, a failure in the
        guest a GuestFileError; returns what was read (nothing for a put)."""
        outcome = self.session.call(what, op, wait=timeout)
        if isinstance(outcome, replies.AgentError):
            raise GuestFileError(outcome.errno, f"{self.name}: {what} failed in the guest: {outcome.message}", path)
        return outcome or b""
