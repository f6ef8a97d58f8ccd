"""What the run's resolver answers a VM, decided without sockets (pure but for the clock).

Wire format by dnslib: this module never parses bytes itself. :func:`decide` judges one
request against the VM's :class:`NamePolicy`; :class:`Ledger` remembers what was denied
(bounded); :class:`RateLimit` is the per-VM token bucket; :class:`Cache` the bounded answer
cache shared by a process's resolvers; :func:`answer_addresses` what an answer allows.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import threading
import time
from collections.abc import Sequence
from typing import Final

from dnslib import CLASS, OPCODE, QTYPE, RCODE, RR, DNSRecord

from .names import name_allowed, query_name

#: Queries per second a VM may send, and its burst; beyond, REFUSED (and counted).
RATE_PER_S: Final = 50.0
RATE_BURST: Final = 200.0
#: Names the ledger itemises per VM; beyond, denials are only counted.
LEDGER_SIZE: Final = 1024
#: Answers the process's cache holds (least recently used goes first).
CACHE_SIZE: Final = 4096
#: Element timeouts (seconds) an answer's TTL is held to: below MIN_TTL a client could not
#: connect before the address expired; above MAX_TTL a stale address would stay open.
MIN_TTL: Final = 30
MAX_TTL: Final = 86400
#: Answers (records) accepted from an upstream for one query.
MAX_ANSWER_RECORDS: Final = 64


class Mode(enum.Enum):
    """What a VM's resolver does: nothing (``isolated``, ``none``), allowed names only
    (``nat`` with ``allow``), or every name (``nat``)."""

    REFUSE = "refuse"
    NAMES = "names"
    ANY = "any"


@dataclasses.dataclass(frozen=True)
class NamePolicy:
    mode: Mode
    names: tuple[str, ...] = ()

    @classmethod
    def of(cls, policy: str, names: Sequence[str], has_networks: bool) -> NamePolicy:
        """``nat`` without any allow entry resolves everything; ``nat`` with an allow list
        resolves its names only (none if it lists only networks); the rest nothing."""
        if policy != "nat":
            return cls(Mode.REFUSE)
        if not names and not has_networks:
            return cls(Mode.ANY)
        return cls(Mode.NAMES, tuple(names))


class Verdict(enum.Enum):
    FORWARD = "forward"      # ask the upstream (or the cache)
    NXDOMAIN = "nxdomain"    # a name the policy does not allow: recorded by name
    REFUSED = "refused"      # this VM gets nothing from the resolver
    EMPTY = "empty"          # allowed, but nothing to say (AAAA: the VMs have no IPv6)
    FORMERR = "formerr"      # not one well-formed question


@dataclasses.dataclass(frozen=True)
class Decision:
    verdict: Verdict
    name: str = ""
    why: str = ""


def parse(data: bytes) -> DNSRecord | None:
    """A message from the wire, or None if dnslib cannot make one of it (whatever it raises:
    the bytes are hostile, and a parser's surprise must not stop the resolver)."""
    try:
        return DNSRecord.parse(data)
    except Exception:
        return None


def decide(request: DNSRecord, policy: NamePolicy) -> Decision:
    """The verdict on one parsed request. Only a single ``IN`` question of a standard query
    is answered; a name is judged only after :func:`~.names.query_name` accepted it."""
    if request.header.qr or request.header.opcode != OPCODE.QUERY or len(request.questions) != 1:
        return Decision(Verdict.FORMERR, why="not one standard query")
    q = request.questions[0]
    name, bad = query_name(list(q.qname.label))
    if q.qclass != CLASS.IN:
        return Decision(Verdict.REFUSED, name, "class is not IN")
    if policy.mode is Mode.REFUSE:
        return Decision(Verdict.REFUSED, name, "the VM's policy resolves no name")
    if bad is not None:
        return Decision(Verdict.NXDOMAIN, name, bad)
    if policy.mode is Mode.NAMES and not name_allowed(name, policy.names):
        return Decision(Verdict.NXDOMAIN, name, "not in allow")
    if q.qtype in (QTYPE.AAAA, QTYPE.ANY):
        return Decision(Verdict.EMPTY, name, "VMs have no IPv6" if q.qtype == QTYPE.AAAA else "ANY is not answered")
    return Decision(Verdict.FORWARD, name)


def reply(request: DNSRecord, verdict: Verdict) -> DNSRecord:
    """The reply to ``request`` for a verdict that needs no upstream."""
    r = request.reply()
    r.header.rcode = {Verdict.NXDOMAIN: RCODE.NXDOMAIN, Verdict.REFUSED: RCODE.REFUSED,
                      Verdict.FORMERR: RCODE.FORMERR, Verdict.EMPTY: RCODE.NOERROR}[verdict]
    r.header.ra = 1
    return r


def answer_addresses(answer: DNSRecord) -> dict[str, int]:
    """IPv4 address -> TTL of the A records in an upstream's answer section (first
    ``MAX_ANSWER_RECORDS`` records; the CNAMEs leading to them are the upstream's business)."""
    out: dict[str, int] = {}
    for rr in answer.rr[:MAX_ANSWER_RECORDS]:
        if rr.rtype == QTYPE.A and rr.rclass == CLASS.IN:
            addr = str(rr.rdata)
            out[addr] = max(out.get(addr, 0), int(rr.ttl))
    return out


def element_timeout(ttl: int) -> int:
    return min(max(ttl, MIN_TTL), MAX_TTL)


def matches(request: DNSRecord, answer: DNSRecord) -> bool:
    """Whether ``answer`` answers ``request`` (id, and the same single question)."""
    return (answer.header.qr == 1 and answer.header.id == request.header.id and len(answer.questions) == 1
            and len(request.questions) == 1
            and answer.questions[0].qname == request.questions[0].qname
            and answer.questions[0].qtype == request.questions[0].qtype)


@dataclasses.dataclass
class Ledger:
    """Denied lookups of one VM by name (bounded), and what was refused for rate or
    answered with nothing."""

    size: int = LEDGER_SIZE
    denied: dict[str, int] = dataclasses.field(default_factory=dict)
    unitemised: int = 0
    rate_refused: int = 0
    upstream_failures: int = 0
    malformed: int = 0
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    def deny(self, name: str) -> None:
        with self._lock:
            if name in self.denied or len(self.denied) < self.size:
                self.denied[name] = self.denied.get(name, 0) + 1
            else:
                self.unitemised += 1

    def count_rate(self) -> None:
        with self._lock:
            self.rate_refused += 1

    def count_bad(self) -> None:
        with self._lock:
            self.malformed += 1

    def count_failure(self) -> None:
        with self._lock:
            self.upstream_failures += 1

    def names(self) -> list[tuple[str, int]]:
        with self._lock:
            return sorted(self.denied.items())


class RateLimit:
    """A token bucket: ``rate`` per second, ``burst`` at most."""

    def __init__(self, rate: float = RATE_PER_S, burst: float = RATE_BURST) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = burst
        self.at = time.monotonic()

    def take(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class Cache:
    """Answers by (upstreams, name, type), until their smallest TTL runs out; at most
    ``size`` entries. Thread-safe."""

    def __init__(self, size: int = CACHE_SIZE) -> None:
        self.size = size
        self._data: collections.OrderedDict[tuple[str, str, int], tuple[float, bytes]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: tuple[str, str, int], request: DNSRecord, now: float | None = None) -> DNSRecord | None:
        """The cached answer for ``request`` with its TTLs aged, or None."""
        now = time.monotonic() if now is None else now
        with self._lock:
            found = self._data.get(key)
            if found is None:
                return None
            expires, packed = found
            if expires <= now:
                del self._data[key]
                return None
            self._data.move_to_end(key)
        answer = DNSRecord.parse(packed)
        answer.header.id = request.header.id
        left = int(expires - now)
        for rr in answer.rr + answer.auth + answer.ar:
            rr.ttl = min(rr.ttl, left)
        return answer

    def put(self, key: tuple[str, str, int], answer: DNSRecord, now: float | None = None) -> None:
        ttls = [rr.ttl for rr in answer.rr + answer.auth if isinstance(rr, RR)]
        if answer.header.rcode not in (RCODE.NOERROR, RCODE.NXDOMAIN) or not ttls or answer.header.tc:
            return
        now = time.monotonic() if now is None else now
        with self._lock:
            self._data[key] = (now + min(min(ttls), MAX_TTL), answer.pack())
            self._data.move_to_end(key)
            while len(self._data) > self.size:
                self._data.popitem(last=False)
