"""Directory transfer without a VM (pytest_smolvm/transfer.py): the host's tar of a tree
(modes, symlinks as links, nothing followed, refusals, the size limit) and the extraction of
a hostile guest's tar ('..', symlink escapes, devices, setuid, the atomic rename). The real
round trips through a guest are tests/integration/test_transfer.py."""

from __future__ import annotations

import errno
import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from pytest_smolvm import ConfigError, GuestFileError, SmolVM, VMConfig, transfer
from pytest_smolvm.guest.replies import ExecReply


def members(data: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        return {m.name: m for m in t.getmembers()}


def hostile(*entries: tuple[str, bytes, dict[str, object]]) -> bytes:
    """A tar as a guest could send it: (name, tar type, extras: data, to, mode)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, kind, extra in entries:
            info = tarfile.TarInfo(name)
            if "\0" in name:  # a ustar name field ends at a NUL: only a pax record can carry one
                info.name, info.pax_headers = "placeholder", {"path": name}
            info.type = kind
            info.mode = int(extra.get("mode", 0o755 if kind == tarfile.DIRTYPE else 0o644))  # type: ignore[call-overload]
            info.linkname = str(extra.get("to", ""))
            data = bytes(extra.get("data", b""))  # type: ignore[call-overload]
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "sub" / "deep").mkdir(parents=True)
    (src / "empty").mkdir()
    (src / "sub" / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (src / "sub" / "run.sh").chmod(0o751)
    (src / "sub" / "deep" / "f").write_bytes(b"data")
    (src / ".wh.keep").write_bytes(b"")  # a layer whiteout's name means nothing here
    (src / "out").symlink_to("/etc/passwd")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("not to be copied")
    (src / "dirlink").symlink_to(outside)
    (src / "sub" / "deep").chmod(0o555)
    src.chmod(0o750)
    return src


def test_pack_keeps_modes_and_links_and_follows_nothing(tree: Path) -> None:
    packed = transfer.pack(tree, 1 << 30)
    got = members(packed.data)
    assert sorted(got) == [".wh.keep", "dirlink", "empty", "out", "sub", "sub/deep", "sub/deep/f", "sub/run.sh"]
    assert got["sub/run.sh"].mode == 0o751 and got["sub/deep"].mode == 0o555 and got["empty"].isdir()
    assert got["out"].issym() and got["out"].linkname == "/etc/passwd"
    assert got["dirlink"].issym()  # a link to a directory outside: the link, never its contents
    assert not any("secret" in name for name in got)
    assert all(m.uid == 0 and m.gid == 0 and m.uname == "" for m in got.values())
    assert (packed.files, packed.dirs, packed.symlinks, packed.root_mode) == (3, 3, 2, 0o750)


def test_pack_follows_only_the_top_a_caller_named(tree: Path, tmp_path: Path) -> None:
    top = tmp_path / "toplink"
    top.symlink_to(tree)
    assert "sub/run.sh" in members(transfer.pack(top, 1 << 30).data)


@pytest.mark.parametrize("case", ["missing", "file", "fifo", "limit"])
def test_pack_refuses_with_the_value_named(tree: Path, tmp_path: Path, case: str) -> None:
    src, limit, match = tree, 1 << 30, ""
    if case == "missing":
        src, match = tmp_path / "nope", "nope.*does not exist"
    elif case == "file":
        src, match = tree / "sub" / "run.sh", "run.sh.*not a directory"
    elif case == "fifo":
        os.mkfifo(tree / "pipe")
        match = "'pipe' is not a regular file.*FIFO"
    else:
        (tree / "big").write_bytes(b"x" * 200_000)
        limit, match = 100_000, "over the 100000-byte limit.*'big'"
    with pytest.raises(ConfigError, match=match):
        transfer.pack(src, limit)


def test_round_trip_through_unpack(tree: Path, tmp_path: Path) -> None:
    back = tmp_path / "back"
    assert transfer.unpack(transfer.pack(tree, 1 << 30).data, back, "test") == []
    assert (back / "sub" / "run.sh").read_text() == "#!/bin/sh\necho hi\n"
    assert stat.S_IMODE((back / "sub" / "run.sh").stat().st_mode) == 0o751
    assert stat.S_IMODE((back / "sub" / "deep").stat().st_mode) == 0o555
    assert (back / "empty").is_dir() and not list((back / "empty").iterdir())
    assert os.readlink(back / "out") == "/etc/passwd" and os.readlink(back / "dirlink") == str(tmp_path / "outside")
    assert (back / ".wh.keep").exists()
    assert leftovers(tmp_path) == ["back", "outside", "src"]


def test_a_symlink_in_the_guest_tree_is_never_written_through(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("untouched")
    data = hostile(("esc", tarfile.SYMTYPE, {"to": str(outside)}),
                   ("esc/victim", tarfile.REGTYPE, {"data": b"overwritten"}),
                   ("last", tarfile.SYMTYPE, {"to": str(outside / "victim")}),
                   ("last", tarfile.REGTYPE, {"data": b"replaces the link"}),
                   ("up", tarfile.SYMTYPE, {"to": "../../.."}),
                   ("up/planted", tarfile.REGTYPE, {"data": b"clamped"}),
                   ("/abs/file", tarfile.REGTYPE, {"data": b"inside"}))
    back = tmp_path / "back"
    transfer.unpack(data, back, "test")
    assert (outside / "victim").read_text() == "untouched" and leftovers(outside) == ["victim"]
    assert (back / "last").read_text() == "replaces the link" and not (back / "last").is_symlink()
    assert (back / "planted").read_text() == "clamped"  # '..' through a link stops at the root
    assert (back / "abs" / "file").read_text() == "inside"
    assert leftovers(tmp_path) == ["back", "outside"]


@pytest.mark.parametrize("name", ["../escaped", "a/../../escaped", "nul\0byte"])
def test_a_refused_tar_leaves_nothing(tmp_path: Path, name: str) -> None:
    data = hostile(("ok", tarfile.REGTYPE, {"data": b"x"}), (name, tarfile.REGTYPE, {"data": b"x"}))
    with pytest.raises(GuestFileError, match="refused") as info:
        transfer.unpack(data, tmp_path / "back", "vm1: get_dir('/src')")
    assert info.value.errno == errno.EPROTO and "get_dir('/src')" in str(info.value)
    assert leftovers(tmp_path) == []


def test_a_truncated_tar_leaves_nothing(tmp_path: Path) -> None:
    data = hostile(("dir", tarfile.DIRTYPE, {"mode": 0o500}), ("dir/f", tarfile.REGTYPE, {"data": b"y" * 5000}))
    with pytest.raises(GuestFileError, match="ends inside"):
        transfer.unpack(data[:1536], tmp_path / "back", "test")
    assert leftovers(tmp_path) == []


def test_devices_and_fifos_are_skipped_with_a_warning_and_setuid_dropped(tmp_path: Path) -> None:
    entries = [("dev", tarfile.CHRTYPE, {}), ("pipe", tarfile.FIFOTYPE, {}),
               ("suid", tarfile.REGTYPE, {"data": b"#!", "mode": 0o4755}),
               ("tmp", tarfile.DIRTYPE, {"mode": 0o1777}), ("hard", tarfile.LNKTYPE, {"to": "suid"})]
    back = tmp_path / "back"
    with pytest.warns(transfer.TransferWarning, match="skipped 2 entries.*'dev', 'pipe'"):
        transfer.unpack(hostile(*entries), back, "test")
    assert leftovers(back) == ["hard", "suid", "tmp"]
    assert stat.S_IMODE((back / "suid").stat().st_mode) == 0o755
    assert stat.S_IMODE((back / "tmp").stat().st_mode) == 0o777
    assert (back / "hard").stat().st_ino == (back / "suid").stat().st_ino


def test_a_hard_link_only_joins_paths_in_the_tree(tmp_path: Path) -> None:
    data = hostile(("badhard", tarfile.LNKTYPE, {"to": "/etc/passwd"}))
    with pytest.raises(GuestFileError, match="does not exist"):
        transfer.unpack(data, tmp_path / "back", "test")
    assert leftovers(tmp_path) == []


def test_local_must_be_new_or_an_empty_directory(tmp_path: Path) -> None:
    data = hostile(("f", tarfile.REGTYPE, {"data": b"x"}))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert transfer.check_local(empty, "get_dir") == empty
    transfer.unpack(data, empty, "test")
    assert (empty / "f").read_bytes() == b"x"
    (tmp_path / "link").symlink_to(tmp_path / "other")
    (tmp_path / "other").mkdir()
    for bad, match in ((empty, "already exists"), (tmp_path / "link", "already exists"),
                       (tmp_path / "no" / "such", "parent .* does not exist"), (42, "expected a pathlib.Path")):
        with pytest.raises(ConfigError, match=match):
            transfer.check_local(bad, "get_dir('/x')")


def test_a_local_filled_meanwhile_is_left_alone(tmp_path: Path) -> None:
    local = tmp_path / "local"
    local.mkdir()
    (local / "theirs").write_text("mine")
    data = hostile(("ro", tarfile.DIRTYPE, {"mode": 0o500}), ("ro/f", tarfile.REGTYPE, {"data": b"x"}))
    with pytest.raises(ConfigError, match="cannot create"):
        transfer.unpack(data, local, "test")
    assert leftovers(tmp_path) == ["local"] and leftovers(local) == ["theirs"]


@pytest.mark.parametrize(("code", "stderr", "expected"), [
    (2, b"/src: No such file or directory", errno.ENOENT),
    (20, b"/src: Not a directory", errno.ENOTDIR),
    (1, b"mkdir: can't create directory '/proc/x': Permission denied", errno.EACCES),
    (1, b"tar: can't open 'a': Read-only file system", errno.EROFS),
    (1, b"", errno.EIO),
])
def test_guest_failures_carry_the_guest_message_and_an_errno(code: int, stderr: bytes, expected: int) -> None:
    reply = ExecReply(code, False, b"", stderr, False, False)
    err = transfer.guest_failure(reply, "vm1: get_dir('/src')", "/src")
    assert err.errno == expected and err.filename == "/src"
    assert (stderr.decode() or f"exit status {code}") in str(err)


def test_vm_checks_arguments_before_touching_a_guest(tmp_path: Path) -> None:
    vm = SmolVM(VMConfig())  # never started: each check must fire before any guest call
    (tmp_path / "d").mkdir()
    with pytest.raises(ConfigError, match=r"nope.*does not exist"):
        vm.put(tmp_path / "nope", "/x")
    with pytest.raises(ConfigError, match="mode= is for a file"):
        vm.put(tmp_path / "d", "/x", mode=0o755)
    with pytest.raises(ConfigError, match=r"'rel/dest'.*absolute"):
        vm.put(tmp_path / "d", "rel/dest")
    with pytest.raises(ConfigError, match=r"'src'.*absolute"):
        vm.get_dir("src", tmp_path / "back")
    with pytest.raises(ConfigError, match="max_size=0"):
        vm.get_dir("/src", tmp_path / "back", max_size=0)
    (tmp_path / "d" / "f").write_text("x")
    with pytest.raises(ConfigError, match="d' already exists"):
        vm.get_dir("/src", tmp_path / "d")
    assert leftovers(tmp_path) == ["d"]
