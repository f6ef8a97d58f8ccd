"""The run's tag in host-wide names (namespaces, the uplink's veth and table): the run id
itself in the default runtime directory, else a digest that also names the runtime directory
and host, so two runtime directories given one SMOLVM_RUN_ID never share a namespace."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_smolvm.network import hub


def tag_in(directory: Path, run_id: str, monkeypatch: pytest.MonkeyPatch, *, default: Path | None = None) -> str:
    directory.mkdir(mode=0o700, exist_ok=True)
    monkeypatch.setenv("SMOLVM_RUNTIME_DIR", str(directory))
    monkeypatch.setattr(hub, "_secure_default", lambda: (default or Path("/nonexistent")).resolve())
    return hub.run_tag(run_id)


def test_default_runtime_dir_keeps_the_run_id_readable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rt = tmp_path / "default"
    assert tag_in(rt, "8545cc32", monkeypatch, default=rt) == "8545cc32"
    long_tag = tag_in(rt, "gh12345-1-3", monkeypatch, default=rt)
    assert len(long_tag) == 8 and long_tag == tag_in(rt, "gh12345-1-3", monkeypatch, default=rt)


def test_other_runtime_dirs_get_their_own_tag_for_one_run_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = tag_in(tmp_path / "job-a", "8545cc32", monkeypatch)
    b = tag_in(tmp_path / "job-b", "8545cc32", monkeypatch)
    assert a != b and "8545cc32" not in (a, b)
    assert a == tag_in(tmp_path / "job-a", "8545cc32", monkeypatch)           # stable: reap finds it
    assert hub.namespace_name("8545cc32", None) == f"smolvm-{a}-root"
    veth, table = hub.uplink_names("8545cc32", None)
    assert a in veth and a in table and len(veth) <= 15


def test_host_name_is_part_of_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    here = tag_in(tmp_path / "rt", "run1", monkeypatch)
    monkeypatch.setattr(hub, "host_name", lambda: "another-host")
    assert tag_in(tmp_path / "rt", "run1", monkeypatch) != here
