"""Users' own tools against real guests (sandbox.machine.tools): a testinfra Host from
``vm.testinfra()``, ansible-playbook from ``sandbox.ansible_inventory`` and from ``sandbox
inventory`` of named machines. The tools are the real ones (pytest-testinfra, ansible-core,
OpenSSH's client), nothing stands in for them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import paramiko
import pytest
import yaml

import sandbox
from sandbox.errors import SandboxError
from sandbox.machine import tools

from .conftest import sandbox_cli

PLAYBOOK = textwrap.dedent("""\
    - hosts: all
      gather_facts: true
      tasks:
        - name: the facts name the guest's system
          ansible.builtin.assert:
            that: ansible_facts['distribution'] == 'Debian'
        - ansible.builtin.copy:
            content: "hello from {{ inventory_hostname }}\\n"
            dest: /etc/sandbox-hello
            mode: "0640"
        - ansible.builtin.user:
            name: deploy
            shell: /bin/sh
        - ansible.builtin.command: id -un deploy
          register: who
          changed_when: false
        - ansible.builtin.assert:
            that: who.stdout == 'deploy'
    """)


def ansible_playbook(inventory: Path, folder: Path) -> subprocess.CompletedProcess[str]:
    """ansible-playbook as a user runs it, with its state kept in ``folder``."""
    (folder / "site.yml").write_text(PLAYBOOK)
    env = dict(os.environ, LC_ALL="C.UTF-8", ANSIBLE_HOME=str(folder / "ansible"),
               ANSIBLE_NOCOLOR="1", ANSIBLE_RETRY_FILES_ENABLED="0")
    return subprocess.run([str(Path(sys.executable).parent / "ansible-playbook"), "-i",
                           str(inventory), "site.yml"], capture_output=True, text=True,
                          env=env, cwd=folder, timeout=600, check=False)


def played(machine: sandbox.Machine) -> None:
    """What the playbook did, seen from inside the guest."""
    assert machine.succeed("cat /etc/sandbox-hello") == f"hello from {machine.name}\n"
    assert machine.succeed("stat -c %a /etc/sandbox-hello").strip() == "640"
    assert machine.succeed("getent passwd deploy | cut -d: -f7").strip() == "/bin/sh"


def test_testinfra_host_checks_a_clone(shared_vm: sandbox.Machine) -> None:
    host = shared_vm.testinfra()
    assert host.service("sandbox-sshd").is_running
    assert host.service("sandbox-sshd").is_enabled
    assert host.file("/etc/hostname").content_string == "sandbox\n"
    assert host.file("/root/.ssh").mode == 0o700
    assert host.package("dropbear-bin").is_installed
    assert host.package("python3").version.startswith("3.")
    assert host.socket("tcp://0.0.0.0:22").is_listening
    assert not host.socket("tcp://0.0.0.0:8999").is_listening
    shared_vm.succeed("systemd-run --unit sandbox-listener python3 -m http.server 8999")
    shared_vm.wait_for_port(8999)
    assert host.socket("tcp://0.0.0.0:8999").is_listening
    shared_vm.succeed("systemctl stop sandbox-listener")
    assert host.check_output("whoami") == "root"


def test_testinfra_accepts_the_pinned_host_key_only(
        shared_vm: sandbox.Machine, monkeypatch: pytest.MonkeyPatch) -> None:
    other = paramiko.Ed25519Key.from_private_key_file(str(shared_vm.key_path))  # not the host's
    monkeypatch.setattr(tools, "_host_key", lambda machine: ("ssh-ed25519", other.get_base64()))
    host = shared_vm.testinfra()
    with pytest.raises(paramiko.BadHostKeyException):
        host.run("true")


def test_testinfra_missing_names_the_extra(shared_vm: sandbox.Machine,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "testinfra.host", None)
    with pytest.raises(SandboxError, match=r"pytest-qemu-sandbox\[testinfra\]"):
        shared_vm.testinfra()


def test_a_playbook_runs_against_two_clones_from_the_written_inventory(
        built_image: dict[str, Any], tmp_path: Path) -> None:
    with sandbox.launch(name="web") as web, sandbox.launch(name="db") as db:
        inventory = sandbox.ansible_inventory([web, db], tmp_path / "hosts.yml")
        hosts = yaml.safe_load(inventory.read_text())["all"]["hosts"]
        assert set(hosts) == {"web", "db"}
        assert hosts["web"]["ansible_port"] == web.ssh_port
        assert "StrictHostKeyChecking=yes" in hosts["db"]["ansible_ssh_common_args"]
        started = time.monotonic()
        result = ansible_playbook(inventory, tmp_path)
        print(f"playbook against two clones: {time.monotonic() - started:.1f} s")
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
        assert "web" in result.stdout and "failed=0" in result.stdout
        played(web)
        played(db)
        assert json.loads(tools.inventory_text([web], "json"))["all"]["hosts"]["web"][
            "ansible_user"] == "root"
    with pytest.raises(SandboxError, match="at least one machine"):
        sandbox.ansible_inventory([], tmp_path / "none.yml")


def test_sandbox_inventory_of_named_machines(built_image: dict[str, Any],
                                             tmp_path: Path) -> None:
    names = [f"inv-{os.getpid()}-{part}" for part in ("a", "b")]
    try:
        for name in names:
            started = sandbox_cli("up", name)
            assert started.returncode == 0, started.stderr
        written = sandbox_cli("inventory", *names, "-o", str(tmp_path / "hosts.yml"))
        assert written.returncode == 0, written.stderr
        as_json = sandbox_cli("inventory", "--format", "json", *names)
        assert set(json.loads(as_json.stdout)["all"]["hosts"]) == set(names)
        every = sandbox_cli("inventory")  # all running named machines
        assert set(names) <= set(yaml.safe_load(every.stdout)["all"]["hosts"])
        result = ansible_playbook(tmp_path / "hosts.yml", tmp_path)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
        for name in names:
            hello = sandbox_cli("exec", name, "--", "cat", "/etc/sandbox-hello")
            assert hello.stdout == f"hello from {name}\n"
        unknown = sandbox_cli("inventory", "no-such-machine")
        assert unknown.returncode != 0 and "no machine named 'no-such-machine'" in \
            unknown.stderr
    finally:
        sandbox_cli("down", *names)
