"""SSH client keys: the cache's own (ed25519, made once, baked into every image built
there) and the copy each image entry keeps of the key baked into it, which travels with the
entry to other hosts."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ..base.paths import cache_dir, private_lock


@dataclass(frozen=True)
class KeyPair:
    private_path: Path
    public_line: str

    def load(self) -> paramiko.PKey:
        return paramiko.Ed25519Key.from_private_key_file(str(self.private_path))

    def copy_to(self, target: Path) -> KeyPair:
        """This keypair with its private key copied to ``target`` (made private, 0600)."""
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(self.private_path.read_bytes())
        return KeyPair(target, self.public_line)


def cache_key() -> KeyPair:
    """The cache's keypair, created on first use (under a lock, so concurrent callers agree)."""
    directory = cache_dir() / "keys"
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    private = directory / "id_ed25519"
    public = directory / "id_ed25519.pub"
    if not public.exists():
        with private_lock(directory / ".lock"):
            if not public.exists():
                key = Ed25519PrivateKey.generate()
                pem = key.private_bytes(serialization.Encoding.PEM,
                                        serialization.PrivateFormat.OpenSSH,
                                        serialization.NoEncryption())
                line = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH)
                fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "wb") as handle:
                    handle.write(pem)
                tmp = public.with_suffix(".tmp")
                tmp.write_bytes(line + b" pytest-qemu-sandbox\n")
                tmp.rename(public)
    return KeyPair(private, public.read_text().strip())
