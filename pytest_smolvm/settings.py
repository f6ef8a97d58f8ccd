"""Where settings come from, written down once (pure; no pytest import).

Precedence, highest first: **marker > command line > environment > ini > default**.

Network is the exception: a policy given on the command line (or, failing that, in the
environment) is a *ceiling* that markers may lower but not raise, ordered
``none < isolated < nat+allow < nat``. A test asking for more is skipped, not upgraded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Final

from .config import check_field, network_rank
from .errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Option:
    """One session-wide setting and its three spellings."""

    field: str
    cli: str
    ini: str
    env: str
    help: str


OPTIONS: Final = (
    Option("network", "--smolvm-network", "smolvm_network", "SMOLVM_NETWORK",
           "network policy ceiling: none, isolated or nat (default none); markers may lower it"),
    Option("vcpus", "--smolvm-vcpus", "smolvm_vcpus", "SMOLVM_VCPUS", "vCPUs per VM (default 1)"),
    Option("memory_mib", "--smolvm-memory", "smolvm_memory_mib", "SMOLVM_MEMORY_MIB",
           "guest memory in MiB, >= 128 (default 256)"),
    Option("accel", "--smolvm-accel", "smolvm_accel", "SMOLVM_ACCEL",
           "accelerator: auto, kvm, hvf or tcg (default auto: KVM only if a canary boot proves it works)"),
    Option("backend", "--smolvm-backend", "smolvm_backend", "SMOLVM_BACKEND",
           "VMM backend: auto, qemu or firecracker (default auto)"),
    Option("image", "--smolvm-image", "smolvm_image", "SMOLVM_IMAGE",
           "guest image name or image directory (default 'default')"),
    Option("lifetime", "--smolvm-lifetime", "smolvm_lifetime", "SMOLVM_LIFETIME",
           "wall-clock seconds a test may use its VM before it is destroyed (default: no limit)"),
    Option("snapshot", "--smolvm-snapshot", "smolvm_snapshot", "SMOLVM_SNAPSHOT",
           "start isolated-disk VMs as snapshot clones: true or false (default true); "
           "--smolvm-no-snapshot is false"),
)


def session_layers(
    cli: Mapping[str, Any], env: Mapping[str, str], ini: Mapping[str, Any]
) -> list[tuple[str, dict[str, Any]]]:
    """``(source, values)`` layers for the session, lowest precedence first.

    ``cli``/``ini`` map option *fields* to values (None/"" = not given); ``env`` is the process
    environment. Each value is validated here so a bad one is reported with its source.
    """
    layers: list[tuple[str, dict[str, Any]]] = []
    for kind in ("ini", "env", "cli"):
        values: dict[str, Any] = {}
        for opt in OPTIONS:
            if kind == "ini":
                raw, source = ini.get(opt.field), f"ini option {opt.ini}"
            elif kind == "env":
                raw, source = env.get(opt.env), f"environment variable {opt.env}"
            else:
                raw, source = cli.get(opt.field), f"command line {opt.cli}"
            if raw is None or raw == "":
                continue
            try:
                values[opt.field] = check_field(opt.field, raw)
            except ConfigError as exc:
                raise ConfigError(f"{exc} (from {source})") from None
            layers.append((source, {opt.field: values[opt.field]}))
    return layers


def network_ceiling(layers: list[tuple[str, dict[str, Any]]]) -> tuple[str, str] | None:
    """The ``(policy, source)`` ceiling from the command line or environment, if any."""
    found = None
    for source, values in layers:
        if "network" in values and not source.startswith("ini"):
            found = (values["network"], source)
    return found


def exceeds_ceiling(network: str, allow: tuple[str, ...], ceiling: tuple[str, str] | None) -> str | None:
    """A skip reason if ``network``/``allow`` asks for more than ``ceiling``, else None."""
    if ceiling is None:
        return None
    cap, source = ceiling
    if network_rank(network, allow) <= network_rank(cap):
        return None
    asked = f"network={network!r}" + (f" with allow={list(allow)}" if allow else "")
    return f"test asks for {asked} but {source}={cap} caps network policy at {cap!r}"
