"""Cross-architecture testing as a user does it (docs/cross-architecture.md): a C program
cross-compiled on this host for arm64, then run and tested inside an arm64 guest, which the
``image="default-arm64"`` marker gives whatever the host's architecture (TCG here).

Needs the ``default-arm64`` image (``python -m pytest_smolvm image build --arch arm64``;
scripts/run-arm64 builds it) and Debian's ``gcc-aarch64-linux-gnu``."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from pytest_smolvm import ImageError, SmolVM
from pytest_smolvm.images import resolve

PROGRAM = r"""
#include <stdio.h>
#include <sys/utsname.h>
int main(int argc, char **argv) {
    struct utsname u;
    uname(&u);
    long sum = 0;
    for (int i = 1; i < argc; i++) { long v; sscanf(argv[i], "%ld", &v); sum += v; }
    printf("%s %ld %zu\n", u.machine, sum, sizeof(void *));
    return sum == 42 ? 0 : 3;
}
"""

pytestmark = pytest.mark.smolvm_optional("needs the default-arm64 image and gcc-aarch64-linux-gnu "
                                         "(scripts/run-arm64 has both)")


@pytest.fixture(scope="module")
def arm64_program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        resolve("default-arm64")
    except ImageError as exc:
        pytest.skip(f"no arm64 image: {exc}")
    gcc = shutil.which("aarch64-linux-gnu-gcc")
    if gcc is None:
        pytest.skip("aarch64-linux-gnu-gcc is not installed (apt-get install gcc-aarch64-linux-gnu)")
    src = tmp_path_factory.mktemp("xarch") / "sum.c"
    src.write_text(PROGRAM)
    out = src.with_suffix("")
    subprocess.run([gcc, "-static", "-O2", "-o", str(out), str(src)], check=True)
    assert out.read_bytes()[18:20] == b"\xb7\x00", "not an aarch64 ELF"
    return out


@pytest.mark.smolvm(image="default-arm64")
def test_an_arm64_build_is_tested_in_an_arm64_guest(smolvm: SmolVM, arm64_program: Path) -> None:
    assert smolvm.run("uname -m").stdout.strip() == "aarch64"
    smolvm.put(arm64_program, "/usr/local/bin/sum")
    smolvm.run("chmod +x /usr/local/bin/sum")
    good = smolvm.run(["sum", "40", "2"])
    assert good.stdout == "aarch64 42 8\n" and good.exit_code == 0
    bad = smolvm.run(["sum", "1"], check=False)
    assert bad.exit_code == 3 and bad.stdout == "aarch64 1 8\n"
