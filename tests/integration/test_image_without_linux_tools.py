"""A Mac can get an image without Linux tools (issue 22): an arm64 container image imported
with mmdebstrap, apt, dpkg, musl-gcc and the cross gcc hidden from PATH. The kernel, its
modules and busybox come from Debian's ``.deb`` files (local files here, as a Mac user would
download them), read in Python (ar + tar); the agent is compiled by ``zig cc`` (PyPI
``ziglang``). Then the image boots as an arm64 guest and runs a command.

Setting up uses Linux tools (apt-get downloads the packages, umoci packs the layout); the
import itself never sees them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from ocitrees import settle, umoci

from pytest_smolvm import SmolVM, VMConfig
from pytest_smolvm.images import agentbin, build, deb, store
from pytest_smolvm.images.recipe import arm64_recipe

#: What a Mac does not have (and the cross gcc, so the agent must come from zig).
HIDDEN = {"mmdebstrap", "apt", "apt-get", "apt-cache", "dpkg", "dpkg-deb", "dpkg-query", "musl-gcc",
          "aarch64-linux-gnu-gcc", "aarch64-linux-gnu-gcc-12"}
NAME = "smolvm-test-nolinuxtools-arm64"

pytestmark = pytest.mark.smolvm_optional("needs umoci, apt (to fetch the packages once) and PyPI ziglang")


@pytest.fixture(scope="module")
def debs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The arm64 kernel and busybox-static packages, as local files."""
    if shutil.which("umoci") is None or shutil.which("apt-get") is None:
        pytest.skip("needs umoci and apt-get to prepare the packages and the layout")
    if agentbin._zig("arm64") is None:
        pytest.skip("PyPI ziglang is not installed (pip install ziglang)")
    dl = tmp_path_factory.mktemp("debs")
    recipe = arm64_recipe()
    deps = subprocess.run(["apt-cache", "depends", "--important", f"{recipe.kernel_package}:arm64"],
                          capture_output=True, text=True, check=True).stdout
    kernel = build.concrete_kernel_package(deps)
    assert kernel is not None, deps
    subprocess.run(["apt-get", "download", f"{kernel}:arm64", "busybox-static:arm64"], cwd=dl, check=True,
                   capture_output=True)
    return {"kernel": next(dl.glob("linux-image-*.deb")), "busybox": next(dl.glob("busybox-static_*.deb"))}


@pytest.fixture(scope="module")
def layout(debs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-layer linux/arm64 OCI image: arm64 busybox as /bin/sh and a few applets."""
    work = tmp_path_factory.mktemp("arm64-oci")
    layout = work / "layout"
    umoci("init", "--layout", str(layout))
    umoci("new", "--image", f"{layout}:t")
    umoci("config", "--image", f"{layout}:t", "--architecture", "arm64")
    bundle = work / "bundle"
    umoci("unpack", "--image", f"{layout}:t", str(bundle))
    rootfs = bundle / "rootfs"
    deb.extract(debs["busybox"], rootfs, lambda p: p == "bin/busybox")
    for applet in ("sh", "uname", "cat", "echo"):
        (rootfs / "bin" / applet).symlink_to("busybox")
    settle(rootfs)
    umoci("repack", "--image", f"{layout}:t", str(bundle))
    return layout


def hidden_path(root: Path) -> str:
    """A PATH with every program of the usual directories but :data:`HIDDEN`."""
    bin_dir = root / "bin"
    bin_dir.mkdir()
    for d in ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"):
        for exe in sorted(Path(d).iterdir()) if Path(d).is_dir() else ():
            if exe.name not in HIDDEN and not (bin_dir / exe.name).exists() and os.access(exe, os.X_OK):
                (bin_dir / exe.name).symlink_to(exe)
    return str(bin_dir)


def test_an_arm64_image_from_debs_and_oci_with_no_linux_tools(layout: Path, debs: dict[str, Path], tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    env = {**os.environ, "PATH": hidden_path(tmp_path), "SMOLVM_CACHE_DIR": str(cache),
           "SMOLVM_KERNEL_DEB": str(debs["kernel"]), "SMOLVM_BUSYBOX_DEB": str(debs["busybox"])}
    env.pop("SMOLVM_AGENT_TOOLCHAIN", None)
    check = f"import shutil; print([t for t in {sorted(HIDDEN)!r} if shutil.which(t)])"
    assert subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True).stdout == "[]\n"
    proc = subprocess.run([sys.executable, "-m", "pytest_smolvm", "image", "import", f"oci:{layout}:t",
                           "--name", NAME, "--arch", "arm64"], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    image_dir = (cache / "images" / NAME / "current").resolve()
    manifest = json.loads((image_dir / "manifest.json").read_text())
    assert manifest["arch"] == "arm64" and manifest["kernel_package"].startswith("linux-image-")
    assert (image_dir / "vmlinux").read_bytes()[56:60] == build.ARM64_IMAGE_MAGIC
    assert (image_dir / "busybox").read_bytes()[18:20] == b"\xb7\x00"
    # The boot layer's agent came from zig: its key names zig (the cross gcc was hidden).
    [agent] = (cache / "agent").iterdir()
    assert agent.read_bytes()[18:20] == b"\xb7\x00"
    with monkeypatch.context() as mp:
        mp.setenv("SMOLVM_CACHE_DIR", str(cache))
        mp.setenv("SMOLVM_AGENT_TOOLCHAIN", "zig")
        tc = agentbin.toolchain("arm64")
        assert tc.kind == "zig" and agent.name == f"smolvm-agent-{agentbin.agent_digest('arm64')}"
        image = store.resolve(NAME)
        assert image.arch == "arm64" and image.initrd.parent == image_dir
        with SmolVM(VMConfig(image=NAME, snapshot=False)) as vm:
            assert vm.run(["/bin/busybox", "uname", "-m"]).stdout == "aarch64\n"
            assert vm.run("echo $((6*7))").stdout == "42\n"
