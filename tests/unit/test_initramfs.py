"""Unit tests of pytest_smolvm.images.initramfs: the newc writer and the boot layer's contents."""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from pytest_smolvm.images.initramfs import APPLETS, build_initramfs, newc_archive
from pytest_smolvm.images.recipe import BOOT_MODULES, NET_MODULES, STAGE2_INIT, stage1_init

FIELDS = ("ino", "mode", "uid", "gid", "nlink", "mtime", "filesize", "devmajor", "devminor",
          "rdevmajor", "rdevminor", "namesize", "check")


def parse_newc(archive: bytes) -> list[dict[str, object]]:
    """A strict, independent newc reader: returns the entries up to and including the trailer."""
    entries: list[dict[str, object]] = []
    pos = 0
    while True:
        assert pos % 4 == 0, f"entry at unaligned offset {pos}"
        assert archive[pos:pos + 6] == b"070701", f"bad magic at {pos}: {archive[pos:pos + 6]!r}"
        raw = archive[pos + 6:pos + 110]
        assert len(raw) == 104
        hdr = {name: int(raw[i * 8:(i + 1) * 8], 16) for i, name in enumerate(FIELDS)}
        name_start = pos + 110
        name_end = name_start + hdr["namesize"]
        name_bytes = archive[name_start:name_end]
        assert name_bytes.endswith(b"\0"), "name not NUL-terminated"
        assert b"\0" not in name_bytes[:-1]
        data_start = (name_end + 3) & ~3
        assert archive[name_end:data_start] == b"\0" * (data_start - name_end), "name padding"
        data_end = data_start + hdr["filesize"]
        data = archive[data_start:data_end]
        assert len(data) == hdr["filesize"], "truncated data"
        next_pos = (data_end + 3) & ~3
        assert archive[data_end:next_pos] == b"\0" * (next_pos - data_end), "data padding"
        entry = {"name": name_bytes[:-1].decode(), "data": data, **hdr}
        entries.append(entry)
        pos = next_pos
        if entry["name"] == "TRAILER!!!":
            break
    assert pos == len(archive), "bytes after the trailer"
    return entries


SAMPLE = [
    ("dir", stat.S_IFDIR | 0o755, b""),
    ("dir/file.txt", stat.S_IFREG | 0o644, b"hello world\n"),
    ("dir/x", stat.S_IFREG | 0o755, b"1"),            # data needing 3 bytes of padding
    ("dir/ab", stat.S_IFREG | 0o600, b"1234"),        # data already aligned
    ("link", stat.S_IFLNK | 0o777, b"dir/file.txt"),
    ("empty", stat.S_IFREG | 0o644, b""),
    ("ünï/日本", stat.S_IFREG | 0o644, bytes(range(256)) * 3 + b"\x00\x01"),
]


def test_newc_round_trip() -> None:
    archive = newc_archive(SAMPLE)
    assert len(archive) % 4 == 0
    entries = parse_newc(archive)
    assert entries[-1]["name"] == "TRAILER!!!"
    assert entries[-1]["filesize"] == 0
    body = entries[:-1]
    assert [(e["name"], e["mode"], e["data"]) for e in body] == SAMPLE
    for e in body:
        assert e["filesize"] == len(e["data"])  # type: ignore[arg-type]
        assert e["uid"] == e["gid"] == 0
    inos = [e["ino"] for e in body]
    assert len(set(inos)) == len(inos), "inode numbers must be unique (else cpio makes hard links)"
    assert 0 not in inos


@pytest.mark.parametrize("name_len", range(1, 9))
def test_newc_alignment_for_every_name_length(name_len: int) -> None:
    for data_len in range(0, 6):
        archive = newc_archive([("n" * name_len, stat.S_IFREG | 0o644, b"d" * data_len)])
        (entry, trailer) = parse_newc(archive)
        assert entry["name"] == "n" * name_len
        assert entry["data"] == b"d" * data_len
        assert trailer["name"] == "TRAILER!!!"


def test_newc_empty_archive_is_just_trailer() -> None:
    entries = parse_newc(newc_archive([]))
    assert [e["name"] for e in entries] == ["TRAILER!!!"]


def test_newc_accepts_generator() -> None:
    gen = ((f"f{i}", stat.S_IFREG | 0o644, str(i).encode()) for i in range(3))
    names = [e["name"] for e in parse_newc(newc_archive(gen))]
    assert names == ["f0", "f1", "f2", "TRAILER!!!"]


