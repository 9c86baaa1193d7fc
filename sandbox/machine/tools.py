"""Users' own tools on a machine: a testinfra ``Host`` (:func:`testinfra_host`, behind
``vm.testinfra()``) and an Ansible inventory (:func:`ansible_inventory`, ``sandbox
inventory``). Both reach the machine the way ``ssh`` from the host would: its forwarded SSH
port on 127.0.0.1, its image's client key, its login account, and the image's host key
pinned (a file ``known_hosts`` in the machine's directory, under an alias of its own, so no
other key is accepted and the user's own ``~/.ssh/known_hosts`` is never touched)."""

from __future__ import annotations

import base64
import functools
import json
import os
import shlex
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import SandboxError

if TYPE_CHECKING:
    from ..imaging.image import Image
    from ..vm.files import MachineFiles


class Machine(Protocol):
    """What the tools use of :class:`sandbox.Machine` (which imports this module)."""

    name: str
    user: str
    image: Image | None
    files: MachineFiles | None

    @property
    def ssh_port(self) -> int: ...

    @property
    def key_path(self) -> Path: ...

#: What ``sandbox inventory`` and ansible_inventory write.
FORMATS = ("yaml", "json")


def _host_key(machine: Machine) -> tuple[str, str]:
    """The machine's pinned host key: (type, base64)."""
    line = machine.image.host_key if machine.image is not None else None
    parts = (line or "").split()
    if len(parts) < 2:
        raise SandboxError(f"{machine.name}: its image records no SSH host key to pin, so no "
                           "tool can be pointed at it safely; rebuild the image")
    return parts[0], parts[1]


def host_alias(machine: Machine) -> str:
    """The name the machine's host key is pinned under (OpenSSH's HostKeyAlias)."""
    return f"sandbox-{machine.name}"


def known_hosts_file(machine: Machine) -> Path:
    """A known_hosts file in the machine's directory holding its host key alone (written
    on first use; the directory is private to the account)."""
    if machine.files is None:
        raise SandboxError(f"{machine.name} is not running")
    key_type, key = _host_key(machine)
    path = machine.files.dir / "known_hosts"
    line = f"{host_alias(machine)} {key_type} {key}\n"
    if not path.exists() or path.read_text() != line:
        part = path.with_name(f".known_hosts.{os.getpid()}")
        part.write_text(line)
        part.chmod(0o600)
        part.replace(path)
    return path


def ssh_options(machine: Machine) -> list[str]:
    """OpenSSH client options that reach the machine with only its own host key accepted."""
    return ["-o", f"HostKeyAlias={host_alias(machine)}",
            "-o", f"UserKnownHostsFile={known_hosts_file(machine)}",
            "-o", "StrictHostKeyChecking=yes", "-o", "IdentitiesOnly=yes",
            "-o", "GlobalKnownHostsFile=/dev/null"]


# -- testinfra ------------------------------------------------------------------------------

def testinfra_host(machine: Machine, *, sudo: bool = False) -> Any:
    """A ``testinfra.host.Host`` on ``machine``: testinfra's paramiko backend, on the
    machine's SSH port with its image's key and user, the host key pinned. ``sudo``: every
    command through sudo (an imported image's user has password-less sudo)."""
    try:
        import paramiko
        from testinfra.backend.paramiko import ParamikoBackend
        from testinfra.host import Host
    except ImportError as exc:
        raise SandboxError("vm.testinfra() needs testinfra: pip install "
                           "'pytest-qemu-sandbox[testinfra]' (or pytest-testinfra)") from exc
    key_type, key = _host_key(machine)
    port, user = machine.ssh_port, machine.user
    identity = str(machine.key_path)

    class PinnedBackend(ParamikoBackend):  # type: ignore[misc]
        """testinfra's paramiko backend, but only this machine's host key is accepted and
        no ~/.ssh/config is read."""

        @functools.cached_property
        def client(self) -> paramiko.SSHClient:
            client = paramiko.SSHClient()
            client.get_host_keys().add(f"[127.0.0.1]:{port}", key_type,
                                       paramiko.PKey.from_type_string(
                                           key_type, base64.b64decode(key)))
            client.set_missing_host_key_policy(paramiko.RejectPolicy())
            client.connect("127.0.0.1", port=port, username=user, key_filename=identity,
                           timeout=self.timeout, allow_agent=False, look_for_keys=False)
            return client

    backend = PinnedBackend(f"paramiko://{user}@127.0.0.1:{port}", ssh_identity_file=identity,
                            sudo=sudo, timeout=30)
    return Host(backend)


# -- Ansible --------------------------------------------------------------------------------

def inventory_data(machines: Iterable[Machine]) -> dict[str, Any]:
    """Ansible's inventory for ``machines``: one host each under ``all``, by machine name."""
    hosts: dict[str, dict[str, Any]] = {}
    for machine in machines:
        if machine.name in hosts:
            raise SandboxError(f"two machines named {machine.name!r}: Ansible needs each "
                               "host once (name them: vm_factory(name=...))")
        variables: dict[str, Any] = {
            "ansible_host": "127.0.0.1",
            "ansible_port": machine.ssh_port,
            "ansible_user": machine.user,
            "ansible_ssh_private_key_file": str(machine.key_path),
            "ansible_ssh_common_args": shlex.join(ssh_options(machine)),
            # Each task's module through the SSH session's stdin: no temporary files copied
            # in first, fewer connections (under TCG each costs the guest a key exchange).
            "ansible_pipelining": True,
        }
        kind = machine.image.kind if machine.image is not None else ""
        # The project's images have python3 there (its agent runs on it); imported ones:
        # Ansible looks, quietly.
        variables["ansible_python_interpreter"] = ("/usr/bin/python3" if kind == "debian"
                                                   else "auto_silent")
        hosts[machine.name] = variables
    return {"all": {"hosts": hosts}}


def inventory_text(machines: Iterable[Machine], fmt: str = "yaml") -> str:
    """The inventory as YAML (every string JSON-quoted, which YAML reads as is) or JSON."""
    data = inventory_data(machines)
    if fmt == "json":
        return json.dumps(data, indent=2) + "\n"
    if fmt != "yaml":
        raise SandboxError(f"unknown inventory format {fmt!r}; use one of {', '.join(FORMATS)}")
    lines = ["# Ansible inventory of pytest-qemu-sandbox machines", "all:", "  hosts:"]
    for name, variables in data["all"]["hosts"].items():
        lines.append(f"    {json.dumps(name)}:")
        lines.extend(f"      {key}: {json.dumps(value)}" for key, value in variables.items())
    return "\n".join(lines) + "\n"


def ansible_inventory(machines: Sequence[Machine], path: str | os.PathLike[str], *,
                      fmt: str = "yaml") -> Path:
    """Write an Ansible inventory of ``machines`` to ``path`` (YAML, or JSON with
    ``fmt="json"``) and return the path: host names are machine names, each with its port,
    user, key and pinned host key."""
    if not machines:
        raise SandboxError("ansible_inventory needs at least one machine")
    target = Path(path)
    target.write_text(inventory_text(machines, fmt))
    return target
