"""A bounded reader of tar streams (image layers), which are untrusted input.

Python's :mod:`tarfile` reads a pax or GNU long-name header's whole body into memory at the
size the header claims, so a crafted layer can make it allocate gigabytes. This reader holds
every metadata body to :data:`MAX_META` bytes, every name to :data:`MAX_NAME`, counts the
bytes it reads against a budget shared by all layers of an import, and never seeks: it takes
a decompressed stream (:func:`open_layer` sniffs gzip, zstd or plain tar).
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import subprocess
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from ..errors import ImageError

BLOCK = 512
MAX_META = 1 << 20  # a pax or GNU long-name body
XATTR_PREFIX = "SCHILY.xattr."
#: Extended attributes an entry may carry, and a value's size (ext4 keeps them in one block).
MAX_XATTRS = 32
MAX_XATTR_VALUE = 4096
MAX_NAME = 4096
MAX_LINK = 4096
MAX_MTIME = (1 << 31) - 1 + (3 << 32)  # 2446-05-10, the last second ext4 (and the host fs) can hold

REGULAR, HARDLINK, SYMLINK, CHARDEV, BLOCKDEV, DIRECTORY, FIFO = "0", "1", "2", "3", "4", "5", "6"
_META_TYPES = {"x", "g", "L", "K"}
_KNOWN = {REGULAR, HARDLINK, SYMLINK, CHARDEV, BLOCKDEV, DIRECTORY, FIFO, "7"}


class Readable(Protocol):
    def read(self, n: int, /) -> bytes: ...


class Budget:
    """Bytes and entries an import may still read, shared by all its layers."""

    def __init__(self, max_bytes: int, max_entries: int) -> None:
        self.max_bytes, self.max_entries = max_bytes, max_entries
        self.bytes = 0
        self.entries = 0

    def take(self, n: int, where: str) -> None:
        self.bytes += n
        if self.bytes > self.max_bytes:
            raise ImageError(f"{where}: the image is larger than the import limit of "
                             f"{self.max_bytes >> 20} MiB uncompressed (a size bomb, or raise max_mib)")

    def entry(self, where: str) -> None:
        self.entries += 1
        if self.entries > self.max_entries:
            raise ImageError(f"{where}: the image has more than {self.max_entries} entries (the import limit)")


class Counted:
    """A decompressed stream that charges every byte to a :class:`Budget` and hashes it
    (the hash is the layer's ``diff_id``)."""

    def __init__(self, raw: Readable, budget: Budget, where: str) -> None:
        self.raw, self.budget, self.where = raw, budget, where
        self.sha = hashlib.sha256()

    def read(self, n: int) -> bytes:
        data = self.raw.read(n)
        self.budget.take(len(data), self.where)
        self.sha.update(data)
        return data

    def chunks(self, n: int, short: str | None = None) -> Iterator[bytes]:
        """Exactly ``n`` bytes, in chunks of at most 1 MiB; ImageError(``short``) if the
        stream ends first."""
        left = n
        while left:
            chunk = self.read(min(left, 1 << 20))
            if not chunk:
                raise ImageError(short or f"{self.where}: the tar stream ends in the middle of an entry")
            yield chunk
            left -= len(chunk)

    def exact(self, n: int) -> bytes:
        return b"".join(self.chunks(n))

    def drain(self) -> None:
        """Read to the end (trailing padding counts in the diff_id)."""
        while self.read(1 << 20):
            pass

    def diff_id(self) -> str:
        return "sha256:" + self.sha.hexdigest()


class _Gunzip:
    """Streaming gzip (concatenated members included) behind ``read(n)``."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.z = zlib.decompressobj(wbits=31)
        self.pending = b""
        self.eof = False

    def read(self, n: int) -> bytes:
        while len(self.pending) < n and not self.eof:
            chunk = self.z.unconsumed_tail or self.raw.read(1 << 16)
            if not chunk and not self.z.unused_data:
                self.eof = True
                break
            try:
                if self.z.eof:  # the next gzip member, if any
                    rest = self.z.unused_data + chunk
                    self.z = zlib.decompressobj(wbits=31)
                    chunk = rest
                self.pending += self.z.decompress(chunk, max(n, 1 << 16))
            except zlib.error as exc:
                raise ImageError(f"corrupt gzip data in a layer: {exc}") from exc
        out, self.pending = self.pending[:n], self.pending[n:]
        return out


@contextmanager
def open_layer(raw: BinaryIO, where: str) -> Iterator[Readable]:
    """The tar stream of a layer blob, decompressed by its magic (not by its media type):
    gzip, zstd (through the ``zstd`` tool: Python 3.11 has no zstd) or plain tar."""
    head = raw.read(4)
    rest = _Prefixed(head, raw)
    if head[:2] == b"\x1f\x8b":
        yield _Gunzip(rest)  # type: ignore[arg-type]
    elif head == b"\x28\xb5\x2f\xfd":
        unzstd = _Unzstd(rest, where)
        try:
            yield unzstd
        finally:
            unzstd.close()
    else:
        yield rest


class _Unzstd:
    """``zstd -dc`` fed by a thread; read from its output. Its memory is bounded by zstd's own
    window limit (128 MiB unless --long), its output by the import's budget."""

    def __init__(self, raw: Readable, where: str) -> None:
        exe = shutil.which("zstd")
        if exe is None:
            raise ImageError(f"{where}: the layer is zstd-compressed and zstd is not installed "
                             f"(apt-get install zstd), or convert it: skopeo copy --dest-compress-format gzip")
        self.where = where
        self.proc = subprocess.Popen([exe, "-dcq"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        self.feeder = threading.Thread(target=self._feed, args=(raw,), daemon=True)
        self.feeder.start()

    def _feed(self, raw: Readable) -> None:
        stdin = self.proc.stdin
        assert stdin is not None
        try:
            while chunk := raw.read(1 << 16):
                stdin.write(chunk)
        except (OSError, ValueError):  # zstd stopped reading (closed, or killed by close())
            pass
        finally:
            with contextlib.suppress(OSError):
                stdin.close()

    def read(self, n: int) -> bytes:
        assert self.proc.stdout is not None
        data = self.proc.stdout.read(n)
        if not data and self.proc.wait() != 0:
            err = self.proc.stderr.read(500).decode(errors="replace") if self.proc.stderr else ""
            raise ImageError(f"{self.where}: corrupt zstd data: {err.strip()}")
        return data

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.feeder.join(timeout=10)
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()


class _Prefixed:
    def __init__(self, head: bytes, raw: BinaryIO) -> None:
        self.head, self.raw = head, raw

    def read(self, n: int) -> bytes:
        if self.head:
            out, self.head = self.head[:n], self.head[n:]
            return out + (self.raw.read(n - len(out)) if len(out) < n else b"")
        return self.raw.read(n)


@dataclass(frozen=True)
class Member:
    """One tar entry; ``name`` and ``linkname`` are as the archive spells them (unchecked)."""

    name: str
    type: str
    size: int
    mode: int
    uid: int
    gid: int
    mtime: int
    linkname: str
    #: Extended attributes (pax ``SCHILY.xattr.NAME``), raw values, as the archive gives them.
    xattrs: tuple[tuple[str, bytes], ...] = ()


def _number(field: bytes, what: str) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256
        if field[0] == 0xFF:
            raise ImageError(f"negative {what} in a tar header")
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = field.split(b"\0", 1)[0].strip(b" ")
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise ImageError(f"bad {what} {field!r} in a tar header") from None


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _checksum_ok(block: bytes) -> bool:
    try:
        stored = _number(block[148:156], "checksum")
    except ImageError:
        return False
    blanked = block[:148] + b" " * 8 + block[156:]
    return stored in (sum(blanked), sum(b - 256 if b > 127 else b for b in blanked))


def _pax(body: bytes, where: str) -> dict[str, str]:
    out: dict[str, str] = {}
    pos = 0
    while pos < len(body):
        sp = body.find(b" ", pos)
        try:
            length = int(body[pos:sp])
        except ValueError:
            raise ImageError(f"{where}: malformed pax header") from None
        if sp < 0 or length <= sp - pos or pos + length > len(body):
            raise ImageError(f"{where}: malformed pax header")
        key, _, value = body[sp + 1:pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def members(stream: Counted, where: str) -> Iterator[tuple[Member, Counted]]:
    """Yield each entry with the stream positioned at its data; whatever data the caller
    does not read is skipped before the next entry."""
    pending: dict[str, str] = {}
    seen = 0
    while True:
        block = stream.read(BLOCK)
        if len(block) < BLOCK or block == b"\0" * BLOCK:
            return  # end of archive (or a stream that just stops after the last entry)
        if not _checksum_ok(block):
            if not seen:
                raise ImageError(f"{where}: not a tar archive (its first header is not a tar header)")
            raise ImageError(f"{where}: bad tar header checksum after {seen} entries")
        typ = chr(block[156]) if block[156] else REGULAR
        size = _number(block[124:136], "size")
        if typ in _META_TYPES:
            _read_meta(stream, typ, size, pending, where)
            continue
        member = _member(block, typ, size, pending, where)
        pending = {}
        seen += 1
        stream.budget.entry(where)
        before = stream.budget.bytes
        yield member, stream
        read = stream.budget.bytes - before
        data_len = member.size if typ in (REGULAR, "7") else 0
        if read > data_len:
            raise ImageError(f"{where}: read past the data of {member.name!r}")
        if data_len > read:
            stream.exact(data_len - read)
        # Padding after the last entry may be missing (umoci 0.4's `insert` leaves it out,
        # and Go's reader takes that): a stream that ends here is simply over.
        pad = -data_len % BLOCK
        if pad and len(stream.read(pad)) < pad:
            return


def _read_meta(stream: Counted, typ: str, size: int, pending: dict[str, str], where: str) -> None:
    if size > MAX_META:
        raise ImageError(f"{where}: a tar metadata entry of {size} bytes (limit {MAX_META})")
    body = stream.exact(size + (-size % BLOCK))[:size]
    if typ == "x":
        pending.update(_pax(body, where))
    elif typ == "L":
        pending["path"] = body.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
    elif typ == "K":
        pending["linkpath"] = body.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
    # "g" (global pax) is read and ignored: nothing in it changes how a layer applies


def _member(block: bytes, typ: str, size: int, pax: dict[str, str], where: str) -> Member:
    name = _text(block[0:100])
    if block[257:262] == b"ustar" and block[345:500].strip(b"\0"):
        name = _text(block[345:500]) + "/" + name
    name = pax.get("path", name)
    linkname = pax.get("linkpath", _text(block[157:257]))
    if typ not in _KNOWN:
        raise ImageError(f"{where}: entry {name[:200]!r} has unsupported tar type {typ!r}")
    if len(name) > MAX_NAME or len(linkname) > MAX_LINK:
        raise ImageError(f"{where}: entry {name[:200]!r} has a name or link over {MAX_NAME} bytes")
    try:
        if "size" in pax:
            size = int(pax["size"])
        uid = int(pax["uid"]) if "uid" in pax else _number(block[108:116], "uid")
        gid = int(pax["gid"]) if "gid" in pax else _number(block[116:124], "gid")
        mtime = int(float(pax["mtime"])) if "mtime" in pax else _number(block[136:148], "mtime")
    except (ValueError, OverflowError):  # "nan", "inf", garbage
        raise ImageError(f"{where}: entry {name[:200]!r} has a malformed pax number") from None
    if size < 0 or not (0 <= uid < 1 << 32 and 0 <= gid < 1 << 32):
        raise ImageError(f"{where}: entry {name[:200]!r} has an out-of-range size, uid or gid")
    mtime = min(max(mtime, 0), MAX_MTIME)  # what ext4 can hold; a bad date is no reason to refuse
    mode = _number(block[100:108], "mode") & 0o7777
    return Member(name, typ, size, mode, uid, gid, mtime, linkname, _xattrs(pax, name, where))


def _xattrs(pax: dict[str, str], name: str, where: str) -> tuple[tuple[str, bytes], ...]:
    """An entry's ``SCHILY.xattr.*`` records (values back to their raw bytes), bounded."""
    found = tuple((key[len(XATTR_PREFIX):], value.encode("utf-8", "surrogateescape"))
                  for key, value in pax.items() if key.startswith(XATTR_PREFIX))
    if len(found) > MAX_XATTRS or any(len(v) > MAX_XATTR_VALUE for _, v in found):
        raise ImageError(f"{where}: entry {name[:200]!r} has over {MAX_XATTRS} extended attributes or one "
                         f"over {MAX_XATTR_VALUE} bytes (refused)")
    return found
