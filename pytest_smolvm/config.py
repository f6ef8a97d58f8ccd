"""The VM specification: frozen dataclasses and pure validation.

Every value is validated by :func:`check_field`, which knows nothing about *where* a value
came from; callers that do (the pytest layer, the CLI) wrap the message with the source,
e.g. ``invalid memory_mib=-1 from marker on test_x``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Final

from .cpumodel import check_cpu
from .errors import ConfigError
from .network.credentials import Secret, SecretMap, check_secrets, unreachable
from .network.names import allow_entry, upstreams
from .network.policy import (
    DEFAULT_EGRESS_CONNS_PER_S,
    DEFAULT_EGRESS_KIB_PER_S,
    NETWORK_POLICIES,
    network_rank,
)
from .reporting import redacted_repr
from .timeouts import scaled
from .volumes import Volume, check_volumes

DISK_MODES: Final = ("isolated", "shared")
ACCELS: Final = ("auto", "kvm", "hvf", "tcg")
BACKENDS: Final = ("auto", "qemu", "firecracker")
MIN_MEMORY_MIB: Final = 128
DEFAULT_MAX_OUTPUT: Final = 16 * 1024 * 1024
#: Seconds; both are multiplied by SMOLVM_TIMEOUT_SCALE (timeouts.py).
DEFAULT_TIMEOUT: Final = 30.0
DEFAULT_BOOT_TIMEOUT: Final = 90.0


class SecretEnv(Mapping[str, str]):
    """An immutable environment whose values are secrets: its repr (and so VMConfig's, and
    pytest's ``-l``/``-vv`` locals) shows the keys only, ``{'TOKEN': '***'}``."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, str] | Iterable[tuple[str, str]] = ()) -> None:
        self._data = dict(data)

    def __getitem__(self, key: str) -> str:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return redacted_repr(self._data)

    def __reduce__(self) -> tuple[type[SecretEnv], tuple[dict[str, str]]]:
        return SecretEnv, (self._data,)


def _freeze_env(env: Mapping[str, str] | Iterable[tuple[str, str]] | None) -> Mapping[str, str]:
    return SecretEnv(env or {})


@dataclasses.dataclass(frozen=True)
class VMConfig:
    """Everything needed to start one VM. Immutable; derive variants with :meth:`replace`.

    ``timeout`` is the default timeout in seconds of each ``run()`` call (a call may pass its
    own); ``env`` is added to the environment of every ``run()`` and never written to the
    guest's disk. ``allow`` only has meaning with ``network="nat"``. ``aslr=None`` turns guest
    address-space randomisation off under TCG (each exec is ~3x faster, because QEMU can reuse
    translated code across processes) and leaves it on under KVM/HVF. ``snapshot=True`` starts
    isolated-disk VMs as clones of a golden snapshot (cold boot if that is impossible).
    ``lifetime`` caps the wall-clock seconds a VM may serve its user (from when it is handed
    over): then it is destroyed and every call raises GuestDied saying so. ``uplink`` is the
    network namespace ``nat`` traffic leaves through (None: the host's root namespace).
    ``allow`` entries are IPv4 networks or DNS names (``pypi.org``, ``*.pythonhosted.org``);
    ``dns_upstream`` lists the ``IP:PORT`` resolvers the run's resolver forwards allowed names
    to (empty: the host's). ``egress_kib_per_s`` and ``egress_conns_per_s`` cap what a networked VM sends through
    the uplink (KiB per second, new connections per second); beyond them packets are dropped.
    ``cpu`` is the guest CPU model under TCG (None: ``qemu64,+rdrand,+arat``); KVM and HVF
    guests always get the host's CPU. ``volumes`` are host directories or ext4 images mounted
    read-only in the guest (``{"/guest/path": "host/path"}``; see :mod:`.volumes`).
    ``secrets`` maps env names to :class:`~pytest_smolvm.Secret`: the guest's env gets a random
    per-VM placeholder, and the run's egress proxy puts the value into HTTPS request headers
    bound for the secret's hosts only (docs/secrets.md); needs ``network="nat"``.
    """

    vcpus: int = 1
    memory_mib: int = 256
    disk_mode: str = "isolated"
    disk_size_mib: int | None = None
    network: str = "none"
    allow: tuple[str, ...] = ()
    image: str = "default"
    timeout: float = dataclasses.field(default_factory=lambda: scaled(DEFAULT_TIMEOUT))
    env: Mapping[str, str] = dataclasses.field(default_factory=lambda: _freeze_env(None))
    accel: str = "auto"
    backend: str = "auto"
    boot_timeout: float = dataclasses.field(default_factory=lambda: scaled(DEFAULT_BOOT_TIMEOUT))
    max_output: int = DEFAULT_MAX_OUTPUT
    retain_disk_on_delete: bool = False
    aslr: bool | None = None
    snapshot: bool = True
    lifetime: float | None = None
    uplink: str | None = None
    egress_kib_per_s: int = DEFAULT_EGRESS_KIB_PER_S
    egress_conns_per_s: int = DEFAULT_EGRESS_CONNS_PER_S
    cpu: str | None = None
    volumes: tuple[Volume, ...] = ()
    dns_upstream: tuple[str, ...] = ()
    secrets: Mapping[str, Secret] = dataclasses.field(default_factory=SecretMap)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            try:
                value = check_field(f.name, getattr(self, f.name))
            except ConfigError as exc:
                raise ConfigError(f"{exc} (in VMConfig)") from None
            object.__setattr__(self, f.name, value)
        if self.allow and self.network != "nat":
            raise ConfigError(
                f"invalid allow={list(self.allow)!r}: allow only applies to network='nat' "
                f"(network={self.network!r}) (in VMConfig)"
            )
        why = unreachable(self.secrets, self.network, self.allow)
        if why:
            raise ConfigError(f"invalid secrets: {why} (in VMConfig)")

    def replace(self, **changes: Any) -> VMConfig:
        """Return a copy with ``changes`` applied (validated)."""
        unknown = sorted(set(changes) - FIELD_NAMES)
        if unknown:
            raise ConfigError(f"unknown VMConfig field(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)

    @property
    def network_rank(self) -> int:
        """Position of this config's policy in ``none < isolated < nat+allow < nat``."""
        return network_rank(self.network, self.allow)

    def describe(self) -> str:
        """One line for reports: ``vcpus=1 memory_mib=256 network=none image=default``."""
        parts = [f"vcpus={self.vcpus}", f"memory_mib={self.memory_mib}",
                 f"disk={self.disk_mode}", f"network={self.network}"]
        if self.allow:
            parts.append(f"allow={','.join(self.allow)}")
        if self.uplink:
            parts.append(f"uplink={self.uplink}")
        parts.append(f"image={self.image}")
        return " ".join(parts)


FIELD_NAMES: Final = frozenset(f.name for f in dataclasses.fields(VMConfig))


def _bad(name: str, value: object, why: str) -> ConfigError:
    return ConfigError(f"invalid {name}={value!r}: {why}")


def _int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool):
        raise _bad(name, value, "expected an integer")
    if isinstance(value, str):
        try:
            value = int(value.strip(), 10)
        except ValueError:
            raise _bad(name, value, "expected an integer") from None
    if not isinstance(value, int):
        raise _bad(name, value, "expected an integer")
    if value < minimum:
        raise _bad(name, value, f"must be >= {minimum}")
    return value


def _float(name: str, value: object, minimum_exclusive: float) -> float:
    if isinstance(value, bool):
        raise _bad(name, value, "expected a number of seconds")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise _bad(name, value, "expected a number of seconds") from None
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(name, value, "expected a finite number of seconds")
    if value <= minimum_exclusive:
        raise _bad(name, value, f"must be > {minimum_exclusive:g}")
    return float(value)


def _choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value.strip().lower() not in choices:
        raise _bad(name, value, f"expected one of {', '.join(choices)}")
    return value.strip().lower()


def _bool(name: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off", ""):
        return False
    raise _bad(name, value, "expected true or false")


def _allow(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [v for v in value.replace(",", " ").split() if v]
    if not isinstance(value, (list, tuple)):
        raise _bad("allow", value, "expected a list of CIDRs and DNS names such as "
                   "['198.51.100.0/24', 'pypi.org', '*.pythonhosted.org']")
    out = []
    for item in value:
        if not isinstance(item, str):
            raise _bad("allow", item, "expected a CIDR or a DNS name as a str")
        entry = allow_entry(item)
        if entry not in out:
            out.append(entry)
    return tuple(out)


def _env(value: object) -> Mapping[str, str]:
    # Values are secrets: messages name keys and types, never a value.
    if not isinstance(value, Mapping):
        raise ConfigError(f"invalid env (a {type(value).__name__}, not shown: env values are secret): "
                          f"expected a mapping of str to str such as {{'TOKEN': '...'}}")
    for k, v in value.items():
        if not isinstance(k, str) or not k or "=" in k or "\0" in k:
            raise _bad("env", k, "environment variable names must be non-empty str without '=' or NUL")
        if not isinstance(v, str) or "\0" in v:
            what = "a str containing NUL" if isinstance(v, str) else f"a {type(v).__name__}"
            raise ConfigError(f"invalid env[{k!r}]: {what} (value not shown: env values are secret); "
                              f"environment values must be str without NUL")
    return _freeze_env(value)


def _uplink(value: object) -> str | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "root")):
        return None
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_.][A-Za-z0-9_.-]{0,63}", value.strip()):
        raise _bad("uplink", value, "expected 'root' or the name of a network namespace (ip netns list)")
    return value.strip()


