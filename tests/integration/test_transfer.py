"""Directory transfer in a real microVM: vm.put(Path(dir), dest) and vm.get_dir(src, local).
Trees keep their modes, symlinks travel as links and are never followed on either side, a
tree over the cap leaves nothing on the host, and a guest that forges its tar (its busybox
replaced) cannot write outside the new local tree."""

from __future__ import annotations

import errno
import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from pytest_smolvm import ConfigError, GuestFileError, SmolVM
from pytest_smolvm.transfer import BUSYBOX


def host_tree(tmp_path: Path) -> tuple[Path, Path]:
    """A tree with nested dirs, an executable, an empty dir and links out of it; and the
    directory outside it that a link points at (which must never be copied)."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("must not travel")
    src = tmp_path / "src"
    (src / "a" / "b" / "c").mkdir(parents=True)
    (src / "empty").mkdir()
    (src / "a" / "b" / "c" / "deep.txt").write_text("deep\n")
    (src / "bin").mkdir()
    (src / "bin" / "hello").write_text("#!/bin/sh\necho hello from the tree\n")
    (src / "bin" / "hello").chmod(0o750)
    (src / "a" / "private").write_bytes(os.urandom(70_000))
    (src / "a" / "private").chmod(0o600)
    (src / "out").symlink_to(outside)
    (src / "a" / "rel").symlink_to("../bin/hello")
    for d in (src, src / "a", src / "a" / "b", src / "a" / "b" / "c", src / "empty", src / "bin"):
        d.chmod(0o755)  # whatever the umask
    (src / "a" / "b" / "c" / "deep.txt").chmod(0o644)
    return src, outside


def test_tree_round_trip_keeps_modes_and_links(smolvm_session: SmolVM, tmp_path: Path) -> None:
    vm = smolvm_session
    src, outside = host_tree(tmp_path)
    vm.put(src, "/root/xfer-tree")
    listing = vm.run("cd /root/xfer-tree && find . | sort | while read p; do "
                     "echo \"$p $(stat -c '%a %u:%g %F' \"$p\")\"; done", check=True).stdout.splitlines()
    assert listing == [
        ". 755 0:0 directory", "./a 755 0:0 directory", "./a/b 755 0:0 directory",
        "./a/b/c 755 0:0 directory", "./a/b/c/deep.txt 644 0:0 regular file",
        "./a/private 600 0:0 regular file", "./a/rel 777 0:0 symbolic link",
        "./bin 755 0:0 directory", "./bin/hello 750 0:0 regular file",
        "./empty 755 0:0 directory", "./out 777 0:0 symbolic link"]
    assert vm.run(["readlink", "/root/xfer-tree/out"]).stdout == f"{outside}\n"  # the link, not its target
    assert vm.run("/root/xfer-tree/a/rel", check=True).stdout == "hello from the tree\n"
    assert vm.run("sha256sum < /root/xfer-tree/a/private").stdout.split()[0] == \
        __import__("hashlib").sha256((src / "a" / "private").read_bytes()).hexdigest()

    back = vm.get_dir("/root/xfer-tree", tmp_path / "back")
    assert back == tmp_path / "back"
    for rel in ("a/b/c/deep.txt", "bin/hello", "a/private", "empty", "a/b"):
        assert stat.S_IMODE((back / rel).lstat().st_mode) == stat.S_IMODE((src / rel).lstat().st_mode), rel
    assert (back / "a" / "private").read_bytes() == (src / "a" / "private").read_bytes()
    assert os.readlink(back / "out") == str(outside) and os.readlink(back / "a" / "rel") == "../bin/hello"
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]
    assert not list((back / "empty").iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["back", "outside", "src"]


def test_put_merges_into_an_existing_dest_and_leaves_its_mode(smolvm_session: SmolVM, tmp_path: Path) -> None:
    vm = smolvm_session
    vm.run("mkdir -p /root/xfer-merge && chmod 700 /root/xfer-merge && echo old > /root/xfer-merge/kept && "
           "echo old > /root/xfer-merge/replaced", check=True)
    src = tmp_path / "m"
    src.mkdir()
    (src / "replaced").write_text("new\n")
    vm.put(src, "/root/xfer-merge")
    r = vm.run("stat -c %a /root/xfer-merge; cat /root/xfer-merge/kept /root/xfer-merge/replaced", check=True)
    assert r.stdout == "700\nold\nnew\n"


def test_guest_symlinks_arrive_as_links_never_followed(smolvm_session: SmolVM, tmp_path: Path) -> None:
    vm = smolvm_session
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "file").write_text("host data")
    vm.run(["sh", "-c", 'mkdir -p /root/xfer-links && cd /root/xfer-links && ln -sfn "$1" host && '
            'ln -sfn "$1/file" hostfile && ln -sfn /etc guestetc && echo x > plain', "sh", str(victim)], check=True)
    back = vm.get_dir("/root/xfer-links", tmp_path / "back")
    assert os.readlink(back / "host") == str(victim) and os.readlink(back / "hostfile") == str(victim / "file")
    assert os.readlink(back / "guestetc") == "/etc" and (back / "plain").read_text() == "x\n"
    assert (victim / "file").read_text() == "host data" and sorted(p.name for p in victim.iterdir()) == ["file"]


def test_a_tree_over_the_cap_leaves_nothing(smolvm_session: SmolVM, tmp_path: Path) -> None:
    vm = smolvm_session
    vm.run("mkdir -p /root/xfer-big/sub && head -c 300000 /dev/urandom > /root/xfer-big/sub/blob", check=True)
    with pytest.raises(GuestFileError, match="over the limit of 100000 bytes") as info:
        vm.get_dir("/root/xfer-big", tmp_path / "back", max_size=100_000)
    assert info.value.errno == errno.EFBIG
    assert list(tmp_path.iterdir()) == []
    assert (vm.get_dir("/root/xfer-big", tmp_path / "back") / "sub" / "blob").stat().st_size == 300_000


def test_transfer_errors_name_the_value(smolvm_session: SmolVM, tmp_path: Path) -> None:
    vm = smolvm_session
    with pytest.raises(GuestFileError, match=r"/no/such/dir.*No such file") as info:
        vm.get_dir("/no/such/dir", tmp_path / "a")
    assert info.value.errno == errno.ENOENT
    with pytest.raises(GuestFileError, match="Not a directory") as info:
        vm.get_dir("/etc/hostname", tmp_path / "b")
    assert info.value.errno == errno.ENOTDIR
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    with pytest.raises(GuestFileError, match="/etc/hostname"):
        vm.put(src, "/etc/hostname")  # a file where the tree should go
    with pytest.raises(GuestFileError, match="/proc/nope"):
        vm.put(src, "/proc/nope/tree")
    with pytest.raises(ConfigError, match="already exists"):
        vm.get_dir("/etc", src)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_needs_no_shell_or_tar_in_the_image_and_a_forged_tar_stays_inside(smolvm: SmolVM, tmp_path: Path) -> None:
    """Transfers use the boot layer's busybox only. Then the guest turns hostile: it replaces
    that busybox with a script printing a crafted tar (a link out of the tree, then files
    'through' it and through '..')."""
    smolvm.run([BUSYBOX, "rm", "-f", "/usr/bin/sh", "/usr/bin/tar"], check=True)
    (tmp_path / "small" / "d").mkdir(parents=True)
    (tmp_path / "small" / "d" / "x").write_text("no tools")
    smolvm.put(tmp_path / "small", "/root/small")
    assert (smolvm.get_dir("/root/small", tmp_path / "small-back") / "d" / "x").read_text() == "no tools"
    outside = tmp_path / "outside"
    outside.mkdir()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, target, data in (("esc", str(outside), b""), ("esc/planted", "", b"via the link"),
                                   ("up", "../../../..", b""), ("up/planted2", "", b"via dot-dot")):
            info = tarfile.TarInfo(name)
            info.type, info.linkname, info.size = (tarfile.SYMTYPE, target, 0) if target else \
                (tarfile.REGTYPE, "", len(data))
            t.addfile(info, io.BytesIO(data))
    smolvm.put(buf.getvalue(), "/root/forged.tar")
    # PID 1 runs that busybox: unlink it (a running binary cannot be rewritten) and put the
    # forger in its place; the copy is named busybox so that it dispatches its applets.
    forge = (f"cp {BUSYBOX} /root/busybox && rm {BUSYBOX} && "
             f"printf '#!/root/busybox sh\\n/root/busybox cat /root/forged.tar\\n' > {BUSYBOX} && chmod 755 {BUSYBOX}")
    smolvm.run([BUSYBOX, "sh", "-c", forge], check=True)
    back = smolvm.get_dir("/anything", tmp_path / "back")
    assert list(outside.iterdir()) == []
    assert os.readlink(back / "esc") == str(outside) and os.readlink(back / "up") == "../../../.."
    planted = sorted(os.path.relpath(os.path.join(d, f), back) for d, _, files in os.walk(back)
                     for f in files if f.startswith("planted"))
    assert planted == sorted([str(outside.relative_to("/") / "planted"), "planted2"])  # inside back, clamped
    assert sorted(p.name for p in tmp_path.iterdir()) == ["back", "outside", "small", "small-back"]
