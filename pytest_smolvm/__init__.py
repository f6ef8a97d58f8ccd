"""pytest-smolvm: a hardware-isolated microVM per test.

The engine (this package minus ``plugin``/``fixtures``/``markers``/``hookspecs``) never
imports pytest and can be used from any script::

    from pytest_smolvm import SmolVM, VMConfig

    with SmolVM(VMConfig(vcpus=1, memory_mib=256)) as vm:
        print(vm.run("uname -a").stdout)
"""

from .checkpoints import Checkpoint, CheckpointError
from .config import VMConfig
from .errors import (
    BootError,
    CommandFailed,
    CommandTimeout,
    ConfigError,
    GuestDied,
    GuestError,
    GuestFileError,
    GuestTimeout,
    ImageError,
    NetworkError,
    NetworkUnavailable,
    ProtocolError,
    SmolVMError,
)
from .evidence import Evidence
from .network.credentials import Secret
from .process import Process
from .results import RunResult
from .snapshots import SnapshotWarning
from .transfer import TransferWarning
from .vm import SmolVM

__all__ = [
    "BootError",
    "Checkpoint",
    "CheckpointError",
    "CommandFailed",
    "CommandTimeout",
    "ConfigError",
    "Evidence",
    "GuestDied",
    "GuestError",
    "GuestFileError",
    "GuestTimeout",
    "ImageError",
    "NetworkError",
    "NetworkUnavailable",
    "Process",
    "ProtocolError",
    "RunResult",
    "Secret",
    "SmolVM",
    "SmolVMError",
    "SnapshotWarning",
    "TransferWarning",
    "VMConfig",
]
