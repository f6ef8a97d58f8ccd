"""Names in ``allow`` and in queries, and where the run's resolver forwards to (pure).

An ``allow`` entry is a network (``198.51.100.0/24``, an address) or a DNS name
(``pypi.org``; ``*.pythonhosted.org`` for every name *below* pythonhosted.org, at any depth,
not the name itself). Names are IDNA-encoded (``bücher.example`` → ``xn--bcher-kva.example``)
and lower-cased; a ``*`` anywhere but a leading ``*.`` is refused, as is a bare ``*``.

A query name comes from the guest, so it is hostile: :func:`query_name` accepts only what a
host name can be (letters, digits, ``-`` and ``_`` in labels of 1-63 bytes, at most
``MAX_QUERY_LABELS`` labels and ``MAX_NAME_LENGTH`` bytes in all) and says why otherwise.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from typing import Final

import idna

from ..errors import ConfigError

MAX_NAME_LENGTH: Final = 253  # RFC 1035 2.3.4, as text without the final dot
MAX_LABEL_LENGTH: Final = 63
#: Labels a query name may have: real names have a handful; more is a tunnel's payload.
MAX_QUERY_LABELS: Final = 16
#: Shown in ledgers and messages; a longer (hostile) name is cut here.
SHOWN_LENGTH: Final = 120
DEFAULT_DNS_PORT: Final = 53
_LABEL: Final = re.compile(rb"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


def is_network(entry: str) -> bool:
    try:
        ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return False
    return True


def allow_entry(item: object) -> str:
    """One ``allow`` entry, normalised: a CIDR (``198.51.100.0/24``) or a name; ConfigError
    saying why not."""
    text = str(item).strip()
    if is_network(text):
        return str(ipaddress.ip_network(text, strict=False))
    return allow_name(text)


def allow_name(text: str) -> str:
    """A name for ``allow``: IDNA-encoded, lower case, no final dot, ``*.`` only leading."""
    why = "not a network (198.51.100.0/24) or a DNS name (pypi.org, *.pythonhosted.org)"
    name = text.rstrip(".") if text.count(".") and not text.endswith("..") else text
    wildcard = name.startswith("*.")
    rest = name[2:] if wildcard else name
    if not rest or "*" in rest:
        raise ConfigError(f"invalid allow={text!r}: {why}; a wildcard is allowed only as a leading '*.'")
    try:  # IDNA for what is not ASCII; ASCII labels as they are ('_' is IDNA-invalid, DNS-valid)
        labels = [label.lower() if label.isascii() else idna.encode(label, uts46=True).decode("ascii")
                  for label in rest.split(".")]
    except (idna.IDNAError, UnicodeError) as exc:
        raise ConfigError(f"invalid allow={text!r}: {why} ({exc})") from None
    encoded = ".".join(labels)
    if len(encoded) > MAX_NAME_LENGTH or any(not _LABEL.fullmatch(label.encode()) for label in labels):
        raise ConfigError(f"invalid allow={text!r}: {why}")
    if wildcard and len(labels) < 2:
        raise ConfigError(f"invalid allow={text!r}: a wildcard must name a domain with a dot "
                          f"('*.example.org', not '*.org')")
    if labels[-1].isdigit():
        raise ConfigError(f"invalid allow={text!r}: {why} (the last label is a number)")
    return ("*." if wildcard else "") + encoded


def split_allow(allow: Iterable[str]) -> tuple[list[str], list[str]]:
    """(networks, names) of a normalised ``allow``."""
    nets: list[str] = []
    names: list[str] = []
    for entry in allow:
        (nets if is_network(entry) else names).append(entry)
    return nets, names


def name_allowed(name: str, patterns: Sequence[str]) -> bool:
    """Whether ``name`` (from :func:`query_name`) is one of ``patterns`` or below a ``*.``
    pattern's domain."""
    for pattern in patterns:
        if pattern.startswith("*."):
            if name.endswith(pattern[1:]):
                return True
        elif name == pattern:
            return True
    return False


def query_name(labels: Sequence[bytes]) -> tuple[str, str | None]:
    """(the name as lower-case text, None) if ``labels`` (from the wire) make an acceptable
    host name, else (a printable, bounded rendering, why not)."""
    shown = ".".join(label.decode("ascii", "backslashreplace") for label in labels[:MAX_QUERY_LABELS + 1])
    shown = shown.encode("unicode_escape").decode("ascii")[:SHOWN_LENGTH]
    if not labels:
        return shown, "the root name"
    if len(labels) > MAX_QUERY_LABELS:
        return shown, f"more than {MAX_QUERY_LABELS} labels"
    if sum(len(label) + 1 for label in labels) - 1 > MAX_NAME_LENGTH:
        return shown, f"longer than {MAX_NAME_LENGTH} bytes"
    if any(not _LABEL.fullmatch(label) for label in labels):
        return shown, "not a host name (letters, digits, '-' and '_' in labels of 1-63 bytes)"
    return b".".join(labels).decode("ascii").lower(), None


def upstreams(value: object) -> tuple[str, ...]:
    """``IP[:PORT]`` entries, comma or space separated, normalised to ``IP:PORT``."""
    if value is None:
        return ()
    items = value.replace(",", " ").split() if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise ConfigError(f"invalid dns_upstream={value!r}: expected IP[:PORT] entries, comma-separated")
    out = []
    for item in items:
        host, _, port = str(item).strip().partition(":") if str(item).count(":") <= 1 else (str(item), "", "")
        try:
            addr = ipaddress.IPv4Address(host)
            number = int(port) if port else DEFAULT_DNS_PORT
        except ValueError:
            raise ConfigError(f"invalid dns_upstream entry {item!r}: expected an IPv4 address with an "
                              f"optional port, such as 192.0.2.53 or 192.0.2.53:5353") from None
        if not 0 < number < 65536:
            raise ConfigError(f"invalid dns_upstream entry {item!r}: port {number} is out of range")
        out.append(f"{addr}:{number}")
    return tuple(out)


def split_upstream(entry: str) -> tuple[str, int]:
    host, _, port = entry.partition(":")
    return host, int(port or DEFAULT_DNS_PORT)


def resolv_conf_nameservers(text: str) -> list[str]:
    """IPv4 ``nameserver`` lines of a resolv.conf, as ``IP:53``."""
    out = []
    for line in text.splitlines():
        parts = line.split("#", 1)[0].split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                out.append(f"{ipaddress.IPv4Address(parts[1])}:{DEFAULT_DNS_PORT}")
            except ValueError:
                continue
    return out


#: systemd-resolved's stub; its real upstreams are in RESOLVED_UPSTREAMS.
RESOLVED_STUB: Final = ("127.0.0.53", "127.0.0.54")
RESOLVED_UPSTREAMS: Final = "/run/systemd/resolve/resolv.conf"


def host_upstreams(resolv_conf: str, resolved_conf: str | None) -> list[str]:
    """The host's resolvers as it resolves: /etc/resolv.conf's, except that the
    systemd-resolved stub is replaced by resolved's own upstreams (``resolved_conf``)."""
    found = resolv_conf_nameservers(resolv_conf)
    if any(split_upstream(e)[0] in RESOLVED_STUB for e in found) and resolved_conf is not None:
        real = [e for e in resolv_conf_nameservers(resolved_conf) if split_upstream(e)[0] not in RESOLVED_STUB]
        if real:
            return real
    return found
