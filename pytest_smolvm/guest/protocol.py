"""Framing of the host <-> guest-agent control channel.

This module is shared verbatim by the host and the guest agent, so it uses the standard
library only and must run on the guest's Python (Debian 12: 3.11).

A frame is ``MAGIC (2 bytes) | header length (u32 BE) | body length (u32 BE)`` followed by
a UTF-8 JSON object (the header) and ``body length`` raw bytes. Every header carries ``op``
and, for request/response pairs, an integer ``id``. Both lengths are checked against the
reader's limits *before* anything is allocated, so a hostile peer cannot make the reader
buffer more than it allows.
"""

from __future__ import annotations

import json
import struct
from typing import Any, Callable

MAGIC = b"SV"
PREFIX = struct.Struct(">2sII")
MAX_HEADER = 64 * 1024
PROTOCOL_VERSION = 1


class FrameError(Exception):
    """A frame violated the protocol (bad magic, oversize, malformed header)."""


def encode(header: dict[str, Any], body: bytes = b"") -> bytes:
    """Serialise one frame."""
    raw = json.dumps(header, separators=(",", ":")).encode()
    if len(raw) > MAX_HEADER:
        raise FrameError(f"header of {len(raw)} bytes exceeds {MAX_HEADER}")
    return PREFIX.pack(MAGIC, len(raw), len(body)) + raw + body


def decode(
    read_exact: Callable[[int], bytes], max_body: int
) -> tuple[dict[str, Any], bytes]:
    """Read one frame with ``read_exact(n)`` (which returns exactly n bytes or raises).

    Raises :class:`FrameError` for a frame that breaks the protocol; the caller must then
    drop the connection, since the stream can no longer be trusted to be in sync.
    """
    magic, hlen, blen = PREFIX.unpack(read_exact(PREFIX.size))
    if magic != MAGIC:
        raise FrameError(f"bad frame magic {magic!r}")
    if hlen == 0 or hlen > MAX_HEADER:
        raise FrameError(f"header length {hlen} outside 1..{MAX_HEADER}")
    if blen > max_body:
        raise FrameError(f"body length {blen} exceeds the limit of {max_body} bytes")
    try:
        header = json.loads(read_exact(hlen))
    except (UnicodeDecodeError, ValueError) as exc:
        raise FrameError(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict) or not isinstance(header.get("op"), str):
        raise FrameError("header must be a JSON object with a string 'op'")
    body = read_exact(blen) if blen else b""
    return header, body