def _image(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _bad("image", value, "expected an image name (e.g. 'default') or a path to an image directory")
    return value.strip()


#: One checker per VMConfig field, ``(name, value) -> normalised value``.
_CHECKS: Final[Mapping[str, Callable[[str, Any], Any]]] = {
    "vcpus": lambda name, v: _int(name, v, 1),
    "memory_mib": lambda name, v: _int(name, v, MIN_MEMORY_MIB),
    "disk_mode": lambda name, v: _choice(name, v, DISK_MODES),
    "disk_size_mib": lambda name, v: None if v is None else _int(name, v, 64),
    "network": lambda name, v: _choice(name, v, NETWORK_POLICIES),
    "allow": lambda _, v: _allow(v),
    "image": lambda _, v: _image(v),
    "timeout": lambda name, v: _float(name, v, 0.0),
    "boot_timeout": lambda name, v: _float(name, v, 0.0),
    "env": lambda _, v: _env(v),
    "accel": lambda name, v: _choice(name, v, ACCELS),
    "backend": lambda name, v: _choice(name, v, BACKENDS),
    "max_output": lambda name, v: _int(name, v, 1),
    "retain_disk_on_delete": _bool,
    "aslr": lambda name, v: None if v is None else _bool(name, v),
    "snapshot": _bool,
    "lifetime": lambda name, v: None if v in (None, "", "none") else _float(name, v, 0.0),
    "uplink": lambda _, v: _uplink(v),
    "egress_kib_per_s": lambda name, v: _int(name, v, 1),
    "egress_conns_per_s": lambda name, v: _int(name, v, 1),
    "cpu": lambda _, v: check_cpu(v),
    "volumes": lambda _, v: check_volumes(v),
    "dns_upstream": lambda _, v: upstreams(v),
    "secrets": lambda _, v: check_secrets(v),
}


def check_field(name: str, value: Any) -> Any:
    """Validate and normalise one VMConfig field; raise :class:`ConfigError` naming the value.

    Strings are accepted for every field (they come from the command line, environment and
    ini files) and converted to the field's type.
    """
    check = _CHECKS.get(name)
    if check is None:
        raise ConfigError(f"unknown setting {name!r}; known: {', '.join(sorted(FIELD_NAMES))}")
    return check(name, value)


def config_from_layers(layers: Iterable[tuple[str, Mapping[str, Any]]]) -> VMConfig:
    """Build a VMConfig from ``(source, values)`` layers, lowest precedence first.

    Each value is validated as it is read, so an error names the layer it came from:
    ``invalid memory_mib=-1: must be >= 128 (from marker on test_x)``.
    """
    merged: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for source, values in layers:
        for name, value in values.items():
            if name not in FIELD_NAMES:
                raise ConfigError(
                    f"unknown setting {name!r} (from {source}); known: {', '.join(sorted(FIELD_NAMES))}"
                )
            try:
                merged[name] = check_field(name, value)
            except ConfigError as exc:
                raise ConfigError(f"{exc} (from {source})") from None
            origin[name] = source
    if merged.get("allow") and merged.get("network", "none") != "nat":
        raise ConfigError(
            f"invalid allow={list(merged['allow'])!r} (from {origin['allow']}): allow only applies "
            f"to network='nat', but network={merged.get('network', 'none')!r}"
            + (f" (from {origin['network']})" if "network" in origin else " (the default)")
        )
    why = unreachable(merged.get("secrets") or {}, merged.get("network", "none"), merged.get("allow", ()))
    if why:
        where = ", ".join(f"{k} from {origin[k]}" for k in ("secrets", "network", "allow") if k in origin)
        raise ConfigError(f"invalid secrets: {why} ({where})")
    return VMConfig(**merged)
