"""Kernel modules put into an image's rootfs (``Recipe.rootfs_modules``), and the KVM host recipe."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_smolvm.errors import ImageError
from pytest_smolvm.images.kmods import install_modules, module_depends, resolve_modules
from pytest_smolvm.images.recipe import DEFAULT_PACKAGES, Recipe, kvm_host_recipe

RELEASE = "6.1.0-99-cloud-amd64"


def _ko(path: Path, depends: str | None) -> Path:
    """A stand-in module: an ELF-ish blob whose .modinfo strings carry ``depends=``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    info = b"license=GPL\0" + (b"depends=" + depends.encode() + b"\0" if depends is not None else b"")
    path.write_bytes(b"\x7fELF" + b"\0" * 60 + info + b"vermagic=6.1\0")
    return path


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    root = tmp_path / "kernel"
    mods = root / "lib" / "modules" / RELEASE / "kernel"
    _ko(mods / "arch/x86/kvm/kvm-amd.ko", "kvm,ccp")
    _ko(mods / "arch/x86/kvm/kvm.ko", "irqbypass")
    _ko(mods / "virt/lib/irqbypass.ko", "")
    _ko(mods / "drivers/crypto/ccp/ccp.ko", None)
    _ko(mods / "drivers/other/unrelated.ko", "")
    (root / "lib" / "modules" / RELEASE / "modules.builtin").write_text("kernel/fs/ext4/ext4.ko\n")
    return root


def test_depends_are_read_from_modinfo(kernel: Path) -> None:
    mods = kernel / "lib" / "modules" / RELEASE / "kernel"
    assert module_depends(mods / "arch/x86/kvm/kvm-amd.ko") == ["kvm", "ccp"]
    assert module_depends(mods / "virt/lib/irqbypass.ko") == []
    assert module_depends(mods / "drivers/crypto/ccp/ccp.ko") == []


def test_dependencies_come_first_and_once(kernel: Path) -> None:
    moddir = kernel / "lib" / "modules" / RELEASE
    names = [p.name for p in resolve_modules(moddir, ["kvm_amd", "kvm"])]
    assert names == ["irqbypass.ko", "kvm.ko", "ccp.ko", "kvm-amd.ko"]


def test_a_missing_module_names_the_chain(kernel: Path) -> None:
    (kernel / "lib/modules" / RELEASE / "kernel/virt/lib/irqbypass.ko").unlink()
    with pytest.raises(ImageError, match=r"no module 'irqbypass' \(needed by kvm_amd -> kvm\)"):
        resolve_modules(kernel / "lib" / "modules" / RELEASE, ["kvm-amd"])


def test_install_copies_modules_with_their_paths_and_a_modules_dep(kernel: Path, tmp_path: Path) -> None:
    rootfs = tmp_path / "root"
    rootfs.mkdir()
    copied = install_modules(kernel, RELEASE, rootfs, ["kvm_amd"])
    assert "kernel/arch/x86/kvm/kvm-amd.ko" in copied and "kernel/drivers/other/unrelated.ko" not in copied
    dst = rootfs / "lib" / "modules" / RELEASE
    assert (dst / "kernel/virt/lib/irqbypass.ko").read_bytes() == \
        (kernel / "lib/modules" / RELEASE / "kernel/virt/lib/irqbypass.ko").read_bytes()
    dep = (dst / "modules.dep").read_text().splitlines()
    assert "kernel/arch/x86/kvm/kvm.ko: kernel/virt/lib/irqbypass.ko" in dep
    amd = next(line for line in dep if line.startswith("kernel/arch/x86/kvm/kvm-amd.ko:"))
    assert set(amd.split(": ")[1].split()) == {"kernel/arch/x86/kvm/kvm.ko", "kernel/virt/lib/irqbypass.ko",
                                               "kernel/drivers/crypto/ccp/ccp.ko"}
    assert (dst / "modules.builtin").exists()


def test_no_modules_touches_nothing(kernel: Path, tmp_path: Path) -> None:
    assert install_modules(kernel, RELEASE, tmp_path / "absent", []) == []
    assert not (tmp_path / "absent").exists()


def test_rootfs_modules_change_the_digest_only_when_given() -> None:
    assert Recipe(rootfs_modules=()).digest() == Recipe().digest()
    assert Recipe(rootfs_modules=("kvm_amd",)).digest() != Recipe().digest()
    recipe = kvm_host_recipe()
    assert Recipe.from_json(recipe.to_json()) == recipe


def test_kvm_host_recipe_has_what_l1_runs() -> None:
    recipe = kvm_host_recipe()
    assert {"kvm_amd", "tun", "veth", "nf_tables"} <= set(recipe.rootfs_modules)
    assert set(DEFAULT_PACKAGES) <= set(recipe.packages)
    for pkg in ("qemu-system-x86", "qemu-utils", "python3-filelock", "python3-paramiko", "python3-pyroute2",
                "python3-psutil", "nftables", "iproute2", "kmod"):
        assert pkg in recipe.packages


def test_the_rootfs_depmod_runs_even_behind_an_absolute_symlink(kernel: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Debian's /sbin/depmod -> /bin/kmod resolves only inside the chroot: it must still be found."""
    import subprocess

    rootfs = tmp_path / "root"
    (rootfs / "sbin").mkdir(parents=True)
    (rootfs / "sbin" / "depmod").symlink_to("/nonexistent-on-the-host/kmod")
    calls: list[list[str]] = []
    monkeypatch.setattr(subprocess, "run", lambda argv, **kw: calls.append(argv) or
                        subprocess.CompletedProcess(argv, 0, "", ""))
    install_modules(kernel, RELEASE, rootfs, ["kvm"])
    assert calls == [["chroot", str(rootfs), "depmod", "-a", RELEASE]]
