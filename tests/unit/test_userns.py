"""Rootless networking's decisions (network/userns.py): which reason a host gets, and that a
record naming a process we did not start is never trusted, joined or killed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pytest_smolvm.network import netns, userns


@pytest.fixture
def rootless(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setattr(userns, "rootless", lambda: True)
    monkeypatch.setattr(userns, "_probe_cache", {"userns": None})
    monkeypatch.setattr(userns.shutil, "which", lambda name, **kw: f"/usr/bin/{name}")
    monkeypatch.setattr(userns.os, "access", lambda path, mode: True)
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    monkeypatch.setenv("SMOLVM_RUNTIME_DIR", str(run))
    return run


def test_root_and_none_never_skip(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(userns, "rootless", lambda: False)
    assert userns.unavailable("nat") is None
    assert userns.unavailable("none") is None


@pytest.mark.usefixtures("rootless")
def test_a_willing_host_gives_every_policy() -> None:
    assert userns.unavailable("isolated") is None
    assert userns.unavailable("nat") is None


@pytest.mark.usefixtures("rootless")
def test_each_missing_piece_names_its_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(userns.os, "access", lambda path, mode: False)
    assert "chmod 0666 /dev/net/tun" in (userns.unavailable("isolated") or "")
    monkeypatch.setattr(userns.os, "access", lambda path, mode: True)
    monkeypatch.setattr(userns.shutil, "which", lambda name, **kw: None if name == "pasta" else "/usr/bin/x")
    assert userns.unavailable("isolated") is None
    assert "apt install passt" in (userns.unavailable("nat") or "")
    monkeypatch.setattr(userns.shutil, "which", lambda name, **kw: None if name == "nft" else "/usr/bin/x")
    assert "apt install nftables" in (userns.unavailable("isolated") or "")
    monkeypatch.setattr(userns.shutil, "which", lambda name, **kw: "/usr/bin/x")
    monkeypatch.setattr(userns, "_probe_cache", {})
    monkeypatch.setattr(userns, "_sysctl_is_zero", lambda path: path.endswith("max_user_namespaces"))
    reason = userns.unavailable("nat") or ""
    assert "user.max_user_namespaces" in reason and "\n" not in reason
    with pytest.raises(userns.NetworkUnavailable, match="max_user_namespaces"):
        userns.check("isolated")


def _record(run: Path, name: str, **rec: object) -> None:
    (run / "userns").mkdir(mode=0o700, exist_ok=True)
    (run / "userns" / f"{name}.json").write_text(json.dumps(rec))


def test_a_record_naming_another_process_is_neither_trusted_nor_killed(rootless: Path) -> None:
    me = os.getpid()
    _record(rootless, "smolvm-abc-root", pid=me, start=userns.process_start_time(me),
            pasta={"pid": me, "start": userns.process_start_time(me)})
    assert not userns.exists("smolvm-abc-root")  # our own user namespace, not a holder's
    assert not netns.exists("smolvm-abc-root")
    assert userns.names("smolvm-") == ["smolvm-abc-root"]
    assert userns.remove("smolvm-abc-root") == []  # the record goes, the process does not
    assert not (rootless / "userns" / "smolvm-abc-root.json").exists()
    with pytest.raises(userns.NetworkError, match="does not exist"):
        userns.call("smolvm-abc-root", "run", argv=["nft", "list", "ruleset"])


def test_a_reused_pid_is_not_the_holder(rootless: Path) -> None:
    _record(rootless, "smolvm-abd-root", pid=1, start=0.0)
    assert not userns.exists("smolvm-abd-root")
    assert userns.remove("smolvm-abd-root") == []


def test_doctor_lines_say_the_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(userns, "rootless", lambda: False)
    assert userns.describe()[0].startswith("network: root mode")
    monkeypatch.setattr(userns, "rootless", lambda: True)
    monkeypatch.setattr(userns, "unavailable", lambda policy: "no pasta" if policy == "nat" else None)
    lines = userns.describe()
    assert lines[0].startswith("network: rootless mode")
    assert lines[1:] == ["network isolated: works", "network nat: skipped: no pasta"]


def test_pastas_guard_keeps_vms_off_the_hosts_own_addresses() -> None:
    from pytest_smolvm.network.policy import pasta_guard_ruleset

    rules = pasta_guard_ruleset(["192.0.2.2", "127.0.0.1", "10.0.0.5"])
    assert 'oifname "svup" ip daddr { 10.0.0.5/32, 127.0.0.0/8, 192.0.2.2/32, 224.0.0.0/4, 255.255.255.255 } drop' \
        in rules
    assert "hook forward" in rules  # a drop in any base chain of the hook is final


def test_reap_judges_holder_records_of_gone_runs(rootless: Path) -> None:
    from pytest_smolvm.network import hub

    me = os.getpid()
    _record(rootless, "smolvm-gone1234-root", pid=me, start=userns.process_start_time(me))
    found = hub.reap_networks(dry_run=True)
    assert [f.what for f in found] == ["network namespace smolvm-gone1234-root"]
    assert (rootless / "userns" / "smolvm-gone1234-root.json").exists()
    hub.reap_networks()
    assert not (rootless / "userns" / "smolvm-gone1234-root.json").exists()  # and we were not killed
