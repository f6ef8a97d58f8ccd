"""Checkpoint values: shape comparison, network rules, integrity checks, removal (no VM)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pytest_smolvm import ConfigError, VMConfig
from pytest_smolvm.checkpoints import (
    Checkpoint,
    CheckpointError,
    check_network,
    digest_files,
    hold,
    live_checkpoints,
    register,
    release,
    remove_all,
    shape_mismatch,
    write_meta,
)

SHAPE = {"backend": "qemu", "qemu": "7.2.0", "accel": "tcg", "image": "abc", "vcpus": 1, "memory_mib": 256,
         "cpu": None, "disk_size_mib": None, "nic": False, "aslr": None, "volumes": [], "ram": "mem"}


def make(tmp_path: Path, config: VMConfig | None = None, name: str = "vm1.cp1",
         parent: Checkpoint | None = None) -> Checkpoint:
    path = tmp_path / "run" / name
    path.mkdir(parents=True)
    for f, data in (("mem", b"\0" * 8192 + b"ram"), ("state", b"devices"), ("disk.qcow2", b"QFI\xfb layer")):
        (path / f).write_bytes(data)
    return Checkpoint(name=name, path=path, run_id="run", config=config or VMConfig(), shape=dict(SHAPE),
                      files=digest_files(path), disk_bytes=1 << 30, parent=parent)


def test_matching_shapes_have_no_mismatch() -> None:
    assert shape_mismatch(SHAPE, dict(SHAPE)) is None


@pytest.mark.parametrize(("field", "value", "words"), [
    ("memory_mib", 512, "memory_mib is 512 for this VM but 256 in the checkpoint"),
    ("accel", "kvm", "accelerator is 'kvm' for this VM but 'tcg' in the checkpoint"),
    ("backend", "firecracker", "backend is 'firecracker' for this VM but 'qemu' in the checkpoint"),
    ("image", "def", "image id is 'def' for this VM but 'abc' in the checkpoint"),
    ("nic", True, "network device is True for this VM but False in the checkpoint"),
])
def test_a_mismatch_names_the_field_and_both_values(field: str, value: object, words: str) -> None:
    assert shape_mismatch(SHAPE, {**SHAPE, field: value}) == words


def test_a_field_only_one_side_has_is_a_mismatch() -> None:
    assert shape_mismatch(SHAPE, {**SHAPE, "host_cpu": "AMD EPYC"}) == (
        "host CPU is 'AMD EPYC' for this VM but None in the checkpoint")
    assert "extra" in (shape_mismatch({**SHAPE, "extra": 1}, SHAPE) or "")


def test_network_may_change_among_policies_with_a_nic(tmp_path: Path) -> None:
    cp = make(tmp_path, VMConfig(network="isolated"))
    check_network(cp, VMConfig(network="nat"))
    check_network(cp, VMConfig(network="nat", allow=("192.0.2.0/24",)))
    with pytest.raises(ConfigError, match=r"network='none'.*holds a network device"):
        check_network(cp, VMConfig(network="none"))


def test_a_checkpoint_without_a_nic_only_clones_without_one(tmp_path: Path) -> None:
    cp = make(tmp_path)
    check_network(cp, VMConfig())
    with pytest.raises(ConfigError, match=r"network='isolated'.*no network device"):
        check_network(cp, VMConfig(network="isolated"))


def test_verify_accepts_the_files_as_taken(tmp_path: Path) -> None:
    cp = make(tmp_path)
    cp.verify()
    assert cp.size == sum(len((cp.path / f).read_bytes()) for f in ("mem", "state", "disk.qcow2"))
    assert cp.disk_usage > 0


def test_verify_refuses_a_changed_size(tmp_path: Path) -> None:
    cp = make(tmp_path)
    with open(cp.path / "state", "ab") as f:
        f.write(b"x")
    with pytest.raises(CheckpointError, match="state has 8 bytes, expected 7"):
        cp.verify()


def test_verify_refuses_same_size_other_content(tmp_path: Path) -> None:
    cp = make(tmp_path)
    (cp.path / "mem").write_bytes(b"\0" * 8192 + b"RAM")  # same size; new mtime, so it is re-read
    with pytest.raises(CheckpointError, match="mem does not match its sha256"):
        cp.verify()


def test_verify_refuses_a_symlink_in_place_of_a_file(tmp_path: Path) -> None:
    cp = make(tmp_path)
    target = tmp_path / "elsewhere"
    os.rename(cp.path / "disk.qcow2", target)
    os.symlink(target, cp.path / "disk.qcow2")
    with pytest.raises(CheckpointError, match=r"disk\.qcow2"):
        cp.verify()


def test_removed_checkpoint_is_refused_and_remove_is_idempotent(tmp_path: Path) -> None:
    cp = make(tmp_path)
    cp.remove()
    cp.remove()
    assert not cp.exists and not (tmp_path / "run").exists()  # the empty run directory goes too
    with pytest.raises(CheckpointError, match="was removed"):
        cp.verify()
    assert "(removed)" in repr(cp)


def test_remove_all_removes_what_this_process_registered(tmp_path: Path) -> None:
    a, b = make(tmp_path, name="a.cp1"), make(tmp_path, name="b.cp1")
    register(a)
    register(b)
    b.remove()
    assert a in live_checkpoints() and b not in live_checkpoints()
    assert remove_all() >= 1
    assert not a.exists and a not in live_checkpoints()


def test_meta_records_shape_and_digests(tmp_path: Path) -> None:
    import json

    cp = make(tmp_path)
    write_meta(cp)
    meta = json.loads((cp.path / "meta.json").read_text())
    assert meta["shape"]["memory_mib"] == 256 and set(meta["files"]) == {"mem", "state", "disk.qcow2"}
    assert meta["files"]["state"]["size"] == 7


def test_a_held_checkpoint_is_refused_at_once_and_deleted_with_its_last_holder(tmp_path: Path) -> None:
    parent = make(tmp_path, name="vm1.cp1")
    register(parent)
    hold(parent)  # a running VM's disk sits on its layer
    child = make(tmp_path, name="vm1.cp2", parent=parent)
    register(child)  # the child's layer names the parent's: it holds it too
    parent.remove()
    assert not parent.exists and parent.path.is_dir()
    with pytest.raises(CheckpointError, match="was removed"):
        parent.verify()
    release(parent)  # the VM closed
    assert parent.path.is_dir()
    child.verify()
    child.remove()
    assert not parent.path.exists() and not child.path.exists()
    assert parent not in live_checkpoints() and child not in live_checkpoints()


def test_a_child_whose_parent_files_are_gone_is_refused(tmp_path: Path) -> None:
    parent = make(tmp_path, name="vm1.cp1")
    child = make(tmp_path, name="vm1.cp2", parent=parent)
    import shutil

    shutil.rmtree(parent.path)
    with pytest.raises(CheckpointError, match="whose files are gone"):
        child.verify()
