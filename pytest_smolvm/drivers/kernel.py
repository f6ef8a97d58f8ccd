"""The guest kernel command line every driver starts from (pure)."""

from __future__ import annotations

from collections.abc import Sequence

# Measured on Debian 12 under TCG (see PLATFORM.md): together these take time-to-/init
# from 1.80 s to 1.31 s. tsc_early_khz keeps the guest from declaring the TSC unstable.
BASE_CMDLINE = (
    "console=ttyS0", "quiet", "panic=-1", "cryptomgr.notests", "lsm=", "tsc=reliable",
    "ftrace=none", "mitigations=off", "audit=0", "no_timer_check", "random.trust_cpu=on",
    # Initcalls a test VM never needs, measured with initcall_debug under TCG: kprobe
    # tracing (155 ms), the SP800-108 KDF self-test (43 ms), the module-signing keyring
    # (26 ms, and without it insmod skips RSA verification), IMA (8 ms).
    "initcall_blacklist=init_kprobe_trace,crypto_kdf108_init,load_system_certificate_list,init_ima",
)


def kernel_cmdline(accel: str, tsc_khz: int | None, extra: Sequence[str] = (), vcpus: int = 1) -> str:
    """The guest kernel command line for ``accel`` (pure)."""
    parts = list(BASE_CMDLINE)
    # panic=-1 reboots at once, and -no-reboot turns the reset into QEMU's exit (GuestDied).
    # The kernel's default reboot sequence (ACPI, keyboard controller, then a real-mode BIOS
    # jump) finds no ACPI or i8042 on microvm and, under KVM, re-enters the firmware instead
    # of resetting: the panicked guest spun until run()'s timeout (found by the nested KVM
    # run, issue 11). A triple fault always resets. A driver with its own reboot= keeps it.
    if not any(p.startswith("reboot=") for p in extra):
        parts.append("reboot=t")
    # With exactly one possible CPU the kernel rewrites every LOCK prefix in its text for
    # uniprocessor use; under TCG that patching freezes boot for ~0.5 s.
    parts.append(f"possible_cpus={max(vcpus, 2)}")
    if accel == "tcg" and tsc_khz:
        parts.append(f"tsc_early_khz={tsc_khz}")
    parts.extend(extra)
    return " ".join(parts)
