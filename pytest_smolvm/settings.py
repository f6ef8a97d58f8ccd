"""Where settings come from, written down once (pure; no pytest import).

Precedence, highest first: **marker > command line > environment > ini > default**.

Network is the exception: a policy given on the command line (or, failing that, in the
environment) is a *ceiling* that markers may lower but not raise, ordered
``none < isolated < nat+allow < nat``. A test asking for more is skipped, not upgraded.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any, Final

from .config import check_field
from .errors import ConfigError
from .network.policy import network_rank


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
    Option("uplink", "--smolvm-uplink", "smolvm_uplink", "SMOLVM_UPLINK",
           "network namespace that network='nat' traffic leaves through: 'root' (default, the host's "
           "own) or a namespace name (ip netns list)"),
    Option("dns_upstream", "--smolvm-dns-upstream", "smolvm_dns_upstream", "SMOLVM_DNS_UPSTREAM",
           "resolvers the run's resolver forwards allowed names to: IP[:PORT], comma-separated "
           "(default: the host's, as it resolves)"),
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
    for opt in OPTIONS:
        for raw, source in _given(opt, cli, env, ini):
            try:
                layers.append((source, {opt.field: check_field(opt.field, raw)}))
            except ConfigError as exc:
                raise ConfigError(f"{exc} (from {source})") from None
    return layers


def _given(
    opt: Option, cli: Mapping[str, Any], env: Mapping[str, str], ini: Mapping[str, Any]
) -> list[tuple[Any, str]]:
    """The values given for ``opt`` with their sources, lowest precedence first (ini, env,
    command line); None and "" mean not given."""
    spelled = [(ini.get(opt.field), f"ini option {opt.ini}"),
               (env.get(opt.env), f"environment variable {opt.env}"),
               (cli.get(opt.field), f"command line {opt.cli}")]
    return [(raw, source) for raw, source in spelled if raw is not None and raw != ""]


#: Not a VM setting (so not in OPTIONS): how many VMs each worker starts ahead of its tests.
POOL: Final = Option("pool", "--smolvm-pool", "smolvm_pool", "SMOLVM_POOL",
                     "VMs kept started ahead of the tests that need them, per worker (default 1; 0 disables)")
DEFAULT_POOL_SIZE: Final = 1


def pool_size(cli: Mapping[str, Any], env: Mapping[str, str], ini: Mapping[str, Any]) -> int:
    """The warm pool's size, by the same precedence as every other option."""
    size = DEFAULT_POOL_SIZE
    for raw, source in _given(POOL, cli, env, ini):
        try:
            size = int(str(raw))
        except ValueError:
            size = -1
        if size < 0:
            raise ConfigError(f"invalid pool size {raw!r} (from {source}): expected an integer >= 0")
    return size


#: Not a VM setting: the PEM bundle the secrets proxy verifies real hosts against.
UPSTREAM_CA: Final = Option("upstream_ca_bundle", "--smolvm-upstream-ca-bundle", "smolvm_upstream_ca_bundle",
                            "SMOLVM_UPSTREAM_CA_BUNDLE", "PEM bundle the secrets proxy verifies real hosts' "
                            "certificates against (default: the host's trust store)")


def upstream_ca_bundle(cli: Mapping[str, Any], env: Mapping[str, str], ini: Mapping[str, Any]) -> str | None:
    """The secrets proxy's trust bundle, by the same precedence as every other option (the
    winner only is read); an unreadable file is a ConfigError naming where it was given."""
    given = _given(UPSTREAM_CA, cli, env, ini)
    if not given:
        return None
    raw, source = given[-1]
    path = str(raw).strip()
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise ConfigError(f"invalid upstream CA bundle {path!r} (from {source}): not a readable file")
    return path


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


#: Not VM settings: which tests' reports get an evidence section, and where JSON goes.
EVIDENCE: Final = Option("evidence", "--smolvm-evidence", "smolvm_evidence", "SMOLVM_EVIDENCE",
                         "which VM tests get an 'smolvm evidence' report section (what the guest did: files, "
                         "processes, network, resources): failed, all or none (default failed)")
EVIDENCE_DIR: Final = Option("evidence_dir", "--smolvm-evidence-dir", "smolvm_evidence_dir", "SMOLVM_EVIDENCE_DIR",
                             "write one JSON file of evidence per VM test into this directory (default: none)")
EVIDENCE_MODES: Final = ("failed", "all", "none")


def evidence_settings(cli: Mapping[str, Any], env: Mapping[str, str],
                      ini: Mapping[str, Any]) -> tuple[str, str | None]:
    """``(mode, directory)`` by the same precedence as every other option; a bad mode is a
    ConfigError naming the value and where it was given."""
    mode = "failed"
    for raw, source in _given(EVIDENCE, cli, env, ini):
        mode = str(raw).strip().lower()
        if mode not in EVIDENCE_MODES:
            raise ConfigError(f"invalid evidence mode {raw!r} (from {source}): expected one of "
                              f"{', '.join(EVIDENCE_MODES)}")
    given = _given(EVIDENCE_DIR, cli, env, ini)
    if not given:
        return mode, None
    raw, source = given[-1]
    path = str(raw).strip()
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"invalid evidence directory {path!r} (from {source}): exists and is not a directory")
    return mode, path
