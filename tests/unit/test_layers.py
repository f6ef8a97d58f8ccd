"""The layer applier and its tar reader (images/layers.py, images/tarstream.py): whiteouts,
opaque directories, symlink and '..' escapes, hard links, size and entry bombs, and the
ownership written into the ext4 image without root."""

from __future__ import annotations

import gzip
import io
import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from pytest_smolvm import ImageError
from pytest_smolvm.images import layers
from pytest_smolvm.images import tarstream as ts

Entry = tuple[str, str, dict[str, object]]


def tar(entries: list[Entry], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    """A layer: (name, kind, extras) with kind f(ile) d(ir) l(symlink) h(ardlink) c(hardev) p(fifo)."""
    buf = io.BytesIO()
    kinds = {"d": tarfile.DIRTYPE, "l": tarfile.SYMTYPE, "h": tarfile.LNKTYPE, "c": tarfile.CHRTYPE,
             "p": tarfile.FIFOTYPE}
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
        for name, kind, extra in entries:
            info = tarfile.TarInfo(name)
            data = b""
            if kind == "f":
                data = bytes(extra.get("data", b"x"))  # type: ignore[call-overload]
                info.size = len(data)
            else:
                info.type = kinds[kind]
                info.linkname = str(extra.get("to", ""))
            info.uid, info.gid = int(extra.get("uid", 0)), int(extra.get("gid", 0))  # type: ignore[call-overload]
            info.mode = int(extra.get("mode", 0o755 if kind == "d" else 0o644))  # type: ignore[call-overload]
            info.mtime = 1_700_000_000
            info.pax_headers = dict(extra.get("pax", {}))  # type: ignore[call-overload]
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def apply(tree: layers.Tree, *blobs: bytes, budget: ts.Budget | None = None) -> list[str]:
    budget = budget or ts.Budget(1 << 30, 10_000)
    ids = []
    for i, blob in enumerate(blobs):
        with ts.open_layer(io.BytesIO(blob), f"layer {i}") as layer:
            stream = ts.Counted(layer, budget, f"layer {i}")
            tree.apply(stream, f"layer {i}")
            ids.append(stream.diff_id())
    return ids


@pytest.fixture
def tree(tmp_path: Path) -> layers.Tree:
    root = tmp_path / "root"
    root.mkdir()
    return layers.Tree(root)


def files(tree: layers.Tree) -> set[str]:
    out = set()
    for dirpath, dirnames, filenames in os.walk(tree.root):
        for n in dirnames + filenames:
            out.add(os.path.relpath(os.path.join(dirpath, n), tree.root))
    return out


def test_layers_apply_in_order_with_whiteouts_and_opaque_directories(tree: layers.Tree) -> None:
    lower = tar([("etc/", "d", {}), ("etc/passwd", "f", {"data": b"old"}), ("etc/gone", "f", {}),
                 ("opt/", "d", {}), ("opt/a", "f", {}), ("opt/sub/b", "f", {})])
    upper = tar([("etc/passwd", "f", {"data": b"new"}), ("etc/.wh.gone", "f", {}),
                 ("opt/", "d", {}), ("opt/fresh", "f", {}), ("opt/.wh..wh..opq", "f", {})])
    apply(tree, lower, upper)
    assert (tree.root / "etc/passwd").read_bytes() == b"new"
    # the opaque marker hides lower entries only: opt/fresh came before it in the same layer
    assert files(tree) == {"etc", "etc/passwd", "opt", "opt/fresh"}
    assert "opt/sub/b" not in tree.meta and "etc/gone" not in tree.meta


def test_a_whiteout_spares_what_its_own_layer_added(tree: layers.Tree) -> None:
    apply(tree, tar([("a", "f", {}), (".wh.a", "f", {})]))
    assert (tree.root / "a").exists()


def test_whiteout_of_the_directory_itself_is_refused(tree: layers.Tree) -> None:
    with pytest.raises(ImageError, match=r"whiteout '\.wh\.\.' .* names no entry"):
        apply(tree, tar([("etc/.wh..", "f", {})]))


@pytest.mark.parametrize("name", ["../evil", "a/../../evil", "/../evil", "ok/../../../../etc/x"])
def test_dotdot_in_a_name_is_refused(tree: layers.Tree, name: str) -> None:
    with pytest.raises(ImageError, match=r"climbs out with '\.\.' \(refused\)"):
        apply(tree, tar([(name, "f", {})]))
    assert not (tree.root.parent / "evil").exists()


@pytest.mark.parametrize("target", ["/etc", "../../../../etc", "/", ".."])
def test_writes_through_a_symlinked_directory_stay_inside_the_root(tree: layers.Tree, target: str,
                                                                      tmp_path: Path) -> None:
    outside = tmp_path / "etc"
    outside.mkdir()
    apply(tree, tar([("link", "l", {"to": target}), ("link/planted", "f", {"data": b"p"})]))
    assert not (outside / "planted").exists() and not (tmp_path / "planted").exists()
    found = [p for p in tree.root.rglob("planted")]
    assert len(found) == 1 and found[0].read_bytes() == b"p"


def test_an_existing_symlink_is_replaced_never_written_through(tree: layers.Tree, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("host file")
    apply(tree, tar([("f", "l", {"to": str(victim)})]), tar([("f", "f", {"data": b"guest"})]))
    assert victim.read_text() == "host file"
    assert (tree.root / "f").read_bytes() == b"guest" and not (tree.root / "f").is_symlink()


def test_symlink_loops_are_refused(tree: layers.Tree) -> None:
    with pytest.raises(ImageError, match="too many symlinks"):
        apply(tree, tar([("a", "l", {"to": "b"}), ("b", "l", {"to": "a"}), ("a/x", "f", {})]))


def test_hard_links_join_paths_inside_the_root_only(tree: layers.Tree, tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("host")
    apply(tree, tar([("bin/su", "f", {"mode": 0o4755, "data": b"su"}), ("bin/su2", "h", {"to": "bin/su"})]))
    assert os.stat(tree.root / "bin/su").st_ino == os.stat(tree.root / "bin/su2").st_ino
    assert tree.meta["bin/su2"] == layers.Meta(stat.S_IFREG | 0o4755)
    for bad in ("../secret", str(tmp_path / "secret")):
        with pytest.raises(ImageError):
            apply(tree, tar([("x", "h", {"to": bad})]))
    # an absolute link name is taken inside the root, where there is no such file
    assert not any(p.read_bytes() == b"host" for p in tree.root.rglob("*") if p.is_file())


def test_hard_link_through_a_symlink_to_outside_is_refused(tree: layers.Tree, tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("host")
    with pytest.raises(ImageError, match="does not exist"):
        apply(tree, tar([("up", "l", {"to": str(tmp_path)}), ("x", "h", {"to": "up/secret"})]))


def test_device_nodes_are_skipped_and_fifos_kept(tree: layers.Tree) -> None:
    apply(tree, tar([("dev/sda", "c", {}), ("run/fifo", "p", {"mode": 0o600})]))
    assert not (tree.root / "dev/sda").exists() and tree.skipped_devices == 1
    assert stat.S_ISFIFO(os.lstat(tree.root / "run/fifo").st_mode)


def test_size_bomb_stops_at_the_budget_whatever_the_compression(tree: layers.Tree) -> None:
    bomb = gzip.compress(tar([("zeros", "f", {"data": b"\0" * (4 << 20)})]))
    assert len(bomb) < 10_000
    with pytest.raises(ImageError, match="larger than the import limit of 1 MiB"):
        apply(tree, bomb, budget=ts.Budget(1 << 20, 100))


def test_entry_bomb_stops_at_the_entry_limit(tree: layers.Tree) -> None:
    with pytest.raises(ImageError, match="more than 50 entries"):
        apply(tree, tar([(f"f{i}", "f", {}) for i in range(60)]), budget=ts.Budget(1 << 30, 50))


def test_oversized_pax_header_is_refused_before_it_is_read(tree: layers.Tree) -> None:
    header = tarfile.TarInfo("././@PaxHeader")
    header.type, header.size = tarfile.XHDTYPE, 1 << 30
    blob = header.tobuf(format=tarfile.USTAR_FORMAT)
    with pytest.raises(ImageError, match=r"metadata entry of 1073741824 bytes \(limit 1048576\)"):
        apply(tree, blob)


def test_corrupt_header_and_truncated_data_are_errors(tree: layers.Tree) -> None:
    good = tar([("a", "f", {"data": b"y" * 2000}), ("b", "f", {})])
    bad = bytearray(good)
    bad[0] ^= 0xFF
    with pytest.raises(ImageError, match=r"layer 0: not a tar archive \(its first header"):
        apply(tree, bytes(bad))
    second = good.index(b"b\0")  # the second member's header
    bad = bytearray(good)
    bad[second] ^= 0xFF
    with pytest.raises(ImageError, match="bad tar header checksum after 1 entries"):
        apply(tree, bytes(bad))
    with pytest.raises(ImageError, match="ends"):
        apply(tree, good[:1000])


def test_long_names_and_pax_owners_survive(tree: layers.Tree) -> None:
    name = "deep/" + "d" * 120 + "/file"
    apply(tree, tar([(name, "f", {"uid": 100_000, "gid": 70_000})], fmt=tarfile.GNU_FORMAT))
    assert tree.meta[name] == layers.Meta(stat.S_IFREG | 0o644, 100_000, 70_000)


def test_diff_id_is_the_sha256_of_the_uncompressed_stream(tree: layers.Tree) -> None:
    import hashlib

    raw = tar([("a", "f", {})])
    assert apply(tree, gzip.compress(raw)) == ["sha256:" + hashlib.sha256(raw).hexdigest()]


def test_resolve_follows_symlinks_inside_the_root(tree: layers.Tree) -> None:
    apply(tree, tar([("usr/bin/busybox", "f", {}), ("bin", "l", {"to": "usr/bin"}),
                     ("usr/bin/sh", "l", {"to": "/bin/busybox"}), ("usr/bin/py", "l", {"to": "../../../../x"})]))
    assert tree.resolve("bin/sh") == "usr/bin/busybox"
    assert tree.resolve("usr/bin/py") is None
    assert tree.resolve("nothing") is None


def test_ext4_gets_the_layers_owners_and_modes_without_chown(tree: layers.Tree, tmp_path: Path) -> None:
    apply(tree, tar([("opt/owned", "f", {"uid": 1234, "gid": 2345, "mode": 0o4750}),
                     ('odd "name" here', "f", {"uid": 7}), ("secret/", "d", {"mode": 0o700, "uid": 99})]))
    assert os.stat(tree.root / "opt/owned").st_uid == os.getuid()  # nothing chowned on the host
    (tree.root / "added-later").write_text("ours")  # not from a layer: root's
    image = tmp_path / "fs.ext4"
    layers.write_ext4(tree, image, 64)

    def inode(path: str) -> str:
        return subprocess.run(["debugfs", "-R", f'stat "{path}"', str(image)], capture_output=True,
                              text=True).stdout
    assert "Mode:  04750" in inode("/opt/owned") and "User:  1234   Group:  2345" in inode("/opt/owned")
    assert "User:     7" in inode('/odd ""name"" here')
    assert "Mode:  0700" in inode("/secret") and "User:    99" in inode("/secret")
    assert "User:     0   Group:     0" in inode("/added-later")
    assert "User:     0   Group:     0" in inode("/")


def test_debugfs_script_quotes_paths() -> None:
    script, files = layers.debugfs_script({'a "b"': layers.Meta(stat.S_IFREG | 0o600, 1, 2)}, Path("/v"))
    assert script == 'sif "/a ""b""" mode 0100600\nsif "/a ""b""" uid 1\nsif "/a ""b""" gid 2\n'
    assert files == {}


#: A file capability as setcap writes it (VFS_CAP_REVISION_2, cap_net_raw effective+permitted):
#: not valid UTF-8 once past its first bytes, as real values often are not.
CAP_NET_RAW = bytes([1, 0, 0, 2, 0, 0x20, 0, 0]) + bytes(12)


def xattr(name: str, value: bytes) -> dict[str, str]:
    return {f"SCHILY.xattr.{name}": value.decode("utf-8", "surrogateescape")}


def test_file_capabilities_and_user_xattrs_are_kept_others_skipped(tree: layers.Tree, tmp_path: Path) -> None:
    """security.capability on regular files and user.* on files and directories reach the
    ext4 image (the guest's kernel grants the capability); an SELinux label, trusted.*, a
    capability on a symlink and a user name debugfs could misread are skipped and counted.
    Nothing is set on a host file."""
    apply(tree, tar([
        ("bin/", "d", {"pax": xattr("user.dir", b"d")}),
        ("bin/ping", "f", {"mode": 0o755, "pax": {**xattr("security.capability", CAP_NET_RAW),
                                                   **xattr("user.note", b"hi\xff"),
                                                   **xattr("security.selinux", b"system_u:object_r:bin_t"),
                                                   **xattr("trusted.overlay.opaque", b"y")}}),
        ("bin/link", "l", {"to": "ping", "pax": xattr("security.capability", CAP_NET_RAW)}),
        ("bin/odd", "f", {"pax": xattr("user.a b", b"x")}),
    ]))
    assert tree.meta["bin/ping"].xattrs == (("security.capability", CAP_NET_RAW), ("user.note", b"hi\xff"))
    assert tree.meta["bin"].xattrs == (("user.dir", b"d"),)
    assert tree.meta["bin/link"].xattrs == () and tree.meta["bin/odd"].xattrs == ()
    assert tree.skipped_xattrs == 4
    assert os.listxattr(tree.root / "bin" / "ping") == []
    image = tmp_path / "root.ext4"
    layers.write_ext4(tree, image, 64)
    assert not (tmp_path / "root.ext4.xattrs").exists()

    def ea(path: str, name: str) -> str:
        return subprocess.run(["debugfs", "-R", f'ea_get -x "{path}" {name}', str(image)], capture_output=True,
                              text=True).stdout

    assert "01 00 00 02 00 20 00 00" in ea("/bin/ping", "security.capability")
    assert "68 69 ff" in ea("/bin/ping", "user.note")
    assert "64" in ea("/bin", "user.dir")
    assert "security.selinux" not in subprocess.run(["debugfs", "-R", 'ea_list "/bin/ping"', str(image)],
                                                    capture_output=True, text=True).stdout


def test_too_many_or_too_large_xattrs_are_refused(tree: layers.Tree) -> None:
    many = {k: v for i in range(ts.MAX_XATTRS + 1) for k, v in xattr(f"user.a{i}", b"x").items()}
    with pytest.raises(ImageError, match="extended attributes"):
        apply(tree, tar([("f", "f", {"pax": many})]))
    with pytest.raises(ImageError, match="extended attributes"):
        apply(tree, tar([("g", "f", {"pax": xattr("user.big", b"x" * (ts.MAX_XATTR_VALUE + 1))})]))


def test_line_breaks_in_names_are_refused(tree: layers.Tree) -> None:
    with pytest.raises(ImageError, match="line break"):
        apply(tree, tar([("a\nsif / uid 5", "f", {})]))


def test_deep_nesting_is_refused_before_it_breaks_recursive_walks(tree: layers.Tree) -> None:
    with pytest.raises(ImageError, match=f"nested over {layers.MAX_DEPTH} deep"):
        apply(tree, tar([("d/" * 1000 + "f", "f", {})]))
    deep = "/".join(["x"] * 150)  # a relative symlink adding its depth to its own is caught the same way
    with pytest.raises(ImageError, match="nested over"):
        apply(tree, tar([(f"{deep}/", "d", {}), (f"{deep}/y", "l", {"to": deep}), (f"{deep}/y/f", "f", {})]))


def test_absurd_pax_times_are_refused_or_clamped(tree: layers.Tree) -> None:
    def pax_mtime(value: str) -> bytes:
        info = tarfile.TarInfo("f")
        info.pax_headers = {"mtime": value}
        return info.tobuf(format=tarfile.PAX_FORMAT) + b"\0" * 1024

    with pytest.raises(ImageError, match="malformed pax number"):
        apply(tree, pax_mtime("inf"))
    apply(tree, pax_mtime("1e300"))
    assert os.lstat(tree.root / "f").st_mtime == ts.MAX_MTIME


@pytest.mark.skipif(shutil.which("zstd") is None, reason="zstd is not installed")
def test_zstd_layers_apply_and_a_zstd_bomb_stops_at_the_budget_leaving_no_process(tree: layers.Tree) -> None:
    import hashlib

    def zstd(data: bytes) -> bytes:
        return subprocess.run(["zstd", "-cq"], input=data, capture_output=True, check=True).stdout

    raw = tar([("etc/os-release", "f", {"data": b"zstd\n"})])
    assert apply(tree, zstd(raw)) == ["sha256:" + hashlib.sha256(raw).hexdigest()]
    assert (tree.root / "etc/os-release").read_bytes() == b"zstd\n"
    bomb = zstd(tar([("zeros", "f", {"data": b"\0" * (8 << 20)})]))
    before = _zstd_processes()
    with pytest.raises(ImageError, match="larger than the import limit"):
        apply(tree, bomb, budget=ts.Budget(1 << 20, 100))
    assert _zstd_processes() == before
    with pytest.raises(ImageError, match="corrupt zstd data"):
        apply(tree, zstd(raw)[:-8] + b"garbage!")


def _zstd_processes() -> set[int]:
    import psutil

    return {p.pid for p in psutil.Process().children(recursive=True) if p.name() == "zstd"}
