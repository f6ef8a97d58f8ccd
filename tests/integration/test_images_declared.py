"""An image declared in pyproject.toml with a pip package, a file tree and a run step, built by
``image build --name`` (steps in a VM of the base, no root needed) and booted in a real VM."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from wheels import MODULE, PACKAGE, VERSION, offline_index

from pytest_smolvm import SmolVM, VMConfig

NAME = "smolvm-test-declared-pip-files"


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("project")
    data = root / "tests" / "data"
    (data / "nested").mkdir(parents=True)
    (data / "nested" / "numbers.csv").write_text("a,b\n1,2\n")
    (data / "run.sh").write_text("#!/bin/sh\necho ran\n")
    (data / "run.sh").chmod(0o750)
    (data / "latest").symlink_to("nested/numbers.csv")
    (root / "pyproject.toml").write_text(f"""
[project]
name = "uses-smolvm"

[tool.smolvm.images.{NAME}]
from = "default"
pip = ["{PACKAGE}=={VERSION}"]
files = {{ "/opt/data" = "tests/data" }}
run = ["useradd --create-home app", "echo declared > /etc/declared-marker"]
""")
    return root


def _build(project: Path) -> subprocess.CompletedProcess[str]:
    # pip downloads from a local index only: no test reaches PyPI.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), **offline_index(project / "wheels")}
    return subprocess.run([sys.executable, "-m", "pytest_smolvm", "image", "build", "--name", NAME],
                          cwd=project, capture_output=True, text=True, timeout=1200, env=env)


def test_declared_image_with_pip_files_and_run(project: Path) -> None:
    built = _build(project)
    assert built.returncode == 0, built.stderr
    assert f"pip: installing {PACKAGE}=={VERSION} in the guest" in built.stderr or "building image" not in built.stderr
    with SmolVM(VMConfig(image=NAME)) as vm:
        assert vm.run(["python3", "-c", f"import {MODULE}; print({MODULE}.__version__)"]).stdout == f"{VERSION}\n"
        assert vm.run(["cat", "/opt/data/nested/numbers.csv"]).stdout == "a,b\n1,2\n"
        assert vm.run(["/opt/data/run.sh"]).stdout == "ran\n"
        listing = vm.run(["stat", "-c", "%n %u:%g %a %F", "/opt/data/run.sh", "/opt/data/latest", "/opt/data/nested"])
        assert listing.stdout.splitlines() == [
            "/opt/data/run.sh 0:0 750 regular file", "/opt/data/latest 0:0 777 symbolic link",
            "/opt/data/nested 0:0 755 directory"]
        assert vm.run(["readlink", "/opt/data/latest"]).stdout == "nested/numbers.csv\n"
        assert vm.run(["id", "-u", "app"]).stdout == "1000\n"
        assert vm.run(["cat", "/etc/declared-marker"]).stdout == "declared\n"
        assert vm.run(["ls", "-A", "/mnt"]).stdout == ""  # the build's volumes left nothing behind
        assert vm.run(["test", "-e", "/opt/data/lost+found"]).exit_code == 1


def test_unchanged_declaration_is_never_rebuilt(project: Path) -> None:
    assert _build(project).returncode == 0
    t0 = time.monotonic()
    again = _build(project)
    assert again.returncode == 0, again.stderr
    assert "building image" not in again.stderr and "[1/" not in again.stderr
    assert time.monotonic() - t0 < 30  # found by its key: no VM, no download
