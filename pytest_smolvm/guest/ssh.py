"""``vm.ssh()``: OpenSSH in the guest, reached with paramiko, the guest's host key pinned.

Keys are made on the host for each VM (never per image, never shared by snapshot clones)
and handed to the guest over the trusted control channel before sshd starts. The client
knows the host key in advance and uses ``RejectPolicy``: a server that presents any other
key is refused (never ``AutoAddPolicy`` or ``WarningPolicy``).
"""

from __future__ import annotations

import base64
import dataclasses
import io
import socket
from typing import TYPE_CHECKING

from ..errors import NetworkError

if TYPE_CHECKING:
    import paramiko

SSH_DIR = "/run/smolvm/ssh"
SSHD_CONFIG = """\
ListenAddress {address}
Port {port}
HostKey {dir}/host_ed25519
AuthorizedKeysFile {dir}/authorized_keys
PidFile {dir}/sshd.pid
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PrintMotd no
Subsystem sftp internal-sftp
"""


def _ed25519_pair() -> tuple[bytes, bytes]:
    """(OpenSSH private key, ``ssh-ed25519 AAAA...`` public line)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public


@dataclasses.dataclass(frozen=True)
class SSHKeys:
    """A VM's host key pair and the client key the host logs in with."""

    host_private: bytes
    host_public: bytes
    client_private: bytes
    client_public: bytes

    @classmethod
    def generate(cls) -> SSHKeys:
        hp, hpub = _ed25519_pair()
        cp, cpub = _ed25519_pair()
        return cls(hp, hpub, cp, cpub)

    def pinned_host_key(self) -> paramiko.PKey:
        import paramiko

        kind, blob = self.host_public.split()[:2]
        return paramiko.PKey.from_type_string(kind.decode(), base64.b64decode(blob))

    def client_key(self) -> paramiko.PKey:
        import paramiko

        return paramiko.Ed25519Key.from_private_key(io.StringIO(self.client_private.decode()))


def guest_files(keys: SSHKeys, address: str, port: int = 22) -> dict[str, tuple[bytes, int]]:
    """Guest path → (content, mode) for sshd."""
    return {
        f"{SSH_DIR}/host_ed25519": (keys.host_private, 0o600),
        f"{SSH_DIR}/host_ed25519.pub": (keys.host_public, 0o644),
        f"{SSH_DIR}/authorized_keys": (keys.client_public + b"\n", 0o600),
        f"{SSH_DIR}/sshd_config": (SSHD_CONFIG.format(address=address, port=port, dir=SSH_DIR).encode(), 0o644),
    }


START_SSHD = f"mkdir -p /run/sshd && chmod 0755 /run/sshd && /usr/sbin/sshd -f {SSH_DIR}/sshd_config"


def connect(sock: socket.socket, hostname: str, keys: SSHKeys, timeout: float = 60.0) -> paramiko.SSHClient:
    """An SSHClient over ``sock`` that accepts only the pinned host key."""
    import paramiko

    client = paramiko.SSHClient()
    host_key = keys.pinned_host_key()
    client.get_host_keys().add(hostname, host_key.get_name(), host_key)
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    try:
        client.connect(hostname, username="root", pkey=keys.client_key(), sock=sock,
                       allow_agent=False, look_for_keys=False, timeout=timeout, banner_timeout=timeout,
                       auth_timeout=timeout)
    except paramiko.BadHostKeyException as exc:
        client.close()
        raise NetworkError(f"SSH to {hostname}: the guest presented host key {exc.key.get_fingerprint().hex()}, "
                           f"not the pinned one {exc.expected_key.get_fingerprint().hex()}; refused") from exc
    except (paramiko.SSHException, OSError) as exc:
        client.close()
        raise NetworkError(f"SSH to {hostname} failed: {type(exc).__name__}: {exc}") from exc
    return client
