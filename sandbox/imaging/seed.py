"""The cloud-init NoCloud seed of an imported disk image: an ISO 9660 volume labelled
``cidata`` (written with pycdlib) holding ``meta-data`` and ``user-data``.

``user-data`` is a MIME multi-part document: the sandbox's own cloud-config (the cache's
public key for the account the recipe names, the SSH host key the sandbox pins, no password
logins) and then the recipe's ``[cloud_init] user_data``, merged into it by cloud-init with
lists appended and dictionaries merged (``Merge-Type``), so a recipe adds packages, users or
commands without repeating the sandbox's part.
"""

from __future__ import annotations

import io
import json
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from pathlib import Path

import pycdlib
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

#: How the recipe's own cloud-config is merged into the sandbox's.
MERGE = "dict(recurse_array,no_replace)+list(append)"


def host_key_pair() -> tuple[str, str]:
    """A fresh Ed25519 SSH host key: (OpenSSH private key, public key line)."""
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption()).decode()
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH).decode()
    return private, public


def user_data(*, user: str, authorized_key: str, host_key: tuple[str, str],
              extra: str = "") -> str:
    """The seed's user-data (see the module's docstring)."""
    config: dict[str, object] = {
        "ssh_pwauth": False,
        "ssh_deletekeys": True,
        "ssh_genkeytypes": [],
        "ssh_keys": {"ed25519_private": host_key[0], "ed25519_public": host_key[1]},
    }
    if user == "root":
        config.update(disable_root=False, ssh_authorized_keys=[authorized_key])
    elif user:
        config["users"] = ["default", {"name": user, "sudo": "ALL=(ALL) NOPASSWD:ALL",
                                       "shell": "/bin/sh", "lock_passwd": True,
                                       "ssh_authorized_keys": [authorized_key]}]
    else:  # cloud-init's default user, with sudo (cloud-init gives it that)
        config["ssh_authorized_keys"] = [authorized_key]
    message = MIMEMultipart()
    # JSON is YAML: no YAML writer needed for the sandbox's part.
    message.attach(MIMEText("#cloud-config\n" + json.dumps(config, indent=1) + "\n",
                            "cloud-config"))
    if extra:
        part = MIMEText(extra, "cloud-config")
        part["Merge-Type"] = MERGE
        message.attach(part)
    return message.as_string()


def write_seed(path: Path, *, instance_id: str, hostname: str, user_data_text: str) -> None:
    """The NoCloud seed volume at ``path``."""
    meta = f"instance-id: {instance_id}\nlocal-hostname: {hostname}\n".encode()
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident="cidata")
    try:
        for name, data in (("user-data", user_data_text.encode()), ("meta-data", meta)):
            iso.add_fp(io.BytesIO(data), len(data), "/" + name.upper().replace("-", "_") + ".;1",
                       rr_name=name, joliet_path="/" + name)
        iso.write(str(path))
    finally:
        iso.close()
