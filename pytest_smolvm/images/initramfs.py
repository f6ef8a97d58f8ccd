"""Build the boot layer: an uncompressed newc cpio (gzip costs ~0.15 s of TCG boot time)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from .recipe import AGENT_PATH, BOOT_MODULES, NET_MODULES, STAGE2_INIT, stage1_init

# Applets the stage-1 init uses; each becomes a symlink to /bin/busybox.
APPLETS = ("sh", "mount", "insmod", "switch_root", "mkdir", "cp", "cat", "sleep", "poweroff")


def _entry(name: str, mode: int, data: bytes = b"", ino: int = 0) -> bytes:
    name_b = name.encode() + b"\0"
    fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name_b), 0]
    head = b"070701" + b"".join(f"{v:08x}".encode() for v in fields)
    pad_name = (-(len(head) + len(name_b))) % 4
    pad_data = (-len(data)) % 4
    return head + name_b + b"\0" * pad_name + data + b"\0" * pad_data


def newc_archive(entries: Iterable[tuple[str, int, bytes]]) -> bytes:
    """Serialise ``(path, mode, data)`` entries as a newc cpio archive (pure)."""
    out = bytearray()
    for ino, (name, mode, data) in enumerate(entries, start=1):
        out += _entry(name, mode, data, ino)
    out += _entry("TRAILER!!!", 0)
    return bytes(out)


def build_initramfs(base_dir: Path, target: Path, agent: Path) -> None:
    """Write the initramfs for the image base in ``base_dir`` to ``target`` atomically, with
    the static guest ``agent`` binary (:func:`pytest_smolvm.images.agentbin.agent_binary`)."""
    d = stat.S_IFDIR | 0o755
    entries: list[tuple[str, int, bytes]] = [
        (p, d, b"") for p in ("bin", "dev", "proc", "sys", "newroot", "lib", "lib/modules", "smolvm")
    ]
    entries.append(("init", stat.S_IFREG | 0o755, stage1_init()))
    entries.append(("bin/busybox", stat.S_IFREG | 0o755, (base_dir / "busybox").read_bytes()))
    entries += [(f"bin/{a}", stat.S_IFLNK | 0o777, b"busybox") for a in APPLETS]
    for mod in BOOT_MODULES + NET_MODULES:
        entries.append((f"lib/modules/{mod}.ko", stat.S_IFREG | 0o644,
                        (base_dir / "modules" / f"{mod}.ko").read_bytes()))
    entries.append((f"smolvm/{PurePosixPath(AGENT_PATH).name}", stat.S_IFREG | 0o755, agent.read_bytes()))
    entries.append(("smolvm/init.sh", stat.S_IFREG | 0o755, STAGE2_INIT.encode()))
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_bytes(newc_archive(entries))
    os.replace(tmp, target)
