"""The image build keeps none of the build host's identity: no resolv.conf (a networked
guest's is written at setup, naming the run's resolver), a neutral hostname, no machine-id."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_smolvm.images.build import _customise_rootfs


@pytest.mark.parametrize("kind", ["file", "symlink", "dangling symlink", "absent"])
def test_the_build_hosts_resolv_conf_is_dropped(tmp_path: Path, kind: str) -> None:
    root, out = tmp_path / "root", tmp_path / "out"
    (root / "etc").mkdir(parents=True)
    out.mkdir()
    host_file = tmp_path / "host-resolv.conf"
    host_file.write_text("nameserver 127.0.0.53\n")
    conf = root / "etc/resolv.conf"
    if kind == "file":
        conf.write_text("nameserver 10.1.2.3\nsearch corp.internal\n")
    elif kind == "symlink":
        conf.symlink_to(host_file)
    elif kind == "dangling symlink":
        conf.symlink_to("../run/systemd/resolve/stub-resolv.conf")
    _customise_rootfs(root, out)
    assert not conf.exists() and not conf.is_symlink()
    assert host_file.read_text() == "nameserver 127.0.0.53\n"  # a link's target is never touched
    assert (root / "etc/hostname").read_text() == "smolvm\n"
    assert (root / "etc/machine-id").read_text() == ""


def test_a_rootless_builds_tree_forgets_the_dropped_file(tmp_path: Path) -> None:
    """A rootless build applies mmdebstrap's tarball to a tree whose owners are stamped into
    the ext4 entry by entry: a file removed from the directory but not from the tree made
    that step fail ("/etc/resolv.conf: File not found by ext2_lookup")."""
    import io
    import tarfile

    from pytest_smolvm.images import layers, tarstream

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (("etc", None), ("etc/resolv.conf", b"nameserver 10.1.2.3\n"), ("etc/hostname", b"b\n"),
                           ("etc/machine-id", b"x\n"), ("run", None)):
            info = tarfile.TarInfo(name)
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size, info.uid, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
    buf.seek(0)
    root, out = tmp_path / "root", tmp_path / "out"
    root.mkdir(mode=0o700)
    out.mkdir()
    tree = layers.Tree(root)
    tree.apply(tarstream.Counted(buf, tarstream.Budget(1 << 20, 100), "test tar"), "test tar")
    _customise_rootfs(root, out, tree)
    assert "etc/resolv.conf" not in tree.meta and not (root / "etc/resolv.conf").exists()
    layers.write_ext4(tree, tmp_path / "rootfs.ext4", 64)  # raised ImageError before
