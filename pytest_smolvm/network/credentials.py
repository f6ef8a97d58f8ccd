"""Secrets that never enter the guest (pure: validation and placeholders).

A :class:`Secret` is a value and the hosts it belongs to. The guest only ever sees a random
per-VM placeholder in its environment; the run's egress proxy (:mod:`.proxy`) puts the value
into request headers bound for those hosts, after verifying the host's real certificate.
"""

from __future__ import annotations

import re
import secrets
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

from ..errors import ConfigError
from .names import allow_name, name_allowed, split_allow

_ENV_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
MAX_VALUE: Final = 8192
PLACEHOLDER_PREFIX: Final = "smolvm-secret-"
#: Lines a VM's secrets ledger keeps (``vm.network.secret_events``); more are only counted.
LEDGER_SIZE: Final = 256


class Secret:
    """A credential for ``hosts`` (exact DNS names). Its repr never shows the value, and it
    cannot be pickled (so it cannot reach a checkpoint, a worker or a report by accident)."""

    __slots__ = ("_value", "hosts")

    def __init__(self, value: str, hosts: Iterable[str]) -> None:
        if not isinstance(value, str):
            raise ConfigError(f"invalid Secret value (a {type(value).__name__}, not shown): expected a str")
        if not value or len(value) > MAX_VALUE or not value.isascii() or not value.isprintable():
            raise ConfigError(f"invalid Secret value (not shown): expected a non-empty str of at most {MAX_VALUE} "
                              f"printable ASCII characters (it goes into an HTTP header)")
        if isinstance(hosts, str) or not isinstance(hosts, Iterable):
            raise ConfigError(f"invalid Secret hosts={hosts!r}: expected a list of DNS names such as "
                              f"['api.example.com']")
        names = []
        for host in hosts:
            if not isinstance(host, str) or host.strip().startswith("*") or "/" in host:
                raise ConfigError(f"invalid Secret hosts entry {host!r}: expected an exact DNS name "
                                  f"(no wildcard, no address, no URL) such as 'api.example.com'")
            try:
                names.append(allow_name(host.strip()))
            except ConfigError:
                raise ConfigError(f"invalid Secret hosts entry {host!r}: not a DNS name") from None
        if not names:
            raise ConfigError("invalid Secret hosts=[]: name at least one host the secret belongs to")
        self._value = value
        self.hosts: tuple[str, ...] = tuple(dict.fromkeys(names))

    def reveal(self) -> str:
        """The value (for the proxy only)."""
        return self._value

    def __repr__(self) -> str:
        return f"Secret(hosts={list(self.hosts)!r}, value='***')"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and (self._value, self.hosts) == (other._value, other.hosts)

    def __hash__(self) -> int:
        return hash(self.hosts)

    def __reduce__(self) -> Any:
        raise TypeError("a Secret cannot be pickled: its value stays in the process that owns the VM")


class SecretMap(Mapping[str, Secret]):
    """``VMConfig.secrets``: env name -> :class:`Secret`, immutable."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, Secret] | None = None) -> None:
        self._data = dict(data or {})

    def __getitem__(self, key: str) -> Secret:
        return self._data[key]

    def __iter__(self) -> Any:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return repr(self._data)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self._data) == dict(other)

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._data)))


def check_secrets(value: object) -> SecretMap:
    """Validate ``secrets=``: a mapping of environment variable names to :class:`Secret`."""
    if isinstance(value, SecretMap):
        return value
    if not isinstance(value, Mapping):
        raise ConfigError(f"invalid secrets (a {type(value).__name__}): expected a mapping such as "
                          f"{{'API_KEY': Secret(value, hosts=['api.example.com'])}}")
    for key, secret in value.items():
        if not isinstance(key, str) or not _ENV_NAME.fullmatch(key):
            raise ConfigError(f"invalid secrets key {key!r}: expected an environment variable name "
                              f"([A-Za-z_][A-Za-z0-9_]*)")
        if not isinstance(secret, Secret):
            raise ConfigError(f"invalid secrets[{key!r}] (a {type(secret).__name__}, not shown): expected "
                              f"pytest_smolvm.Secret(value, hosts=[...])")
    return SecretMap(value)


def unreachable(secrets_: Mapping[str, Secret], network: str, allow: Iterable[str]) -> str | None:
    """Why the policy cannot reach a secret's host (None: every host is reachable by name)."""
    if not secrets_:
        return None
    if network != "nat":
        return f"secrets need network='nat' (the proxy reaches their hosts through it), not network={network!r}"
    _, names = split_allow(tuple(allow))
    if not tuple(allow):
        return None
    for key, secret in secrets_.items():
        for host in secret.hosts:
            if not name_allowed(host, names):
                return (f"secrets[{key!r}] host {host!r} is not allowed by allow={list(allow)!r} "
                        f"(the proxy only reaches hosts the VM may resolve by name)")
    return None


