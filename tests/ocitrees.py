"""Small root trees and OCI image layouts for the image tests, made locally with Debian's
``umoci`` (registries are not reachable from CI): a Python-capable tree (the host's Debian
python3.11 with only what the guest agent imports, and busybox as the shell) and a
busybox-only tree.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

PYTHON = Path("/usr/bin/python3.11")
STDLIB = Path("/usr/lib/python3.11")
BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "cat", "echo", "ls", "id", "stat", "test", "true")


def have_tools() -> str | None:
    """Why the layouts cannot be made here, or None."""
    for tool in ("umoci",):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install -y {tool})"
    if not PYTHON.exists() or not BUSYBOX.exists():
        return "needs Debian's /usr/bin/python3.11 and busybox-static on the host"
    return None


def _libs(binary: Path) -> list[Path]:
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True).stdout
    return [Path(p) for line in out.splitlines() for p in line.split() if p.startswith("/")]


def _copy(src: Path, root: Path, dest: str | None = None) -> None:
    target = root / (dest or str(src).lstrip("/"))
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(os.path.realpath(src), target)


def busybox_tree(root: Path, applets: tuple[str, ...] = APPLETS) -> None:
    """A root with busybox as /bin/busybox and ``applets`` as symlinks to it."""
    _copy(BUSYBOX, root, "bin/busybox")
    for a in applets:
        (root / "bin" / a).symlink_to("busybox")


def python_tree(root: Path) -> None:
    """A root where ``/usr/bin/python3 -S`` runs the guest agent: the binary, its libraries,
    the stdlib pieces the agent imports, and a busybox shell."""
    busybox_tree(root)
    _copy(PYTHON, root)
    (root / "usr/bin/python3").symlink_to("python3.11")
    for lib in _libs(PYTHON):
        _copy(lib, root, str(lib).lstrip("/").replace("usr/lib/", "lib/"))
    for name in ("os.py", "__future__.py", "encodings"):
        src = STDLIB / name
        if src.is_dir():
            shutil.copytree(src, root / "usr/lib/python3.11" / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            _copy(src, root)
    for so in (STDLIB / "lib-dynload").glob("_json.*.so"):
        _copy(so, root)


def static_tree(root: Path) -> None:
    """No Python and no shell: one static binary (busybox, under a name that is no applet and no shell)."""
    _copy(BUSYBOX, root, "bin/busybox-static")  # the "busybox" prefix makes it dispatch argv[1]


def with_files(root: Path) -> Path:
    """``root`` plus what :func:`layout_with_whiteout` edits: /etc/gone, /etc/keep, /opt."""
    (root / "etc").mkdir(exist_ok=True)
    (root / "etc/gone").write_text("layer 1 only\n")
    (root / "etc/keep").write_text("kept\n")
    (root / "opt").mkdir(exist_ok=True)
    return root


def docker_archive(layout: Path, target: Path, tag: str = "t", repo_tag: str = "smolvm/test:1") -> None:
    """The image ``layout:tag`` as ``docker save`` writes it (manifest.json, config,
    uncompressed layer tars), made from the layout's own blobs."""
    import gzip
    import io
    import json
    import tarfile

    blobs = layout / "blobs" / "sha256"
    index = json.loads((layout / "index.json").read_text())
    desc = next(m for m in index["manifests"] if m["annotations"]["org.opencontainers.image.ref.name"] == tag)
    manifest = json.loads((blobs / desc["digest"][7:]).read_bytes())
    config = (blobs / manifest["config"]["digest"][7:]).read_bytes()
    members = {"config.json": config}
    names = []
    for i, layer in enumerate(manifest["layers"]):
        names.append(f"l{i}/layer.tar")
        members[names[-1]] = gzip.decompress((blobs / layer["digest"][7:]).read_bytes())
    members["manifest.json"] = json.dumps([{"Config": "config.json", "RepoTags": [repo_tag],
                                           "Layers": names}]).encode()
    with tarfile.open(target, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def umoci(*args: str) -> None:
    subprocess.run(["umoci", *args], check=True, capture_output=True)


#: setcap's cap_net_raw+ep (VFS_CAP_REVISION_2), as layer 2 of :func:`layout_with_whiteout`
#: gives /opt/capped when built as root.
CAP_NET_RAW = bytes([1, 0, 0, 2, 0, 0x20, 0, 0]) + bytes(12)


#: Every file of a tree gets this time before it is packed, so the same tree always gives the
#: same layer (the same diff_id, so the same image and snapshot: nothing piles up in the cache).
EPOCH = 1_700_000_000


def settle(root: Path) -> None:
    for path in [root, *root.rglob("*")]:
        os.utime(path, (EPOCH, EPOCH), follow_symlinks=False)


def layout_with_whiteout(layout: Path, base: Path, tag: str = "t") -> None:
    """Two layers: ``base`` as it is, then a layer that removes /etc/gone (a whiteout),
    adds /opt/new, gives /opt/owned to 1234:2345 with mode 4750, and adds /opt/capped with
    the xattr user.smolvm and (as root) the file capability :data:`CAP_NET_RAW`."""
    umoci("init", "--layout", str(layout))
    umoci("new", "--image", f"{layout}:{tag}")
    bundle = layout.parent / f"{layout.name}-bundle"
    umoci("unpack", "--image", f"{layout}:{tag}", str(bundle))
    rootfs = bundle / "rootfs"
    shutil.copytree(base, rootfs, symlinks=True, dirs_exist_ok=True)
    settle(rootfs)
    umoci("repack", "--image", f"{layout}:{tag}", str(bundle))
    shutil.rmtree(bundle)
    umoci("unpack", "--image", f"{layout}:{tag}", str(bundle))
    (rootfs / "etc/gone").unlink()
    (rootfs / "opt/new").write_text("from layer 2\n")
    owned = rootfs / "opt/owned"
    owned.write_text("owned\n")
    os.chown(owned, 1234, 2345)
    os.chmod(owned, 0o4750)
    capped = rootfs / "opt/capped"  # umoci records xattrs as SCHILY.xattr.* pax records
    capped.write_text("capped\n")
    os.setxattr(capped, "user.smolvm", b"note")
    if os.geteuid() == 0:  # file capabilities need CAP_SETFCAP to set on the host
        os.setxattr(capped, "security.capability", CAP_NET_RAW)
    settle(rootfs)
    umoci("repack", "--image", f"{layout}:{tag}", str(bundle))
    shutil.rmtree(bundle)
