"""Markers give a test the VM it needs; the guest sees exactly that."""

from __future__ import annotations

import pytest


@pytest.mark.smolvm(vcpus=2, memory_mib=384)
def test_two_cpus_and_384_mib(smolvm):
    assert smolvm.run("nproc").stdout.strip() == "2"
    mem_kib = int(smolvm.run("awk '/MemTotal/ {print $2}' /proc/meminfo").stdout)
    assert 300 * 1024 < mem_kib <= 384 * 1024


@pytest.mark.smolvm(disk_size_mib=2048)
def test_bigger_disk(smolvm):
    size_mib = int(smolvm.run("df -m --output=size / | tail -1").stdout)
    assert size_mib > 1900


def test_factory_for_several_machines(smolvm_factory):
    small = smolvm_factory(memory_mib=192)
    big = smolvm_factory(memory_mib=512, vcpus=2)
    assert small.run("nproc").stdout.strip() == "1"
    assert big.run("nproc").stdout.strip() == "2"
