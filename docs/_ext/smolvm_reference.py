"""Reference tables generated from the code's single definitions, so the docs cannot drift.

Directives (usable from MyST as ```` ```{smolvm-marker-keywords} ````):

``smolvm-marker-keywords``
    The ``@pytest.mark.smolvm(...)`` keywords: the fields of :class:`pytest_smolvm.VMConfig`
    (``config.FIELD_NAMES``, which ``markers.marker_layers`` accepts), each with its type and
    default read from the dataclass. The one-line meanings are kept below in ``MEANINGS``;
    a field without one, or a meaning for a field that no longer exists, fails the build.
``smolvm-options``
    Every command-line option and ini key: ``plugin.pytest_addoption`` is driven with a small
    recording parser (the plugin is not changed or configured), and the environment variable
    of each comes from ``settings.OPTIONS`` / ``settings.POOL``.
``smolvm-cli``
    Every ``python -m pytest_smolvm`` subcommand and argument, from ``cli.build_parser()``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from collections.abc import Iterator, Sequence
from typing import Any

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective

# What each marker keyword / VMConfig field means. Types and defaults are NOT written here:
# they are read from the dataclass. Keep one line each; details live in the guide pages.
MEANINGS: dict[str, str] = {
    "vcpus": "vCPUs of the guest (at least 1)",
    "memory_mib": "guest RAM in MiB (at least 128)",
    "disk_mode": "`isolated` (a copy-on-write overlay per VM) or `shared` (one persistent disk per image, "
                 "for trusted provisioning only)",
    "disk_size_mib": "the guest disk's size (None: the image's)",
    "network": "network policy: `none`, `isolated` or `nat` (see Networking)",
    "allow": "with `nat`: the only IPv4 networks and DNS names (`pypi.org`, `*.pythonhosted.org`) "
             "the guest may reach",
    "image": "image name (`default`, declared in pyproject.toml, or imported) or image directory",
    "timeout": "default seconds for each `run()` (scaled by `SMOLVM_TIMEOUT_SCALE`)",
    "env": "environment added to every `run()`; values are secrets, held in guest memory only",
    "accel": "`auto`, `kvm`, `hvf` or `tcg` (`auto`: KVM only if a canary boot proves it works)",
    "backend": "`auto`, `qemu` or `firecracker`",
    "boot_timeout": "seconds a boot may take (scaled by `SMOLVM_TIMEOUT_SCALE`)",
    "max_output": "bytes kept per output stream; the rest is drained and dropped (`*_truncated`)",
    "retain_disk_on_delete": "keep the overlay in `<cache>/retained/` at close (`vm.disk_path`)",
    "aslr": "guest address-space randomisation (None: off under TCG only, where it makes exec ~3x faster)",
    "snapshot": "start isolated-disk VMs as clones of a golden snapshot (False: cold-boot every VM)",
    "lifetime": "wall-clock seconds the test may use its VM; then it is destroyed (None: no limit)",
    "uplink": "where `nat` traffic leaves: None/`root` (the host's namespace) or a network namespace",
    "egress_kib_per_s": "cap on what a networked VM sends through the uplink, KiB per second",
    "egress_conns_per_s": "cap on new connections per second out of a networked VM",
    "cpu": "guest CPU model under TCG, as QEMU spells it (None: `qemu64,+rdrand,+arat`)",
    "secrets": "env name -> `Secret(value, hosts=[...])`: the guest sees a per-VM placeholder; the run's "
               "egress proxy adds the value to HTTPS request headers for those hosts only (docs/secrets.md)",
    "dns_upstream": "where the run's resolver forwards allowed names: `IP[:PORT]` entries (empty: the "
                    "host's resolvers)",
    "volumes": "read-only host data: `{\"/guest/path\": \"host/path\"}` or `\"HOST:GUEST\"` strings",
}


class Drift(Exception):
    """The docs and the code disagree; the directive reports it as an error (the build fails)."""


# --- small node helpers -------------------------------------------------------------------

def _inline(text: str) -> nodes.paragraph:
    """A paragraph where `backticked` parts are literals, the rest plain text."""
    para = nodes.paragraph()
    for i, part in enumerate(re.split(r"`([^`]*)`", text)):
        if part:
            para += nodes.literal(part, part) if i % 2 else nodes.Text(part)
    return para


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], widths: Sequence[int]) -> nodes.table:
    table = nodes.table(classes=["smolvm-reference"])
    group = nodes.tgroup(cols=len(headers))
    table += group
    for width in widths:
        group += nodes.colspec(colwidth=width)
    head = nodes.thead()
    group += head
    head += _row(headers)
    body = nodes.tbody()
    group += body
    for row in rows:
        body += _row(row)
    return table


def _row(cells: Sequence[str]) -> nodes.row:
    row = nodes.row()
    for cell in cells:
        entry = nodes.entry()
        entry += _inline(cell)
        row += entry
    return row


def _code(value: object) -> str:
    return f"`{value}`"


# --- marker keywords ----------------------------------------------------------------------

def _field_default(field: dataclasses.Field[Any]) -> object:
    if field.default is not dataclasses.MISSING:
        return field.default
    saved = os.environ.pop("SMOLVM_TIMEOUT_SCALE", None)  # the documented default is unscaled
    try:
        return field.default_factory()  # type: ignore[misc]
    finally:
        if saved is not None:
            os.environ["SMOLVM_TIMEOUT_SCALE"] = saved


def _show_default(value: object) -> str:
    if isinstance(value, dict) or type(value).__name__ == "SecretEnv":
        return _code(dict(value)) if value else "`{}`"  # type: ignore[call-overload]
    if value == ():
        return "`()`"
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1 << 20 and value % (1 << 20) == 0:
        return f"`{value}` ({value >> 20} MiB)"
    return _code(repr(value))


def marker_rows() -> list[list[str]]:
    from pytest_smolvm.config import FIELD_NAMES, VMConfig

    fields = dataclasses.fields(VMConfig)
    names = [f.name for f in fields]
    if set(names) != set(FIELD_NAMES):
        raise Drift("VMConfig fields and config.FIELD_NAMES disagree")
    missing = [n for n in names if n not in MEANINGS]
    stale = sorted(set(MEANINGS) - set(names))
    if missing or stale:
        raise Drift(f"docs/_ext/smolvm_reference.py MEANINGS is out of date: "
                             f"VMConfig fields without a meaning {missing}, meanings of no field {stale}")
    return [[_code(f.name), _code(f.type), _show_default(_field_default(f)), MEANINGS[f.name]] for f in fields]


class MarkerKeywords(SphinxDirective):
    has_content = False

    def run(self) -> list[nodes.Node]:
        try:
            rows = marker_rows()
        except Drift as exc:
            raise self.error(str(exc)) from None
        return [_table(["keyword", "type", "default", "meaning"], rows, [16, 18, 14, 52])]


# --- options --------------------------------------------------------------------------------

@dataclasses.dataclass
class _Recorded:
    options: list[tuple[tuple[str, ...], dict[str, Any]]] = dataclasses.field(default_factory=list)
    inis: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)


class _RecordingParser:
    """Stands in for ``pytest.Parser`` (and its group) and records what is registered."""

    def __init__(self) -> None:
        self.recorded = _Recorded()

    def getgroup(self, name: str, description: str = "") -> _RecordingParser:
        return self

    def addoption(self, *names: str, **attrs: Any) -> None:
        self.recorded.options.append((names, attrs))

    def addini(self, name: str, help: str, type: str | None = None, default: Any = None) -> None:
        self.recorded.inis[name] = {"help": help, "type": type or "string", "default": default}


def recorded_options() -> _Recorded:
    from pytest_smolvm import plugin

    parser = _RecordingParser()
    plugin.pytest_addoption(parser)  # type: ignore[arg-type]
    return parser.recorded


def _strip_where(help_text: str) -> str:
    """The plugin appends ``[env X, ini y]`` to --help; the table has columns for those."""
    return re.sub(r"\s*\[(env|ini) [^\]]*\]$", "", help_text)


def option_rows() -> list[list[str]]:
    from pytest_smolvm.settings import EVIDENCE, EVIDENCE_DIR, OPTIONS, POOL

    env_of = {f"smolvm_{o.field}": o.env for o in (*OPTIONS, POOL, EVIDENCE, EVIDENCE_DIR)}
    ini_of = {f"smolvm_{o.field}": o.ini for o in (*OPTIONS, POOL, EVIDENCE, EVIDENCE_DIR)}
    recorded = recorded_options()
    by_dest: dict[str, list[tuple[tuple[str, ...], dict[str, Any]]]] = {}
    for names, attrs in recorded.options:
        by_dest.setdefault(attrs["dest"], []).append((names, attrs))
    rows, seen_inis = [], set()
    for dest, regs in by_dest.items():
        flags = " / ".join(_code(n) for names, _ in regs for n in names)
        ini = ini_of.get(dest, dest)
        if ini not in recorded.inis:
            raise Drift(f"option {flags} has no ini key {ini!r} registered")
        seen_inis.add(ini)
        ini_type = recorded.inis[ini]["type"]
        ini_cell = _code(ini) + ("" if ini_type == "string" else f" ({ini_type})")
        env = env_of.get(dest)
        helps = [_strip_where(attrs.get("help", "")) for _, attrs in regs]
        rows.append([flags, ini_cell, _code(env) if env else "—", "; ".join(h for h in helps if h)])
    for ini in sorted(set(recorded.inis) - seen_inis):
        rows.append(["—", _code(ini), "—", recorded.inis[ini]["help"]])
    return rows


class Options(SphinxDirective):
    has_content = False

    def run(self) -> list[nodes.Node]:
        try:
            rows = option_rows()
        except Drift as exc:
            raise self.error(str(exc)) from None
        return [_table(["command line", "ini", "environment", "meaning"], rows, [22, 20, 18, 40])]


# --- command line ---------------------------------------------------------------------------

def _subcommands(parser: argparse.ArgumentParser, prefix: str) -> Iterator[tuple[str, str, argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                if any(isinstance(a, argparse._SubParsersAction) for a in sub._actions):
                    yield from _subcommands(sub, f"{prefix} {name}")
                else:
                    yield f"{prefix} {name}", helps.get(name, ""), sub


def _argument(action: argparse.Action) -> str:
    if action.option_strings:
        spelled = ", ".join(action.option_strings)
        if action.nargs != 0:
            spelled += f" {action.metavar or action.dest.upper()}"
    else:
        spelled = action.metavar or action.dest
    return _code(spelled)


def _describe(action: argparse.Action) -> str:
    text = action.help or ""
    if action.choices:
        text += ("; " if text else "") + "one of " + ", ".join(_code(c) for c in action.choices)
    if action.required and action.option_strings:
        text += " (required)"
    if action.nargs != 0 and action.default not in (None, argparse.SUPPRESS) and "default" not in text:
        text += f" (default {_code(action.default)})"
    return text


class CommandLine(SphinxDirective):
    has_content = False

    def run(self) -> list[nodes.Node]:
        from pytest_smolvm.cli import build_parser

        out: list[nodes.Node] = []
        for command, help_text, sub in _subcommands(build_parser(), "python -m pytest_smolvm"):
            out.append(nodes.rubric(text=command))
            out.append(_inline(help_text.rstrip(".") + "."))
            if sub.description:
                out.append(_inline(sub.description))
            rows = [[_argument(a), _describe(a)] for a in sub._actions
                    if not isinstance(a, argparse._HelpAction)]
            if rows:
                out.append(_table(["argument", "meaning"], rows, [30, 70]))
        return out


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("smolvm-marker-keywords", MarkerKeywords)
    app.add_directive("smolvm-options", Options)
    app.add_directive("smolvm-cli", CommandLine)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
