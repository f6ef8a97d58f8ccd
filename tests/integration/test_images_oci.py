"""Images imported from OCI layouts and docker-save archives (``image import``), booted in
real microVMs. The layouts are made here with Debian's umoci: two layers, the second removing
a file of the first (a whiteout) and adding files with their own owners and modes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from ocitrees import (
    CAP_NET_RAW,
    busybox_tree,
    docker_archive,
    have_tools,
    layout_with_whiteout,
    python_tree,
    static_tree,
    with_files,
)

from pytest_smolvm import CommandTimeout, ImageError, SmolVM, VMConfig
from pytest_smolvm.images.store import resolve

pytestmark = pytest.mark.skipif(have_tools() is not None, reason=str(have_tools()))

def _import(source: str, name: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "pytest_smolvm", "image", "import", source, "--name", name],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    made = {}
    for kind, fill in (("python", python_tree), ("busybox", busybox_tree), ("static", static_tree)):
        work = tmp_path_factory.mktemp(kind)
        base = work / "base"
        base.mkdir()
        fill(base)
        layout_with_whiteout(work / "layout", with_files(base))
        made[kind] = work / "layout"
    return made


def _check_layers(vm: SmolVM, cat: list[str], stat: list[str]) -> None:
    assert vm.run([*cat, "/opt/new"]).stdout == "from layer 2\n"
    assert vm.run([*cat, "/etc/keep"]).stdout == "kept\n"
    gone = vm.run([*cat, "/etc/gone"])
    assert gone.exit_code != 0 and "No such file" in gone.stderr
    assert vm.run([*stat, "-c", "%u:%g:%a", "/opt/owned"]).stdout == "1234:2345:4750\n"


def test_imported_two_layer_image_keeps_whiteouts_owners_and_modes(layouts: dict[str, Path]) -> None:
    log = _import(f"oci:{layouts['python']}:t", "smolvm-test-oci-python")
    assert "[2/2] applying layer" in log or "already imported" in log
    with SmolVM(VMConfig(image="smolvm-test-oci-python")) as vm:
        _check_layers(vm, ["/bin/cat"], ["/bin/stat"])
        assert vm.run("echo $((6*7))").stdout == "42\n"  # the image's busybox shell
        vm.put(b"round trip", "/root/f")
        assert vm.get("/root/f") == b"round trip"
        # Extended attributes: user.* and the file capability reach the guest's ext4 intact.
        read = "import os; print(os.getxattr('/opt/capped', {!r}).hex())"
        assert vm.run(["/usr/bin/python3", "-S", "-c", read.format("user.smolvm")]).stdout == b"note".hex() + "\n"
        if os.geteuid() == 0:  # the layout's builder could set it (ocitrees.layout_with_whiteout)
            cap = vm.run(["/usr/bin/python3", "-S", "-c", read.format("security.capability")])
            assert cap.stdout == CAP_NET_RAW.hex() + "\n", cap.stderr


def test_docker_archive_of_the_same_layers_is_the_same_image(layouts: dict[str, Path], tmp_path: Path) -> None:
    archive = tmp_path / "saved.tar"
    docker_archive(layouts["python"], archive)
    _import(f"oci:{layouts['python']}:t", "smolvm-test-oci-python")
    _import(f"docker-archive:{archive}:smolvm/test:1", "smolvm-test-docker-archive")
    oci, saved = resolve("smolvm-test-oci-python"), resolve("smolvm-test-docker-archive")
    assert saved.digest == oci.digest  # keyed by the layers' content, not by the container format
    with SmolVM(VMConfig(image="smolvm-test-docker-archive")) as vm:
        _check_layers(vm, ["/bin/cat"], ["/bin/stat"])


def test_shell_string_in_an_image_that_lost_its_shell_is_a_clear_error(layouts: dict[str, Path]) -> None:
    _import(f"oci:{layouts['python']}:t", "smolvm-test-oci-python")
    with SmolVM(VMConfig(image="smolvm-test-oci-python")) as vm:
        vm.run(["/bin/busybox", "rm", "/bin/sh"], check=True)
        with pytest.raises(ImageError) as err:
            vm.run("echo hi")
        assert ("image 'smolvm-test-oci-python' has no /bin/sh, so the shell string 'echo hi' cannot run"
                in str(err.value))
        assert vm.run(["/bin/busybox", "echo", "argv still works"]).stdout == "argv still works\n"


def test_images_without_python_import_and_record_what_they_lack(layouts: dict[str, Path]) -> None:
    import json

    for kind, shell in (("busybox", True), ("static", False)):
        _import(f"oci:{layouts[kind]}:t", f"smolvm-test-oci-{kind}")
        image = resolve(f"smolvm-test-oci-{kind}")
        manifest = json.loads((image.path / "manifest.json").read_text())
        assert (manifest["guest_python"], manifest["shell"]) == (None, shell)
        assert image.kernel.read_bytes()[:4] == b"\x7fELF" and image.initrd.exists()  # our kernel, our boot layer
    _import(f"oci:{layouts['python']}:t", "smolvm-test-oci-python")
    python = json.loads((resolve("smolvm-test-oci-python").path / "manifest.json").read_text())
    assert (python["guest_python"], python["shell"]) == ("3.11", True)


def test_busybox_only_image_runs_argv_and_shell_commands(layouts: dict[str, Path]) -> None:
    _import(f"oci:{layouts['busybox']}:t", "smolvm-test-oci-busybox")
    with SmolVM(VMConfig(image="smolvm-test-oci-busybox")) as vm:
        _check_layers(vm, ["/bin/cat"], ["/bin/stat"])
        assert vm.run("echo hi | cat").stdout == "hi\n"
        assert vm.run(["python3", "-c", "1"]).exit_code == 127


def test_image_without_python_or_shell_runs_argv_and_refuses_shell_strings(layouts: dict[str, Path]) -> None:
    _import(f"oci:{layouts['static']}:t", "smolvm-test-oci-static")
    with SmolVM(VMConfig(image="smolvm-test-oci-static")) as vm:
        _check_layers(vm, ["/bin/busybox-static", "cat"], ["/bin/busybox-static", "stat"])
        assert vm.run(["/bin/busybox-static", "echo", "argv works"]).stdout == "argv works\n"
        with pytest.raises(ImageError, match=r"has no /bin/sh, so the shell string 'echo hi' cannot run; pass an argv"):
            vm.run("echo hi")
        vm.put(b"x", "/root/f")
        assert vm.get("/root/f") == b"x"
        with pytest.raises(CommandTimeout):
            vm.run(["/bin/busybox-static", "sleep", "30"], timeout=1)