@pytest.mark.skipif(shutil.which("cpio") is None, reason="cpio binary not installed")
def test_gnu_cpio_lists_same_names(tmp_path: Path) -> None:
    archive = tmp_path / "a.cpio"
    archive.write_bytes(newc_archive(SAMPLE))
    res = subprocess.run(["cpio", "-t", "--quiet", "-F", str(archive)], capture_output=True, timeout=30)
    assert res.returncode == 0, res.stderr
    listed = res.stdout.decode().splitlines()
    assert listed == [name for name, _, _ in SAMPLE]


@pytest.mark.skipif(shutil.which("cpio") is None, reason="cpio binary not installed")
def test_gnu_cpio_extracts_same_content(tmp_path: Path) -> None:
    archive = tmp_path / "a.cpio"
    archive.write_bytes(newc_archive(SAMPLE))
    out = tmp_path / "out"
    out.mkdir()
    res = subprocess.run(["cpio", "-i", "-d", "--quiet", "-F", str(archive)], cwd=out,
                         capture_output=True, timeout=30)
    assert res.returncode == 0, res.stderr
    for name, mode, data in SAMPLE:
        p = out / name
        st = p.lstat()
        assert stat.S_IFMT(st.st_mode) == stat.S_IFMT(mode), name
        if stat.S_ISREG(mode):
            assert p.read_bytes() == data
            assert stat.S_IMODE(st.st_mode) == stat.S_IMODE(mode)
        elif stat.S_ISLNK(mode):
            assert str(p.readlink()) == data.decode()


# ---------------------------------------------------------------- build_initramfs


def fake_base(tmp_path: Path) -> Path:
    base = tmp_path / "base"
    (base / "modules").mkdir(parents=True)
    (base / "busybox").write_bytes(b"\x7fELF fake busybox")
    for mod in BOOT_MODULES + NET_MODULES:
        (base / "modules" / f"{mod}.ko").write_bytes(f"module {mod}".encode())
    return base


def fake_agent(tmp_path: Path) -> Path:
    agent = tmp_path / "agent"
    agent.mkdir()
    (agent / "smolvm-agent").write_bytes(b"\x7fELF fake agent")
    return agent / "smolvm-agent"


def test_build_initramfs_contents(tmp_path: Path) -> None:
    base = fake_base(tmp_path)
    target = tmp_path / "boot.cpio"
    build_initramfs(base, target, fake_agent(tmp_path))
    entries = {e["name"]: e for e in parse_newc(target.read_bytes())}
    assert entries["init"]["data"] == stage1_init()
    assert stat.S_IMODE(entries["init"]["mode"]) & 0o111  # type: ignore[operator]
    assert entries["bin/busybox"]["data"] == b"\x7fELF fake busybox"
    for applet in APPLETS:
        e = entries[f"bin/{applet}"]
        assert stat.S_ISLNK(e["mode"])  # type: ignore[arg-type]
        assert e["data"] == b"busybox"
    for mod in BOOT_MODULES + NET_MODULES:
        assert entries[f"lib/modules/{mod}.ko"]["data"] == f"module {mod}".encode()
    assert entries["smolvm/smolvm-agent"]["data"] == b"\x7fELF fake agent"
    assert stat.S_IMODE(entries["smolvm/smolvm-agent"]["mode"]) == 0o755  # type: ignore[arg-type]
    assert entries["smolvm/init.sh"]["data"] == STAGE2_INIT.encode()
    assert b"/run/smolvm/smolvm-agent" in STAGE2_INIT.encode() and b"python" not in STAGE2_INIT.encode()
    assert not [n for n in entries if n.endswith((".py", ".pyc"))]
    # Parents come before children, as the kernel's unpacker needs.
    names = list(entries)
    for n in names:
        if "/" in n and n != "TRAILER!!!":
            assert n.rsplit("/", 1)[0] in names[:names.index(n)], n
    # Written atomically: no temporary file left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agent", "base", "boot.cpio"]


def test_build_initramfs_missing_module_fails_without_target(tmp_path: Path) -> None:
    base = fake_base(tmp_path)
    (base / "modules" / f"{NET_MODULES[-1]}.ko").unlink()
    target = tmp_path / "boot.cpio"
    with pytest.raises(FileNotFoundError):
        build_initramfs(base, target, fake_agent(tmp_path))
    assert not target.exists()

