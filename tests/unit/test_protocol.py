"""Unit tests of pytest_smolvm.guest.protocol: frame encoding and hostile-input decoding."""

from __future__ import annotations

import json
import random
import struct

import pytest

from pytest_smolvm.guest import protocol
from pytest_smolvm.guest.protocol import MAGIC, MAX_HEADER, PREFIX, FrameError, decode, encode


class Reader:
    """``read_exact`` over a byte string that records every request and raises EOFError
    instead of returning short reads."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.requests: list[int] = []

    def __call__(self, n: int) -> bytes:
        self.requests.append(n)
        if self.pos + n > len(self.data):
            raise EOFError(f"wanted {n} bytes at {self.pos}, have {len(self.data) - self.pos}")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    @property
    def remaining(self) -> int:
        return len(self.data) - self.pos


def raw_frame(header_bytes: bytes, body: bytes = b"", magic: bytes = MAGIC) -> bytes:
    return PREFIX.pack(magic, len(header_bytes), len(body)) + header_bytes + body


# ---------------------------------------------------------------- round trip


@pytest.mark.parametrize(
    "header",
    [
        {"op": "ping"},
        {"op": "exec", "id": 7, "argv": ["/bin/sh", "-c", "echo hi"], "env": {"A": "b"}},
        {"op": "ünïcødé ✓", "text": "日本語 \u2028 \U0001f600 \x00 tab\t nl\n", "quote": '"\\'},
        {"op": "x", "nested": [[1, [2, [3, {"k": [True, False, None]}]]], []], "empty": {}},
        {"op": "x", "t": True, "f": False, "n": None, "float": 1.5, "neg": -0.25, "big": 2**62,
         "tiny": 5e-324, "exp": 1.0e300},
    ],
)
def test_round_trip_headers(header: dict[str, object]) -> None:
    frame = encode(header, b"payload")
    reader = Reader(frame)
    got, body = decode(reader, max_body=1 << 20)
    assert got == header
    assert body == b"payload"
    assert reader.remaining == 0


@pytest.mark.parametrize(
    "body",
    [b"", b"\x00", bytes(range(256)), b"SV" + b"\xff" * 13, bytes(1 << 20)],
    ids=["empty", "nul", "all-bytes", "magic-like", "1MiB"],
)
def test_round_trip_bodies(body: bytes) -> None:
    frame = encode({"op": "put", "id": 1}, body)
    reader = Reader(frame)
    header, got = decode(reader, max_body=1 << 20)
    assert header == {"op": "put", "id": 1}
    assert got == body
    assert reader.remaining == 0


def test_random_body_round_trip() -> None:
    rng = random.Random(99)
    body = rng.randbytes(1 << 20)
    _, got = decode(Reader(encode({"op": "get"}, body)), max_body=len(body))
    assert got == body


def test_body_at_exact_limit_is_accepted() -> None:
    _, got = decode(Reader(encode({"op": "x"}, b"abcd")), max_body=4)
    assert got == b"abcd"


def test_frames_back_to_back() -> None:
    stream = encode({"op": "a", "id": 1}, b"one") + encode({"op": "b", "id": 2}) + encode({"op": "c"}, b"3")
    reader = Reader(stream)
    got = [decode(reader, max_body=100) for _ in range(3)]
    assert got == [({"op": "a", "id": 1}, b"one"), ({"op": "b", "id": 2}, b""), ({"op": "c"}, b"3")]
    assert reader.remaining == 0


def test_frame_layout() -> None:
    frame = encode({"op": "ping", "id": 3}, b"xyz")
    magic, hlen, blen = struct.unpack(">2sII", frame[:10])
    assert magic == b"SV"
    assert blen == 3
    assert json.loads(frame[10:10 + hlen]) == {"op": "ping", "id": 3}
    assert frame[10 + hlen:] == b"xyz"
    # The header is plain ASCII JSON (non-ASCII is escaped), so any JSON reader accepts it.
    assert encode({"op": "日本"})[10:].isascii()


def test_encode_rejects_oversize_header() -> None:
    with pytest.raises(FrameError):
        encode({"op": "x", "pad": "a" * MAX_HEADER})


def test_encode_rejects_nan() -> None:
    with pytest.raises(ValueError, match=r"(?i)float|json"):
        encode({"op": "x", "v": float("nan")})


def test_encode_rejects_unserialisable() -> None:
    with pytest.raises(TypeError, match="bytes"):
        encode({"op": "x", "v": b"raw"})


# ---------------------------------------------------------------- rejection


def expect_frame_error(data: bytes, max_body: int = 1 << 20) -> Reader:
    reader = Reader(data)
    with pytest.raises(FrameError):
        decode(reader, max_body)
    return reader


def test_bad_magic() -> None:
    good = encode({"op": "x"})
    reader = expect_frame_error(b"XX" + good[2:])
    assert reader.requests == [PREFIX.size]  # nothing read past the prefix


def test_header_length_zero() -> None:
    reader = expect_frame_error(PREFIX.pack(MAGIC, 0, 0))
    assert reader.requests == [PREFIX.size]


def test_header_longer_than_max() -> None:
    # Only the prefix is sent: the decoder must refuse before trying to read the header.
    reader = expect_frame_error(PREFIX.pack(MAGIC, MAX_HEADER + 1, 0))
    assert reader.requests == [PREFIX.size]


def test_header_length_max_u32() -> None:
    reader = expect_frame_error(PREFIX.pack(MAGIC, 0xFFFFFFFF, 0))
    assert reader.requests == [PREFIX.size]


def test_header_at_max_is_accepted() -> None:
    pad = MAX_HEADER - len(json.dumps({"op": "x", "p": ""}, separators=(",", ":")))
    header = json.dumps({"op": "x", "p": "a" * pad}, separators=(",", ":")).encode()
    assert len(header) == MAX_HEADER
    got, _ = decode(Reader(raw_frame(header)), max_body=0)
    assert got["op"] == "x"


@pytest.mark.parametrize("blen", [101, 1 << 31, 0xFFFFFFFF])
def test_body_over_max_is_not_read(blen: int) -> None:
    header = b'{"op":"x"}'
    # Only prefix + header exist: if the decoder tried to read the body it would hit EOF.
    data = PREFIX.pack(MAGIC, len(header), blen) + header
    reader = expect_frame_error(data, max_body=100)
    assert blen not in reader.requests
    assert sum(reader.requests) <= PREFIX.size + len(header)


@pytest.mark.parametrize(
    "header",
    [
        b"not json",
        b"{",
        b"{'op': 'x'}",
        b'{"op": "x"',
        b'{"op": "x"}}',
        b'{"op": "x"} ',
        b'{"op": "x"}garbage',
        b'{"op": "x"}{"op": "y"}',
        b'{"op": "x"}\x00',
        b' {"op": "x"}',
    ],
    ids=["text", "open", "single-quotes", "unterminated", "extra-brace", "trailing-space",
         "trailing-garbage", "two-objects", "trailing-nul", "leading-space"],
)
def test_header_not_a_single_json_document(header: bytes) -> None:
    expect_frame_error(raw_frame(header))


@pytest.mark.parametrize(
    "header",
    [b'["op", "x"]', b'"op"', b"42", b"null", b"true", b"[]"],
)
def test_header_json_but_not_object(header: bytes) -> None:
    expect_frame_error(raw_frame(header))


@pytest.mark.parametrize(
    "header",
    [b"{}", b'{"id": 1}', b'{"op": 1}', b'{"op": null}', b'{"op": ["x"]}', b'{"OP": "x"}'],
)
def test_header_without_string_op(header: bytes) -> None:
    expect_frame_error(raw_frame(header))


@pytest.mark.parametrize(
    "header",
    [b'{"op": "x", "v": NaN}', b'{"op": "x", "v": Infinity}', b'{"op": "x", "v": -Infinity}',
     b'{"op": "x", "v": [1, NaN]}'],
)
def test_nan_and_infinity_constants_rejected(header: bytes) -> None:
    expect_frame_error(raw_frame(header))


@pytest.mark.parametrize(
    "header",
    [b'{"op": "\xff"}', b'{"op": "\xc3"}', b'{"op": "x", "s": "\xed\xa0\x80"}', b"\x80\x81"],
    ids=["ff", "truncated-seq", "encoded-surrogate", "continuation-bytes"],
)
def test_invalid_utf8_rejected(header: bytes) -> None:
    expect_frame_error(raw_frame(header))


def test_control_character_in_string_rejected() -> None:
    expect_frame_error(raw_frame(b'{"op": "a\nb"}'))


def test_deeply_nested_header_rejected_not_crashing() -> None:
    depth = 30000
    header = b'{"op": "x", "v": ' + b"[" * depth + b"]" * depth + b"}"
    assert len(header) <= MAX_HEADER
    # Nesting deeper than the interpreter's recursion limit is a FrameError, not a crash.
    expect_frame_error(raw_frame(header), max_body=0)


def test_short_stream_propagates_reader_error() -> None:
    frame = encode({"op": "x"}, b"body")
    for cut in (0, 5, PREFIX.size, PREFIX.size + 3, len(frame) - 1):
        with pytest.raises(EOFError):
            decode(Reader(frame[:cut]), max_body=100)


# ---------------------------------------------------------------- fuzz


def _mutations(rng: random.Random) -> bytes:
    kind = rng.randrange(5)
    if kind == 0:  # pure noise
        return rng.randbytes(rng.randrange(0, 64))
    if kind == 1:  # valid prefix, noise after
        hlen = rng.randrange(0, 80)
        return PREFIX.pack(MAGIC, hlen, rng.randrange(0, 40)) + rng.randbytes(rng.randrange(0, 120))
    if kind == 2:  # valid frame with flipped bytes
        frame = bytearray(encode({"op": "exec", "id": rng.randrange(1000), "argv": ["a", "b"],
                                  "v": [1.5, None, True, "é"]}, rng.randbytes(rng.randrange(0, 20))))
        for _ in range(rng.randrange(1, 4)):
            frame[rng.randrange(len(frame))] = rng.randrange(256)
        return bytes(frame)
    if kind == 3:  # valid prefix, JSON-ish noise
        alphabet = b'{}[]":,0123456789.eE+-tfrunalsNIiy \\u"op'
        header = bytes(rng.choice(alphabet) for _ in range(rng.randrange(1, 60)))
        return raw_frame(header, rng.randbytes(rng.randrange(0, 8)))
    # valid frame truncated
    frame = encode({"op": "x", "id": 1}, b"0123456789")
    return frame[:rng.randrange(len(frame))]


def test_fuzz_decode_only_raises_frame_error_or_eof() -> None:
    rng = random.Random(1234)
    outcomes = {"ok": 0, "frame": 0, "eof": 0}
    for _ in range(2000):
        data = _mutations(rng)
        reader = Reader(data)
        try:
            header, body = decode(reader, max_body=64)
        except FrameError:
            outcomes["frame"] += 1
            continue
        except EOFError:
            outcomes["eof"] += 1
            continue
        assert isinstance(header, dict)
        assert isinstance(header["op"], str)
        assert isinstance(body, bytes)
        assert len(body) <= 64
        outcomes["ok"] += 1
    # The generator reaches every outcome, so the loop really exercised the parser.
    assert all(outcomes.values()), outcomes


def test_dumps_loads_helpers_agree_with_json() -> None:
    obj = {"op": "x", "a": [1, 2.5, "ü", None, True], "b": {"c": ""}}
    assert json.loads(protocol.dumps(obj)) == obj
    assert protocol.loads(json.dumps(obj)) == obj
