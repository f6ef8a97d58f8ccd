"""The CLI's shell finds a kept VM's control socket through the driver layer
(drivers.connect_kept), not by a file name of its own."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from pytest_smolvm.drivers import connect_kept
from pytest_smolvm.drivers.qemu import CONTROL_NAME


def test_a_qemu_vm_directory_is_reached_through_its_control_socket(tmp_path: Path) -> None:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(tmp_path / CONTROL_NAME))
    server.listen(1)
    with server, connect_kept(tmp_path) as client:
        peer, _ = server.accept()
        with peer:
            client.sendall(b"ping")
            assert peer.recv(4) == b"ping"


def test_a_directory_without_a_socket_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        connect_kept(tmp_path)