def placeholders(names: Iterable[str]) -> dict[str, str]:
    """A fresh random placeholder per secret name (one VM's are useless in another)."""
    return {name: f"{PLACEHOLDER_PREFIX}{secrets.token_hex(16)}" for name in names}


class SecretBook:
    """One VM's secrets, its placeholders, and what its proxy did with them (thread-safe)."""

    def __init__(self, secrets_: Mapping[str, Secret], placeholders_: Mapping[str, str]) -> None:
        self._secrets = dict(secrets_)
        self.placeholders = dict(placeholders_)
        self.hosts = frozenset(h for s in self._secrets.values() for h in s.hosts)
        self.ledger: list[str] = []
        self.counts = {"forwarded": 0, "refused": 0, "failed": 0, "rate_refused": 0, "conns_refused": 0}
        self._lock = threading.Lock()

    def record(self, line: str, kind: str = "refused") -> None:
        """Count one ``kind`` event and keep ``line`` in the ledger (once, while there is room)."""
        with self._lock:
            self.counts[kind] = self.counts.get(kind, 0) + 1
            if line and len(self.ledger) < LEDGER_SIZE and line not in self.ledger:
                self.ledger.append(line)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"ledger": list(self.ledger), **self.counts}

    def carried(self, text: str) -> set[str]:
        """The secret names whose placeholder ``text`` carries."""
        return {name for name, ph in self.placeholders.items() if ph in text}

    def substitute(self, value: str, host: str) -> str:
        """``value`` with the placeholders of ``host``'s own secrets replaced by their values."""
        for name, ph in self.placeholders.items():
            if ph in value and host in self._secrets[name].hosts:
                value = value.replace(ph, self._secrets[name].reveal())
        return value

    def belongs(self, name: str, host: str) -> bool:
        return host in self._secrets[name].hosts


def judge(book: SecretBook, host: str, target: bytes, headers: Sequence[tuple[bytes, bytes]]) -> tuple[int, str] | None:
    """Why a request over TLS to ``host`` may not go out (HTTP status, reason), or None.
    Every byte is the guest's: the ``Host`` header must be the TLS name; a placeholder of a
    secret that does not belong to ``host`` (in any header or the target), or any placeholder
    in the target (only headers are rewritten), refuses it and is recorded."""
    named = [v.decode("latin-1").strip().lower() for n, v in headers if n.lower() == b"host"]
    in_target = book.carried(target.decode("latin-1"))
    carried = in_target.union(*(book.carried(v.decode("latin-1")) for _, v in headers))
    if len(named) != 1 or named[0].removesuffix(":443").rstrip(".") != host:
        shown = named[0][:64] if named else "none"
        for name in sorted(carried):
            book.record(f"secret {name} sent to Host {shown!r} over TLS to {host}: refused")
        if not carried:
            book.record("", "refused")
        return 421, f"the Host header must name {host}, the TLS server name"
    wrong = {name for name in carried if not book.belongs(name, host)}
    for name in sorted(wrong):
        book.record(f"secret {name} sent to {host}: refused")
    for name in sorted(in_target - wrong):
        book.record(f"secret {name} in the request target to {host}: refused (only headers carry secrets)")
    if wrong or in_target:
        return 403, "a secret's placeholder is accepted only in headers of requests to its own hosts"
    return None
