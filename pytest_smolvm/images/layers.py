"""Apply image layers (tar changesets, OCI whiteouts) to a directory, and write it as ext4.

Layers are untrusted. Every entry is placed by walking its path one component at a time
from the root: ``..`` in a name is refused, a symlink met on the way is resolved *inside*
the root (an absolute or ``..``-laden target is clamped to it, as a chroot would), the last
component is never followed (an existing symlink there is replaced, files are created with
``O_EXCL|O_NOFOLLOW``), and hard links may only join paths inside the root. Device nodes are
skipped (the guest's ``/dev`` is a devtmpfs). Sizes and entry counts are bounded by the
import's :class:`~.tarstream.Budget`.

Nothing is chowned on the host, so no root is needed: each path's owner, group and mode are
kept in :attr:`Tree.meta` and stamped onto the ext4 image by ``debugfs`` after
``mkfs.ext4 -d`` (:func:`write_ext4`). Host files stay private to us (``0600``/``0700``).
Extended attributes travel the same way, never set on a host file: ``security.capability``
on regular files (file capabilities, e.g. ``ping``'s ``cap_net_raw``: the guest's kernel
grants them as the image meant) and ``user.*`` on files and directories. Others (SELinux
labels, ``trusted.*``, ACLs, which ext4 stores in a format of its own) are counted and skipped.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..errors import ImageError
from ..host import find_tool
from . import tarstream as ts

MAX_SYMLINK_HOPS = 40
#: Directory depth (os.walk and shutil.rmtree recurse per level; real images stay near 20).
MAX_DEPTH = 200
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"


@dataclass(frozen=True)
class Meta:
    """What the image says a path is: full ``st_mode`` (type and permissions), owner, group."""

    mode: int
    uid: int = 0
    gid: int = 0
    #: Extended attributes to stamp (names already checked by :func:`kept_xattrs`).
    xattrs: tuple[tuple[str, bytes], ...] = ()


#: A ``user.*`` attribute name we pass to debugfs (anything else is skipped).
_USER_XATTR = re.compile(r"user\.[A-Za-z0-9._-]{1,200}")


def kept_xattrs(kind: int, xattrs: tuple[tuple[str, bytes], ...]) -> tuple[tuple[str, bytes], ...]:
    """The extended attributes of a path of type ``kind`` (``stat.S_IF*``) that the image
    keeps: ``security.capability`` on regular files, ``user.*`` on files and directories."""
    def kept(name: str) -> bool:
        if name == "security.capability":
            return kind == stat.S_IFREG
        return bool(_USER_XATTR.fullmatch(name)) and kind in (stat.S_IFREG, stat.S_IFDIR)

    return tuple((name, value) for name, value in xattrs if kept(name))


def _parts(name: str, where: str) -> list[str]:
    """A tar name as path components; ``..`` anywhere is refused, ``.`` and ``/`` dropped."""
    if "\n" in name or "\r" in name:
        raise ImageError(f"{where}: entry {name[:200]!r} has a line break in its name (refused)")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ImageError(f"{where}: entry {name[:200]!r} climbs out with '..' (refused)")
    return parts


class Tree:
    """A root filesystem being assembled in ``root`` (a private directory of ours)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.meta: dict[str, Meta] = {"": Meta(stat.S_IFDIR | 0o755)}
        self.touched: set[str] = set()  # paths the current layer created (whiteouts spare them)
        self.skipped_devices = 0
        self.skipped_xattrs = 0

    # ------------------------------------------------------------------ paths

    def _abs(self, parts: list[str]) -> str:
        return os.path.join(self.root, *parts)

    def walk(self, parts: list[str], *, create: bool, where: str) -> list[str]:
        """``parts`` as real directories below the root (symlinks resolved inside it);
        missing ones are created when ``create``, else refused."""
        done: list[str] = []
        todo, hops = list(parts), 0
        while todo:
            comp = todo.pop(0)
            if comp in ("", "."):
                continue
            if comp == "..":
                if done:
                    done.pop()
                continue
            path = self._abs([*done, comp])
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                if not create:
                    raise ImageError(f"{where}: {'/'.join(parts)!r} does not exist") from None
                os.mkdir(path, 0o700)
                self.meta["/".join([*done, comp])] = Meta(stat.S_IFDIR | 0o755)
                st = os.lstat(path)
            if stat.S_ISDIR(st.st_mode):
                done.append(comp)
                if len(done) > MAX_DEPTH:
                    raise ImageError(f"{where}: {'/'.join(parts)[:200]!r} is nested over {MAX_DEPTH} deep")
            elif stat.S_ISLNK(st.st_mode):
                hops += 1
                if hops > MAX_SYMLINK_HOPS:
                    raise ImageError(f"{where}: too many symlinks resolving {'/'.join(parts)!r}")
                target = os.readlink(path)
                if target.startswith("/"):
                    done = []
                todo = target.split("/") + todo
            else:
                raise ImageError(f"{where}: {'/'.join([*done, comp])!r} is not a directory")
        return done

    def resolve(self, rel: str) -> str | None:
        """The regular file ``rel`` names inside the root, symlinks followed inside it, or None."""
        parts = [p for p in rel.split("/") if p not in ("", ".")]
        for _ in range(MAX_SYMLINK_HOPS):
            if not parts or parts[-1] == "..":
                return None
            try:
                parent = self.walk(parts[:-1], create=False, where="")
                st = os.lstat(self._abs([*parent, parts[-1]]))
            except (ImageError, OSError):
                return None
            if not stat.S_ISLNK(st.st_mode):
                return "/".join([*parent, parts[-1]]) if stat.S_ISREG(st.st_mode) else None
            target = os.readlink(self._abs([*parent, parts[-1]]))
            parts = target.split("/") if target.startswith("/") else [*parent, *target.split("/")]
            parts = [p for p in parts if p not in ("", ".")]
        return None

    def remove(self, rel: str) -> None:
        """Remove whatever is at ``rel`` (never following a symlink) and forget its metadata,
        so the ext4 written from the tree has no entry for it."""
        self._clear(rel)

    def _clear(self, rel: str) -> None:
        """Remove whatever is at ``rel`` (never following a symlink) and forget its metadata."""
        path = self._abs(rel.split("/"))
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(path)
            prefix = rel + "/"
            for key in [k for k in self.meta if k.startswith(prefix)]:
                del self.meta[key]
        else:
            os.unlink(path)
        self.meta.pop(rel, None)

    # ------------------------------------------------------------------ layers

    def apply(self, stream: ts.Counted, where: str) -> None:
        """Apply one layer (a tar stream) on top of what is there."""
        self.touched = set()
        for member, data in ts.members(stream, where):
            at = f"{where}: entry {member.name[:200]!r}"
            try:
                self._entry(member, data, at)
            except OSError as exc:
                raise ImageError(f"{at}: {exc.strerror or exc}") from None
        stream.drain()

    def _entry(self, m: ts.Member, data: ts.Counted, where: str) -> None:
        parts = _parts(m.name, where)
        if not parts:  # the root itself: only its metadata
            if m.type == ts.DIRECTORY:
                self.meta[""] = Meta(stat.S_IFDIR | m.mode, m.uid, m.gid)
            return
        parent = self.walk(parts[:-1], create=True, where=where)
        base = parts[-1]
        if base.startswith(WHITEOUT):
            self._whiteout(parent, base)
            return
        rel = "/".join([*parent, base])
        if m.type in (ts.CHARDEV, ts.BLOCKDEV):
            self.skipped_devices += 1
            return
        if m.type == ts.DIRECTORY:
            self._directory(rel, m)
        else:
            self._clear(rel)
            self._place(rel, m, data, where)
        self.touched.add(rel)

    def _whiteout(self, parent: list[str], base: str) -> None:
        prefix = "/".join(parent)
        if base == OPAQUE:  # hide what lower layers put in this directory
            for child in os.listdir(self._abs(parent)):
                rel = f"{prefix}/{child}" if prefix else child
                if rel not in self.touched:
                    self._clear(rel)
            return
        if base.startswith(WHITEOUT + WHITEOUT):
            return  # other aufs markers (.wh..wh.plnk, ...) carry nothing for us
        name = base[len(WHITEOUT):]
        if name in ("", ".", ".."):
            raise ImageError(f"whiteout {base!r} in {prefix or '/'!r} names no entry (refused)")
        rel = f"{prefix}/{name}" if prefix else name
        if rel not in self.touched:
            self._clear(rel)

    def _directory(self, rel: str, m: ts.Member) -> None:
        path = self._abs(rel.split("/"))
        try:
            is_dir = stat.S_ISDIR(os.lstat(path).st_mode)
        except FileNotFoundError:
            is_dir = False
        if not is_dir:
            self._clear(rel)
            os.mkdir(path, 0o700)
        self.meta[rel] = Meta(stat.S_IFDIR | m.mode, m.uid, m.gid, self._xattrs(stat.S_IFDIR, m))

    def _xattrs(self, kind: int, m: ts.Member) -> tuple[tuple[str, bytes], ...]:
        kept = kept_xattrs(kind, m.xattrs)
        self.skipped_xattrs += len(m.xattrs) - len(kept)
        return kept

    def _place(self, rel: str, m: ts.Member, data: ts.Counted, where: str) -> None:
        path = self._abs(rel.split("/"))
        if m.type in (ts.REGULAR, "7"):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as f:
                for chunk in data.chunks(m.size, f"{where}: the layer ends inside this file"):
                    f.write(chunk)
            kind = stat.S_IFREG
        elif m.type == ts.SYMLINK:
            os.symlink(m.linkname, path)
            kind = stat.S_IFLNK
        elif m.type == ts.FIFO:
            os.mkfifo(path, 0o600)
            kind = stat.S_IFIFO
        else:  # HARDLINK
            self._hardlink(path, m.linkname, where)
            return
        os.utime(path, ns=(m.mtime * 10**9, m.mtime * 10**9), follow_symlinks=False)
        self.meta[rel] = Meta(kind | (0o777 if kind == stat.S_IFLNK else m.mode), m.uid, m.gid,
                              self._xattrs(kind, m))

    def _hardlink(self, path: str, linkname: str, where: str) -> None:
        parts = _parts(linkname, where)
        if not parts:
            raise ImageError(f"{where}: hard link to the root directory (refused)")
        target = [*self.walk(parts[:-1], create=False, where=where), parts[-1]]
        source = self._abs(target)
        try:
            st = os.lstat(source)
        except FileNotFoundError:
            raise ImageError(f"{where}: hard link to {linkname[:200]!r}, which does not exist") from None
        if stat.S_ISDIR(st.st_mode):
            raise ImageError(f"{where}: hard link to the directory {linkname[:200]!r} (refused)")
        os.link(source, path, follow_symlinks=False)
        rel = os.path.relpath(path, self.root)
        self.meta[rel] = self.meta.get("/".join(target), Meta(st.st_mode))

    # ------------------------------------------------------------------ output

    def fill_missing(self) -> None:
        """Paths we added ourselves (no layer said what they are) belong to root, with the
        permissions they have here."""
        for dirpath, dirnames, filenames in os.walk(self.root):
            for name in dirnames + filenames:
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, self.root)
                if rel not in self.meta:
                    st = os.lstat(full)
                    self.meta[rel] = Meta(st.st_mode)

    def used_bytes(self) -> int:
        total = 0
        for dirpath, _, filenames in os.walk(self.root):
            for name in filenames:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
        return total


