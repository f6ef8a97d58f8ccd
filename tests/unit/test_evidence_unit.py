"""Evidence parsing and naming (pure): a hostile guest's output is capped, sanitised and
bounded; file names from node ids are safe; settings errors name their source."""

from __future__ import annotations

import time

import pytest

from pytest_smolvm.errors import ConfigError
from pytest_smolvm.evidence import (
    MAX_FILES,
    MAX_PROCESSES,
    Evidence,
    GuestReported,
    HostMeasured,
    combined_properties,
    compare,
    parse_guest,
    safe_file_name,
)
from pytest_smolvm.settings import evidence_settings

GOOD = (b"@cgroup\nmemory.peak 224403456 \ncpu.stat user_usec 800000\ncpu.stat system_usec 200000\n"
        b"memory.events oom_kill 2\n@stat\nforks 116\n@mounts\next4 /\ntmpfs /run\n@procs\n111 sleep 1000\n"
        b"@files\nf 644 3 /root/new\0d 700 4096 /root\0")


def test_a_normal_report_parses() -> None:
    g, entries = parse_guest(GOOD)
    assert (g.memory_peak_bytes, g.cpu_user_s, g.oom_kills, g.forks_since_boot) == (224403456, 0.8, 2, 116)
    assert [p.argv for p in g.processes] == ["sleep 1000"] and g.excluded_mounts == ("tmpfs /run",)
    assert entries == [("f", "644", "/root/new", 3), ("d", "700", "/root", 4096)]
    rows = compare(entries, {"/root": {"old"}, "/": {"root"}}, g.excluded_mounts)
    assert rows == [("/root/new", "created", "f", "644", 3), ("/root", "changed", "d", "700", 4096)]


def test_lies_and_floods_are_bounded() -> None:
    junk = (b"@cgroup\nmemory.peak 999999999999999999999999\ncpu.stat user_usec -5\nmemory.events oom_kill x\n"
            b"@procs\n" + b"".join(b"%d \x1b[2J" % i + b"A" * 10_000 + b"\n" for i in range(10_000))
            + b"@files\n" + b"f 644 1 /\x1b]0;t\x07\n" * 100_000)
    t0 = time.monotonic()
    g, entries = parse_guest(junk)
    assert time.monotonic() - t0 < 5
    assert g.memory_peak_bytes is None and g.cpu_user_s is None and g.oom_kills is None
    assert len(g.processes) == MAX_PROCESSES and g.processes_more
    assert all("\x1b" not in p.argv and len(p.argv) < 400 for p in g.processes)
    assert len(entries) <= 2001


def test_rendering_says_who_measured_what() -> None:
    ev = Evidence("vm1", HostMeasured(1.0, 0.5, 0.1, 300 << 20, 4096), GuestReported(memory_peak_bytes=200 << 20))
    text = ev.render()
    assert text.startswith("host-measured: wall 1.00s")
    assert "guest-reported (cgroup smolvm): memory peak 200.0 MiB" in text
    assert Evidence("vm1", ev.host_measured, None).render().endswith("guest-reported: not gathered")
    assert MAX_FILES == 200


def test_properties_combine_over_a_tests_vms() -> None:
    a = Evidence("a", HostMeasured(1.0, 0.5, 0.1, 100, 10), None)
    b = Evidence("b", HostMeasured(2.0, 0.25, 0.1, 300, 5), None)
    props = dict(combined_properties([a, b]))
    assert props["smolvm_vms"] == 2 and props["smolvm_wall_s"] == 2.0 and props["smolvm_vmm_cpu_user_s"] == 0.75
    assert props["smolvm_vmm_peak_rss_bytes"] == 300 and props["smolvm_disk_written_bytes"] == 15
    assert combined_properties([]) == []


@pytest.mark.parametrize("nodeid", ["t.py::test_x[a/b]", "t.py::test_x[../../etc]", "t.py::test_\x1b[31m\n",
                                    "x" * 5000])
def test_file_names_are_safe_and_distinct(nodeid: str) -> None:
    name = safe_file_name(nodeid)
    assert "/" not in name and not name.startswith(".") and len(name) < 160 and name.endswith(".json")
    assert name != safe_file_name(nodeid + "1")


def test_settings_precedence_and_errors() -> None:
    assert evidence_settings({}, {}, {}) == ("failed", None)
    assert evidence_settings({"evidence": "all"}, {"SMOLVM_EVIDENCE": "none"}, {"evidence": "failed"})[0] == "all"
    with pytest.raises(ConfigError, match=r"invalid evidence mode 'x' \(from environment variable SMOLVM_EVIDENCE\)"):
        evidence_settings({}, {"SMOLVM_EVIDENCE": "x"}, {})


@pytest.mark.parametrize(("fields", "expected"), [
    ({"cpu_user_us": 1_500_000, "cpu_system_us": 250_000, "peak_rss_kib": 2048}, (1.5, 0.25, 2 * 1024 * 1024)),
    ({}, None),  # an agent from before evidence
    ({"cpu_user_us": -1, "cpu_system_us": 0, "peak_rss_kib": 0}, None),
    ({"cpu_user_us": 1 << 60, "cpu_system_us": 0, "peak_rss_kib": 0}, None),
    ({"cpu_user_us": 1.5, "cpu_system_us": 0, "peak_rss_kib": 0}, None),
    ({"cpu_user_us": True, "cpu_system_us": 0, "peak_rss_kib": 0}, None),
    ({"cpu_user_us": "9", "cpu_system_us": 0, "peak_rss_kib": 0}, None),
])
def test_a_commands_usage_is_believed_only_when_sane_and_never_fails_the_command(
        fields: dict[str, object], expected: tuple[float, float, int] | None) -> None:
    from pytest_smolvm.guest import replies

    reply = replies.parse_exec({"op": "result", "exit_code": 0, "timed_out": False, "stdout_len": 2,
                                "stdout_truncated": False, "stderr_truncated": False, **fields}, b"ok")
    assert isinstance(reply, replies.ExecReply) and reply.exit_code == 0 and reply.stdout == b"ok"
    usage = reply.usage
    assert (None if usage is None else (usage.cpu_user_s, usage.cpu_system_s, usage.peak_rss_bytes)) == expected


def test_proc_net_dev_parses_by_interface_even_when_a_counter_touches_the_colon() -> None:
    from pytest_smolvm.network.netns import parse_net_dev

    text = ("Inter-|   Receive |  Transmit\n face |bytes packets ...\n"
            "    lo:       0       0    0    0    0     0          0         0        0       0    0    0    0 0 0 0\n"
            "sv1a2:12345678901 120 0 0 0 0 0 0 3582 7 0 0 0 0 0 0\n"
            "junk: x y\n")
    found = parse_net_dev(text)
    assert found["sv1a2"] == {"rx_bytes": 12345678901, "rx_packets": 120, "tx_bytes": 3582, "tx_packets": 7}
    assert set(found) == {"lo", "sv1a2"}
