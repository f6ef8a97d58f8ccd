"""The capped guest-output log and its collector thread, on real files and pipes."""

from __future__ import annotations

import os
from pathlib import Path

from pytest_smolvm.drivers.consolelog import COLLECTOR, CappedLog, read_bounded
from pytest_smolvm.reporting import tail


def test_under_the_caps_the_file_is_the_whole_stream(tmp_path: Path) -> None:
    log = CappedLog(tmp_path / "c.log", head=100, tail=100)
    for chunk in (b"boot\n", b"x" * 90, b"\nmore\n"):
        log.feed(chunk)
    log.finish()
    assert (tmp_path / "c.log").read_bytes() == b"boot\n" + b"x" * 90 + b"\nmore\n"
    assert log.cut == 0


def test_a_flood_keeps_head_marker_and_rolling_tail(tmp_path: Path) -> None:
    log = CappedLog(tmp_path / "c.log", head=1000, tail=1000)
    stream = b"".join(b"line %06d\n" % i for i in range(50_000))  # 550 kB
    for i in range(0, len(stream), 4093):
        log.feed(stream[i:i + 4093])
        log.flush()
    log.finish()
    data = (tmp_path / "c.log").read_bytes()
    cut = len(stream) - 2000
    marker = f"\n[... {cut} bytes of console output cut ...]\n".encode()
    assert data == stream[:1000] + marker + stream[-1000:]
    assert log.total == len(stream) and log.cut == cut


def test_overlong_lines_are_cut_and_marked(tmp_path: Path) -> None:
    log = CappedLog(tmp_path / "c.log", head=1 << 20, tail=1 << 20, max_line=10)
    for chunk in (b"short\n", b"a" * 7, b"b" * 30, b"\nok\n", b"c" * 25):
        log.feed(chunk)
    log.finish()
    assert (tmp_path / "c.log").read_bytes() == (
        b"short\naaaaaaabbb [... 27 bytes of this line cut ...]\nok\ncccccccccc [... 15 bytes of this line cut ...]")


def test_collector_drains_a_pipe_and_finishes_at_eof(tmp_path: Path) -> None:
    r, w = os.pipe()
    log = CappedLog(tmp_path / "c.log", head=64, tail=64)
    COLLECTOR.add(r, log)
    payload = b"".join(b"%d\n" % i for i in range(20_000))
    for i in range(0, len(payload), 1000):
        os.write(w, payload[i:i + 1000])
    os.close(w)
    assert log.closed.wait(10)
    data = (tmp_path / "c.log").read_bytes()
    assert data.startswith(payload[:64]) and data.endswith(payload[-64:])
    assert f"[... {len(payload) - 128} bytes of console output cut ...]".encode() in data


def test_readers_are_bounded(tmp_path: Path) -> None:
    big = tmp_path / "big.log"
    big.write_bytes(b"A" * 5000 + b"B" * 5000)
    text = read_bounded(big, 1000)
    assert text.startswith("A" * 500) and text.endswith("B" * 500)
    assert "[... 9000 bytes of big.log not read ...]" in text and len(text) < 1100
    assert read_bounded(tmp_path / "missing") == ""
    long = "start\n" + "z" * 100_000 + "\nend"
    assert tail(long, 2, max_line=50) == "z" * 50 + " [... line cut at 50 chars]\nend"
