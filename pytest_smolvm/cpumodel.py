"""The guest CPU model under TCG (``VMConfig.cpu``).

Its shape is checked without QEMU (:func:`check_cpu`, called by config validation); its
model name and ``+flag``/``-flag`` names are checked against this QEMU's own list once a
driver knows its binary (:func:`check_cpu_model`), so a typo is a ConfigError naming it
rather than a BootError carrying QEMU's stderr.
"""

from __future__ import annotations

import functools
import re
import subprocess
from typing import Final

from .errors import ConfigError

#: PLATFORM.md: +rdrand makes the guest RNG ready at once, +arat cuts idle guest CPU 5x.
DEFAULT_TCG_CPU: Final = "qemu64,+rdrand,+arat"
MAX_LENGTH: Final = 512
_MODEL = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")
_FEATURE = re.compile(r"[+-][A-Za-z0-9_.-]{1,64}|[A-Za-z][A-Za-z0-9_.-]{0,63}=[A-Za-z0-9_.-]{1,64}")


def _bad(value: object, why: str) -> ConfigError:
    return ConfigError(f"invalid cpu={value!r}: {why}")


def check_cpu(value: object) -> str | None:
    """Normalise ``cpu``: None (the default model) or ``MODEL[,+flag|,-flag|,prop=value]...``."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "default")):
        return None
    if not isinstance(value, str):
        raise _bad(value, "expected a QEMU CPU model string such as 'qemu64,+rdrand,+arat,+svm'")
    text = value.strip()
    if len(text) > MAX_LENGTH:
        raise _bad(text[:60] + "...", f"longer than {MAX_LENGTH} characters")
    model, *features = text.split(",")
    if not _MODEL.fullmatch(model):
        raise _bad(value, f"{model!r} is not a CPU model name (see qemu-system-x86_64 -cpu help)")
    if model == "host":
        raise _bad(value, "'host' needs KVM or HVF, and cpu applies under TCG only (under KVM and "
                          "HVF the guest always gets -cpu host); name a model such as 'max' or 'qemu64'")
    for feature in features:
        if not _FEATURE.fullmatch(feature):
            raise _bad(value, f"{feature!r} is not '+flag', '-flag' or 'property=value'")
    return text


def tcg_cpu(cpu: str | None) -> str:
    """The ``-cpu`` value of a TCG guest."""
    return cpu or DEFAULT_TCG_CPU


@functools.cache
def qemu_cpu_catalogue(binary: str) -> tuple[frozenset[str], frozenset[str]]:
    """(model names, CPUID flag names) this QEMU knows, from ``-cpu help``; empty if it
    cannot say (then nothing is refused here and QEMU itself judges)."""
    try:
        out = subprocess.run([binary, "-cpu", "help"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return frozenset(), frozenset()
    models: set[str] = set()
    flags: set[str] = set()
    in_flags = False
    for line in out.splitlines():
        if line.startswith("Recognized CPUID flags"):
            in_flags = True
        elif in_flags and line.startswith(" "):
            flags.update(line.split())
        elif line.startswith("x86 ") and len(line.split()) > 1:
            in_flags = False
            models.add(line.split()[1])
    return frozenset(models), frozenset(flags)


def check_cpu_model(binary: str, cpu: str | None) -> None:
    """Refuse (ConfigError) a ``cpu`` whose model or ``+flag``/``-flag`` this QEMU does not
    know. ``property=value`` parts are left to QEMU."""
    if cpu is None:
        return
    models, flags = qemu_cpu_catalogue(binary)
    model, *features = cpu.split(",")
    if models and model not in models:
        raise _bad(cpu, f"{binary} has no CPU model {model!r}; list them with: {binary} -cpu help")
    unknown = [f for f in features if f[0] in "+-" and flags and f[1:] not in flags]
    if unknown:
        raise _bad(cpu, f"{binary} does not know the CPU flag(s) {', '.join(unknown)}; "
                        f"list them with: {binary} -cpu help")