def _quote(path: str) -> str:
    """A path as one debugfs argument (its parser takes ``""`` inside quotes as ``"``)."""
    return '"' + path.replace('"', '""') + '"'


def debugfs_script(meta: dict[str, Meta], values: Path) -> tuple[str, dict[Path, bytes]]:
    """``set_inode_field`` commands giving every path its mode, owner and group, and
    ``ea_set`` commands for its extended attributes, whose values debugfs reads from the
    files returned (to be written under ``values``) (pure)."""
    lines: list[str] = []
    files: dict[Path, bytes] = {}
    for rel, m in sorted(meta.items()):
        q = _quote("/" + rel)
        lines.append(f"sif {q} mode 0{m.mode:o}\nsif {q} uid {m.uid}\nsif {q} gid {m.gid}\n")
        for name, value in m.xattrs:
            f = values / str(len(files))
            files[f] = value
            lines.append(f"ea_set -f {_quote(str(f))} {q} {name}\n")
    return "".join(lines), files


def write_ext4(tree: Tree, target: Path, size_mib: int, label: str = "smolvm-root") -> None:
    """Write ``tree`` as a sparse ext4 image of ``size_mib`` with the layers' ownership."""
    tree.fill_missing()
    inodes = max(2 * len(tree.meta), 65536)  # mkfs's ratio may give a tree of small files too few
    _run(["mkfs.ext4", "-q", "-F", "-L", label, "-N", str(inodes), "-E", "root_owner=0:0", "-d", str(tree.root),
          str(target), f"{size_mib}M"], "mkfs.ext4")
    script = target.with_name(target.name + ".debugfs")
    values = target.with_name(target.name + ".xattrs")
    text, files = debugfs_script(tree.meta, values)
    script.write_text(text)
    try:
        if files:
            values.mkdir(mode=0o700)
            for path, value in files.items():
                path.write_bytes(value)
        out = _run(["debugfs", "-w", "-f", str(script), str(target)], "debugfs")
    finally:
        script.unlink()
        shutil.rmtree(values, ignore_errors=True)
    errors = [ln for ln in out.splitlines() if ln and not ln.startswith("debugfs")]
    if errors:
        raise ImageError(f"setting ownership in {target} failed: {'; '.join(errors[:5])}")


def _run(argv: list[str], what: str) -> str:
    exe = find_tool(argv[0])
    if exe is None:
        raise ImageError(f"{what} is not installed; install e2fsprogs (apt-get install e2fsprogs)")
    try:
        proc = subprocess.run([exe, *argv[1:]], capture_output=True, text=True, errors="replace", check=False)
    except FileNotFoundError:
        raise ImageError(f"{what} is not installed; install e2fsprogs (apt-get install e2fsprogs)") from None
    if proc.returncode != 0:
        raise ImageError(f"{what} failed (exit {proc.returncode}): {' '.join(argv)}\n{proc.stderr[-2000:]}")
    return proc.stdout + proc.stderr
