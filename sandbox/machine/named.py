"""Named machines: VMs that outlive the process that started them (``sandbox up``, and
failed tests kept with ``--sandbox-keep-on-failure``).

Each lives in ``<runtime>/machines/<name>/`` beside its QMP socket, console log and overlay,
with a ``state.json`` saying how to reach it (:func:`write_state` is its one writer,
:class:`NamedMachine` its reader). A machine whose QEMU has died shows as dead, and
``sandbox prune`` (or ``sandbox down``) clears it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..base.paths import runtime_dir
from ..base.processes import kill_tagged, process_alive, process_start_ticks
from ..base.progress import QUIET, Reporter
from ..base.waits import wait_until
from ..errors import SandboxError
from ..vm import console
from ..vm.files import MachineFiles, named_tag, named_tag_marker
from ..vm.spec import MachineSpec, check_machine_name

if TYPE_CHECKING:
    from .machine import Machine

#: How long `down` waits for a busy monitor before it stops the machine by signal.
DOWN_GRACE = 3.0
#: How long an `up` that died while starting may leave its directory before prune clears it.
UNFINISHED_GRACE = 300.0


def machines_dir() -> Path:
    path = runtime_dir() / "machines"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def check_name(name: str) -> str:
    return check_machine_name(name)


@dataclass(frozen=True)
class NamedMachine:
    name: str
    path: Path
    state: dict[str, Any]

    @property
    def pid(self) -> int:
        return int(self.state["pid"])

    @property
    def alive(self) -> bool:
        return process_alive(self.pid, self.state.get("start_ticks"))

    @property
    def status(self) -> str:
        return "running" if self.alive else "dead"

    @property
    def spec(self) -> MachineSpec:
        return MachineSpec.from_kwargs(**self.state["spec"])

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "image": self.state["image"],
                "networks": self.state.get("networks") or {},
                "pid": self.pid, "ssh_port": self.state["ssh_port"],
                "memory_mib": self.state.get("memory_mib"), "cpus": self.state.get("cpus"),
                "created": self.state.get("created"), "path": str(self.path)}


def write_state(machine: Machine) -> None:
    """Record how to reach ``machine`` (a started one) in its directory."""
    assert machine.dir is not None and machine.image is not None and machine.qemu is not None
    plan = machine.qemu.plan
    pid = machine.pid or 0
    start_ticks = process_start_ticks(pid)
    state = {
        "name": machine.name, "image": machine.spec.image, "image_path": str(machine.image.path),
        "pid": pid, "start_ticks": start_ticks,
        "ssh_port": machine.ssh_port, "user": machine.user,
        "memory_mib": plan.memory_mib if plan else None,
        "cpus": plan.cpus if plan else None, "spec": machine.spec.to_kwargs(),
        # what its overlay and RAM came from (a golden snapshot or template), for saving it
        "source": str(machine.source.path) if machine.source else None,
        "networks": {Path(path).name: address for path, address in machine.addresses.items()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    tmp = machine.dir / "state.json.tmp"
    tmp.write_text(json.dumps(state, indent=2))
    tmp.rename(machine.dir / "state.json")
    # The console log stays bounded after this process exits, by a keeper that ends with QEMU.
    console.start_keeper(MachineFiles(machine.dir).console_log, pid, start_ticks)


def up(spec: MachineSpec, name: str, *, reporter: Reporter = QUIET,
       networks: tuple[str, ...] = ()) -> Machine:
    """Start named machine ``name``; it keeps running after this process exits. The
    returned handle is connected; ``disconnect()`` it when done. ``networks``: named
    networks to put it on (started if they are not running)."""
    from dataclasses import replace

    from ..net.named_network import ensure
    from .machine import Machine

    if networks:
        spec = replace(spec, networks=tuple(str(ensure(n)) for n in networks))
    home = machines_dir() / check_name(name)
    try:
        home.mkdir(mode=0o700)
    except FileExistsError:
        raise SandboxError(f"a machine named {name!r} exists already; pick another name or "
                           f"remove it with: sandbox down {name}") from None
    machine = Machine(spec, name=name, reporter=reporter, die_with_parent=False, home=home,
                      tag=named_tag(name), peer_shell=_as_root_in)
    try:
        machine.start()  # on failure, close() removed the directory
    except BaseException:
        _leave_named_networks(name, spec.networks)
        raise
    write_state(machine)
    return machine


def _as_root_in(name: str, command: str) -> str:
    """Run ``command`` as root in named machine ``name`` over SSH: how a peer without a guest
    agent learns the name of a machine joining its named network."""
    machine = attach(name, monitor=False)
    try:
        return machine.succeed_as_root(command, timeout=60)
    finally:
        machine.disconnect()


def _leave_named_networks(name: str, networks: tuple[str, ...] | list[str]) -> None:
    from ..net.named_network import leave, networks_dir

    for network in networks:
        leave(name, networks_dir() / Path(network).name)


def unique_name(stem: str) -> str:
    """``stem``, or ``stem-2``, ``stem-3``...: the first name no named machine has."""
    name, suffix = stem, 1
    while (machines_dir() / name).exists():
        suffix += 1
        name = f"{stem}-{suffix}"
    return name


def keep(machine: Machine, name: str) -> None:
    """Hand a running machine over to the named machines instead of closing it: it keeps
    running after this process exits (``sandbox ssh NAME``, ``sandbox down NAME``). Only for
    machines started with ``keepable=True`` (or ``die_with_parent=False``)."""
    if machine.die_with_parent and not machine.keepable:
        raise SandboxError(f"{machine.name} dies with this process and cannot be kept; start "
                           "it with keepable=True (--sandbox-keep-on-failure)")
    assert machine.dir is not None
    target = machines_dir() / check_name(name)
    machine.dir.rename(target)
    machine.moved(target, name)
    write_state(machine)
    machine.detach()  # only now: a kill before this point takes the machine along
    machine.disconnect()


def attach(name: str, *, connect_ssh: bool = True, monitor: bool = True) -> Machine:
    """A handle on the running named machine ``name``: SSH over TCP unless ``connect_ssh``
    is False, its QMP monitor unless ``monitor`` is False (the monitor serves one client,
    so take it only to use it)."""
    from ..imaging.image import Image
    from .machine import Machine

    named = find_named(name)
    if not named.alive:
        raise SandboxError(f"machine {name!r} is dead (its QEMU exited); remove it with: "
                           f"sandbox down {name}")
    machine = Machine(named.spec, name=name, die_with_parent=False, home=named.path)
    machine.user = named.state.get("user", "root")
    recorded = named.state.get("networks") or {}
    machine.addresses = {path: recorded[Path(path).name] for path in named.spec.networks
                         if Path(path).name in recorded}
    if named.state.get("source"):  # what its RAM and disk came from (to save it)
        from ..vm.golden import Golden

        with contextlib.suppress(OSError, ValueError):
            machine.source = Golden.load(Path(named.state["source"]))
    machine.adopt(Image.load(Path(named.state["image_path"])), named.pid,
                  named.state.get("start_ticks"), int(named.state["ssh_port"]),
                  connect_ssh=connect_ssh, monitor=monitor)
    return machine


def down(name: str) -> None:
    """Stop named machine ``name`` and delete it: gracefully through its monitor when that
    answers within a few seconds, else by signal (its recorded pid and start time); whether
    or not its image, monitor socket or SSH server are still there."""
    from ..base.processes import Pid
    from ..vm.qemu import QemuProcess

    named = find_named(name)
    if named.alive:
        qemu = QemuProcess(None, MachineFiles(named.path))
        with contextlib.suppress(SandboxError):  # no monitor: stop() signals by pid
            qemu.adopt(named.pid, named.state.get("start_ticks"), monitor_timeout=DOWN_GRACE)
        if qemu.process is None:
            qemu.process = Pid(named.pid, named.state.get("start_ticks"))
        qemu.stop()
    remove_named(named)


def list_named() -> list[NamedMachine]:
    found = []
    for path in sorted(machines_dir().iterdir()):
        try:
            state = json.loads((path / "state.json").read_text())
        except (OSError, ValueError):
            continue
        found.append(NamedMachine(path.name, path, state))
    return found


def find_named(name: str) -> NamedMachine:
    for machine in list_named():
        if machine.name == name:
            return machine
    known = ", ".join(m.name for m in list_named()) or "none"
    raise SandboxError(f"no machine named {name!r}; known machines: {known}. "
                       f"Start one with: sandbox up {name}")


def remove_named(machine: NamedMachine, *, timeout: float = 5.0) -> None:
    """Kill the machine's QEMU (if it still runs as recorded) and delete its directory."""
    if machine.alive:
        os.kill(machine.pid, signal.SIGKILL)
        with contextlib.suppress(SandboxError):  # its directory goes all the same
            wait_until(lambda: not machine.alive, timeout=timeout, interval=0.02,
                       what=f"QEMU of {machine.name} (pid {machine.pid}) did not exit")
    shutil.rmtree(machine.path, ignore_errors=True)
    _leave_named_networks(machine.name, list(machine.state.get("networks") or {}))


def prune_named() -> list[str]:
    """Remove the directories of named machines whose QEMU is gone."""
    removed = []
    for machine in list_named():
        if not machine.alive:
            shutil.rmtree(machine.path, ignore_errors=True)
            _leave_named_networks(machine.name, list(machine.state.get("networks") or {}))
            removed.append(f"removed dead machine {machine.name}")
    # Directories without a state file belong to an `up` that died while starting (or one
    # starting right now: leave young ones alone).
    for path in machines_dir().iterdir():
        if not (path / "state.json").exists() and \
                time.time() - path.stat().st_mtime > UNFINISHED_GRACE:
            kill_tagged(MachineFiles(path).pidfile, named_tag_marker(path.name))
            shutil.rmtree(path, ignore_errors=True)
            removed.append(f"removed unfinished machine {path.name}")
    return removed
