"""Read-only volumes and the CPU model, in real microVMs: what the guest reads, what it cannot
write, what the host keeps, and how snapshot clones get volumes too."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest
from helpers import REAL_CACHE, qemu_processes

from pytest_smolvm import ConfigError, SmolVM, VMConfig


def _digest(tree: Path) -> dict[str, tuple[str, int]]:
    return {str(p.relative_to(tree)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(tree.rglob("*")) if p.is_file()}


@pytest.fixture
def data(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    (d / "sets").mkdir(parents=True)
    (d / "sets" / "numbers.csv").write_text("a,b\n1,2\n")
    (d / "blob.bin").write_bytes(bytes(range(256)) * 1024)
    return d


WRITES = {
    "create": "echo x > /mnt/data/new",
    "overwrite": "echo x > /mnt/data/sets/numbers.csv",
    "remount": "mount -o remount,rw /mnt/data",
    "raw device": "dd if=/dev/zero of=$(findmnt -no SOURCE /mnt/data) bs=4096 count=1 conv=fsync",
}


@pytest.mark.parametrize("snapshot", [False, True], ids=["cold", "clone"])
def test_guest_reads_a_directory_volume_and_cannot_write_it(data: Path, snapshot: bool) -> None:
    before = _digest(data)
    with SmolVM(VMConfig(snapshot=snapshot, volumes={"/mnt/data": str(data)})) as vm:
        assert vm.boot_mode == ("snapshot" if snapshot else "cold")
        assert vm.run("cat /mnt/data/sets/numbers.csv").stdout == "a,b\n1,2\n"
        assert vm.get("/mnt/data/blob.bin") == (data / "blob.bin").read_bytes()
        assert "ro," in vm.run("findmnt -no OPTIONS /mnt/data").stdout
        for what, cmd in WRITES.items():
            r = vm.run(cmd)
            assert r.exit_code != 0, f"{what} succeeded: {r.stdout}{r.stderr}"
        assert vm.run("sync; cat /mnt/data/sets/numbers.csv").stdout == "a,b\n1,2\n"
    assert _digest(data) == before


def test_an_ext4_image_file_is_mounted_and_left_unchanged(data: Path, tmp_path: Path) -> None:
    image = tmp_path / "data.ext4"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(data), str(image), "16M"], check=True)
    before = hashlib.sha256(image.read_bytes()).hexdigest()
    with SmolVM(VMConfig(volumes=[f"{image}:/srv/ds"])) as vm:
        assert vm.run("cat /srv/ds/sets/numbers.csv").stdout == "a,b\n1,2\n"
        assert vm.run("touch /srv/ds/x").exit_code != 0
        assert vm.run("ls / /mnt").exit_code == 0  # the rest of the guest is as usual
    assert hashlib.sha256(image.read_bytes()).hexdigest() == before


def test_clones_read_their_own_volume_when_the_snapshot_saw_another(data: Path) -> None:
    """Volume contents are not in the snapshot key (sizes are): the guest must not serve a
    clone what the template's kernel cached of the template's image."""
    seen = []
    for text in ("first version\n", "second, a longer version\n", "third\n"):
        (data / "sets" / "numbers.csv").write_text(text)
        with SmolVM(VMConfig(volumes={"/mnt/data": str(data)})) as vm:
            assert vm.boot_mode == "snapshot"
            seen.append(vm.run("cat /mnt/data/sets/numbers.csv").stdout)
    assert seen == ["first version\n", "second, a longer version\n", "third\n"]


def test_two_volumes_and_their_serials(data: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "x").write_text("other\n")
    with SmolVM(VMConfig(volumes={"/mnt/data": str(data), "/opt/other": str(other)})) as vm:
        assert vm.run("cat /opt/other/x /mnt/data/sets/numbers.csv").stdout == "other\na,b\n1,2\n"
        assert vm.run("findmnt -no SOURCE /").stdout.strip() == "/dev/vda"


def test_bad_volume_in_a_marker_stops_the_run_before_any_vm(pytester: pytest.Pytester, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMOLVM_CACHE_DIR", str(REAL_CACHE))
    missing = tmp_path / "no-such-dir"
    pytester.makepyfile(f"""
        import pytest

        @pytest.mark.smolvm(volumes={{"/mnt/data": {str(missing)!r}}})
        def test_x(smolvm):
            pass
    """)
    runtime = tmp_path / "rt"  # its own runtime dir: QEMUs of other runs on this host are not ours
    monkeypatch.setenv("SMOLVM_RUNTIME_DIR", str(runtime))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret != 0
    result.stderr.fnmatch_lines([f"*invalid volumes='{missing}'*cannot be used*from marker on*test_x*"])
    assert not [c for c in qemu_processes().values() if str(runtime) in c]


def test_marker_volumes_reach_the_guest(pytester: pytest.Pytester, data: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMOLVM_CACHE_DIR", str(REAL_CACHE))
    pytester.makepyfile(f"""
        import pytest

        @pytest.mark.smolvm(volumes=[{str(data) + ':/mnt/data'!r}])
        def test_reads(smolvm):
            assert smolvm.run("cat /mnt/data/sets/numbers.csv").stdout == "a,b\\n1,2\\n"
    """)
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)


def test_cpu_model_reaches_the_guest_and_a_bad_one_starts_nothing() -> None:
    with SmolVM(VMConfig(accel="tcg", cpu="qemu64,+rdrand,+arat,+svm,+npt")) as vm:
        flags = vm.run("grep -m1 ^flags /proc/cpuinfo").stdout.split()
        assert {"svm", "npt", "rdrand"} <= set(flags)
    vm = SmolVM(VMConfig(accel="tcg", cpu="qemu46,+svm"))
    with pytest.raises(ConfigError, match="no CPU model 'qemu46'"):
        vm.start()
    assert not vm.workdir.exists()
    assert not [c for c in qemu_processes().values() if str(vm.workdir) in c]
