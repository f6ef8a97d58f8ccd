"""A session VM amortises boot over many tests that don't need isolation from each other."""

from __future__ import annotations


def test_tool_versions(smolvm_session):
    r = smolvm_session.run("python3 --version")
    assert r.stdout.startswith("Python 3.")


def test_files_round_trip(smolvm_session, tmp_path):
    data = b"\x00\x01 binary and text \xff"
    smolvm_session.put(data, "/tmp/data.bin")
    assert smolvm_session.get("/tmp/data.bin") == data
