"""SMOLVM_TIMEOUT_SCALE: one setting scales the engine's own waits, never a caller's timeout."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_smolvm.config import DEFAULT_BOOT_TIMEOUT, DEFAULT_TIMEOUT, VMConfig, config_from_layers
from pytest_smolvm.drivers import accel
from pytest_smolvm.errors import ConfigError
from pytest_smolvm.timeouts import TIMEOUT_SCALE_ENV, scaled, timeout_scale


def test_unset_is_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TIMEOUT_SCALE_ENV, raising=False)
    assert timeout_scale() == 1.0
    assert VMConfig().timeout == DEFAULT_TIMEOUT and VMConfig().boot_timeout == DEFAULT_BOOT_TIMEOUT


def test_scales_the_config_defaults_but_not_given_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TIMEOUT_SCALE_ENV, "4")
    assert scaled(2.5) == 10.0
    cfg = VMConfig()
    assert (cfg.timeout, cfg.boot_timeout) == (4 * DEFAULT_TIMEOUT, 4 * DEFAULT_BOOT_TIMEOUT)
    assert VMConfig(timeout=5, boot_timeout=7).timeout == 5.0
    layered = config_from_layers([("marker on test_x", {"timeout": 3})])
    assert layered.timeout == 3.0 and layered.boot_timeout == 4 * DEFAULT_BOOT_TIMEOUT


@pytest.mark.parametrize("raw", ["fast", "0.5", "0", "-2", "nan", "inf", "1000"])
def test_bad_values_are_a_config_error_naming_the_variable(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv(TIMEOUT_SCALE_ENV, raw)
    with pytest.raises(ConfigError, match=rf"invalid SMOLVM_TIMEOUT_SCALE='{raw}' \(from the environment\)"):
        timeout_scale()


def test_kvm_canary_timeout_is_scaled(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: list[float] = []

    def canary(binary: str, image: object, accel: str, timeout: float) -> tuple[bool, str]:
        seen.append(timeout)
        return True, "ok"

    monkeypatch.setattr(accel, "_verdict_path", lambda binary, image: tmp_path / "verdict.json")
    monkeypatch.setattr(accel, "canary_boot", canary)
    monkeypatch.setenv(TIMEOUT_SCALE_ENV, "3")
    assert accel.kvm_canary("qemu", object()) == (True, "ok")  # type: ignore[arg-type]
    assert seen == [3 * accel.CANARY_TIMEOUT]


@pytest.mark.parametrize(("outcome", "cached"), [
    ((True, "KVM canary boot succeeded in 6.96s"), True),
    ((False, "KVM canary boot failed (exit -6): failed to set MSR 0x10a"), True),
    ((False, f"KVM {accel.CANARY_TIMED_OUT} 8s"), False),
    ((False, f"{accel.CANARY_NOT_RUN}qemu: [Errno 12] Cannot allocate memory"), False),
])
def test_only_a_definite_canary_verdict_is_cached(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                  outcome: tuple[bool, str], cached: bool) -> None:
    """Finding (issue 11): a canary that merely ran slow (nested, or a busy CI runner) was
    cached as "KVM does not work", and accel=auto used TCG on that host from then on."""
    runs: list[float] = []

    def canary(binary: str, image: object, accel: str, timeout: float) -> tuple[bool, str]:
        runs.append(timeout)
        return outcome

    monkeypatch.setattr(accel, "_verdict_path", lambda binary, image: tmp_path / "verdict.json")
    monkeypatch.setattr(accel, "canary_boot", canary)
    assert accel.kvm_canary("qemu", object()) == outcome  # type: ignore[arg-type]
    assert accel.kvm_canary("qemu", object()) == outcome  # type: ignore[arg-type]
    assert (tmp_path / "verdict.json").exists() == cached
    assert len(runs) == (1 if cached else 2)


def test_canary_timeout_message_matches_what_is_not_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess

    def slow(*args: object, **kwargs: object) -> None:
        raise subprocess.TimeoutExpired("qemu", 8)

    monkeypatch.setattr(subprocess, "run", slow)
    image = type("I", (), {"kernel": "k", "initrd": "i", "arch": "amd64"})()
    ok, reason = accel.canary_boot("qemu", image, "kvm", 8.0)  # type: ignore[arg-type]
    assert not ok and accel.CANARY_TIMED_OUT in reason
