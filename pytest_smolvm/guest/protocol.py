"""Framing of the host <-> guest-agent control channel.

This module is shared verbatim by the host and the guest agent, so it uses the standard
library only and must run on the guest's Python (Debian 12: 3.11). It imports no pure-Python
module on the guest's boot path: under TCG every import costs tens of milliseconds of boot
time, so JSON goes through ``_json``'s C scanner and encoder directly (the same code
:func:`json.loads`/:func:`json.dumps` run), falling back to :mod:`json` where ``_json`` is absent.

A frame is ``MAGIC (2 bytes) | header length (u32 BE) | body length (u32 BE)`` followed by
a UTF-8 JSON object (the header) and ``body length`` raw bytes. Every header carries ``op``
and, for request/response pairs, an integer ``id``. Both lengths are checked against the
reader's limits *before* anything is allocated, so a hostile peer cannot make the reader
buffer more than it allows.
"""

from __future__ import annotations

import _struct

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

MAGIC = b"SV"
PREFIX = _struct.Struct(">2sII")
MAX_HEADER = 64 * 1024
PROTOCOL_VERSION = 2


class FrameError(Exception):
    """A frame violated the protocol (bad magic, oversize, malformed header)."""


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _unserialisable(obj: object) -> Any:
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


try:
    import _json

    class _ScanContext:
        strict = True
        object_hook = None
        object_pairs_hook = None
        parse_float = float
        parse_int = int
        parse_constant = staticmethod(_reject_constant)
        memo: dict[str, Any] = {}  # noqa: RUF012 - read by the C scanner

    _scan = _json.make_scanner(_ScanContext())  # type: ignore[arg-type]
    _encode = _json.make_encoder(
        None, _unserialisable, _json.encode_basestring_ascii, None, ":", ",", False, False, False
    )

    def dumps(obj: Any) -> str:
        return "".join(_encode(obj, 0))

    def loads(text: str) -> Any:
        try:
            obj, end = _scan(text, 0)
        except StopIteration:
            raise ValueError("not a JSON document") from None
        if end != len(text):
            raise ValueError(f"extra data after JSON at offset {end}")
        return obj

except ImportError:  # pragma: no cover - every CPython build has _json
    import json

    def dumps(obj: Any) -> str:
        return json.dumps(obj, separators=(",", ":"), allow_nan=False)

    def loads(text: str) -> Any:
        return json.loads(text, parse_constant=_reject_constant)


def encode(header: dict[str, Any], body: bytes = b"") -> bytes:
    """Serialise one frame."""
    raw = dumps(header).encode()
    if len(raw) > MAX_HEADER:
        raise FrameError(f"header of {len(raw)} bytes exceeds {MAX_HEADER}")
    return PREFIX.pack(MAGIC, len(raw), len(body)) + raw + body


def decode(
    read_exact: Callable[[int], bytes], max_body: int | Callable[[dict[str, Any]], int]
) -> tuple[dict[str, Any], bytes]:
    """Read one frame with ``read_exact(n)`` (which returns exactly n bytes or raises).

    ``max_body`` is the body limit, or a function giving it for the frame's header (checked
    after the header, which is bounded by :data:`MAX_HEADER`, and before the body is read).
    Raises :class:`FrameError` for a frame that breaks the protocol; the caller must then
    drop the connection, since the stream can no longer be trusted to be in sync.
    """
    magic, hlen, blen = PREFIX.unpack(read_exact(PREFIX.size))
    if magic != MAGIC:
        raise FrameError(f"bad frame magic {magic!r}")
    if hlen == 0 or hlen > MAX_HEADER:
        raise FrameError(f"header length {hlen} outside 1..{MAX_HEADER}")
    if not callable(max_body) and blen > max_body:
        raise FrameError(f"body length {blen} exceeds the limit of {max_body} bytes")
    try:
        header = loads(read_exact(hlen).decode())
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise FrameError(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict) or not isinstance(header.get("op"), str):
        raise FrameError("header must be a JSON object with a string 'op'")
    if callable(max_body) and blen > (limit := max_body(header)):
        raise FrameError(f"body length {blen} exceeds the limit of {limit} bytes")
    body = read_exact(blen) if blen else b""
    return header, body
