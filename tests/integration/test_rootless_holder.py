"""The rootless run namespace's holder (network/userns.py), for real: a process in a user +
network namespace of its own that creates TAPs and sockets there and hands back their
descriptors; it answers only its own peer checks, and removing it leaves nothing. (Rootless
mode forced with SMOLVM_ROOTLESS_NET=1, so it also runs under root; the ordinary user's
networked VMs are scripts/run-rootless.)"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_smolvm.errors import NetworkError
from pytest_smolvm.network import netns, userns

NAME = "smolvm-holdtest-root"


def _forced_rootless(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Rootless mode for this root process, with a runtime directory of the test's own."""
    if userns.unavailable("isolated"):
        pytest.skip(userns.unavailable("isolated") or "")
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    monkeypatch.setenv("SMOLVM_RUNTIME_DIR", str(run))
    monkeypatch.setenv(userns.FORCE_ENV, "1")


@pytest.fixture
def holder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[str]:
    _forced_rootless(monkeypatch, tmp_path)
    netns.create(NAME)
    try:
        yield NAME
    finally:
        netns.remove(NAME)


def test_the_holder_owns_a_namespace_of_its_own(holder: str) -> None:
    rec = json.loads((userns.records_dir() / f"{holder}.json").read_text())
    assert netns.exists(holder) and netns.names("smolvm-") == [holder]
    assert os.readlink(f"/proc/{rec['pid']}/ns/net") != os.readlink("/proc/self/ns/net")
    assert "table inet smolvm" not in netns.run(holder, ["nft", "list", "ruleset"]).stdout
    netns.write_sysctl(holder, "net.ipv4.ip_forward", "1")
    assert netns.read_sysctl(holder, "net.ipv4.ip_forward") == "1"
    fd = netns.open_tap(holder, "svtest0")
    try:
        netns.set_link(holder, "svtest0", address="10.213.200.1", prefixlen=30)
    finally:
        os.close(fd)
    netns.set_link(holder, "lo")
    listener = netns.new_socket(holder)
    with listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        netns.connect(holder, ("127.0.0.1", port), 5).close()  # inside: reaches it
        with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=2):
            pass  # from our namespace: not the same loopback


def test_the_holder_runs_only_what_it_is_for(holder: str) -> None:
    with pytest.raises(NetworkError, match="not one the holder runs"):
        netns.run(holder, ["sh", "-c", "id"])
    with pytest.raises(NetworkError, match="not a network one"):
        netns.write_sysctl(holder, "kernel.hostname", "x")


def test_a_socket_not_served_by_the_recorded_pid_is_refused(holder: str) -> None:
    path = userns.records_dir() / f"{holder}.json"
    rec = json.loads(path.read_text())
    path.write_text(json.dumps({**rec, "pid": os.getpid()}))
    try:
        with pytest.raises(NetworkError, match="is not served by its holder"):
            netns.run(holder, ["nft", "list", "ruleset"])
    finally:
        path.write_text(json.dumps(rec))


def test_removing_it_leaves_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _forced_rootless(monkeypatch, tmp_path)
    netns.create(NAME)
    pid = json.loads((userns.records_dir() / f"{NAME}.json").read_text())["pid"]
    netns.remove(NAME)
    assert userns.process_start_time(pid) is None
    assert not netns.exists(NAME) and list(userns.records_dir().iterdir()) == []
