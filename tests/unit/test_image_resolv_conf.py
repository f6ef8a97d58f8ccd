"""The image build keeps none of the build host's identity: no resolv.conf (a networked
guest's is written at setup, naming the run's resolver), a neutral hostname, no machine-id."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_smolvm.images.build import _customise_rootfs


@pytest.mark.parametrize("kind", ["file", "symlink", "dangling symlink", "absent"])
def test_the_build_hosts_resolv_conf_is_dropped(tmp_path: Path, kind: str) -> None:
    root, out = tmp_path / "root", tmp_path / "out"
    (root / "etc").mkdir(parents=True)
    out.mkdir()
    host_file = tmp_path / "host-resolv.conf"
    host_file.write_text("nameserver 127.0.0.53\n")
    conf = root / "etc/resolv.conf"
    if kind == "file":
        conf.write_text("nameserver 10.1.2.3\nsearch corp.internal\n")
    elif kind == "symlink":
        conf.symlink_to(host_file)
    elif kind == "dangling symlink":
        conf.symlink_to("../run/systemd/resolve/stub-resolv.conf")
    _customise_rootfs(root, out)
    assert not conf.exists() and not conf.is_symlink()
    assert host_file.read_text() == "nameserver 127.0.0.53\n"  # a link's target is never touched
    assert (root / "etc/hostname").read_text() == "smolvm\n"
    assert (root / "etc/machine-id").read_text() == ""
