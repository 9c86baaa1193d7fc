"""Prepared-state templates: a running machine's disk and RAM saved once, cloned per test.

A template has the golden snapshot format (see :mod:`sandbox.golden`): ``ram`` (a file
only the pages the guest had touched occupy), ``state`` (devices only, under 1 MB),
``disk.qcow2`` (the machine's overlay as it was, on its base's disk), ``ssh-prelude``,
``console.log`` and ``manifest.json``; so its clones start through
:meth:`sandbox.golden.Golden.start_clone`, with their own overlay, copy-on-write RAM and
identity, and an SSH server already waiting.

Saving (QEMU 7.2 has no way to write a private RAM mapping to a file of its own):

1. the machine gets a fresh SSH server waiting on its virtio-serial port (the fast first
   command of its clones), its TCP session is closed, and it is stopped;
2. its full state (RAM included) goes to a scratch file, and its disk overlay, flushed by
   the migration, is copied as the template's disk; then the machine runs on;
3. a helper QEMU of the same shape, its RAM a new shared file, loads the full state and
   saves it again with ``x-ignore-shared``: RAM stays in the file, the state is tiny.

Layout: ``<cache>/templates/<name>-<id>/``; the id covers the name, the user's key, the
base (the golden snapshot or template the machine came from, as made at that time) and the
machine's shape. A template whose base was rebuilt or removed is stale: listed, never
cloned (its disk is an overlay on a base that no longer exists as it was).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import socket
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..base.entries import entry_lock, publish, remove_entry
from ..base.paths import cache_dir
from ..errors import SnapshotError, TemplateError
from ..host.tools import qemu_version
from ..imaging.image import Image
from . import console
from .files import MachineFiles, run_tag
from .golden import GOLDEN_CONSOLE_BYTES, Golden, arm_ssh_port
from .plan import create_overlay, plan_for
from .qemu import QemuProcess
from .runs import current_run
from .spec import MachineSpec

if TYPE_CHECKING:
    from ..machine.machine import Machine

TEMPLATE_VERSION = "1"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


@dataclass(frozen=True)
class Template:
    """A saved machine state; pass it (or its name) as ``template=`` to start clones."""

    golden: Golden

    @property
    def path(self) -> Path:
        return self.golden.path

    @property
    def manifest(self) -> dict[str, Any]:
        return self.golden.manifest

    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def id(self) -> str:
        """This version of the template (its name and an id); what ``template=`` accepts."""
        return self.path.name

    @property
    def key(self) -> str | None:
        return self.manifest.get("user_key")

    @property
    def image(self) -> str:
        return str(self.manifest["image"])

    @property
    def base(self) -> str:
        """What it was made from: ``golden:<entry>`` or ``template:<id>`` or ``image:<name>``."""
        base = self.manifest["base"]
        return f"{base['kind']}:{Path(base['path']).name}"

    @property
    def created(self) -> str:
        return str(self.manifest["created_at"])

    @property
    def size(self) -> int:
        """Bytes it occupies on disk (sparse files counted by their blocks)."""
        return sum(p.lstat().st_blocks * 512 for p in self.path.iterdir())

    @property
    def stale(self) -> bool:
        return self.stale_reason() is not None

    def stale_reason(self) -> str | None:
        """Why its clones cannot start (its base or image is gone or was rebuilt), or None."""
        return _base_problem(self.manifest)

    def spec(self) -> MachineSpec:
        return MachineSpec.from_kwargs(**self.manifest["spec"])

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "id": self.id, "key": self.key, "image": self.image,
                "base": self.base, "size": self.size, "created": self.created,
                "stale": self.stale_reason() or False, "path": str(self.path)}

    def __str__(self) -> str:
        return self.id


def templates_root() -> Path:
    path = cache_dir() / "templates"
    path.mkdir(parents=True, exist_ok=True)
    return path


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise TemplateError(f"template name {name!r}: use up to 63 letters, digits, '.', '_', "
                            "'-', starting with a letter or digit")
    return name


def _base_problem(manifest: dict[str, Any]) -> str | None:
    if manifest.get("qemu_version") != qemu_version():
        return f"it was saved by QEMU {manifest.get('qemu_version')}, not {qemu_version()}"
    base = manifest["base"]
    path = Path(base["path"])
    if base["kind"] == "image":
        return None if (path / "disk.qcow2").exists() else f"its image {path.name} is gone"
    try:
        current = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError):
        return f"its base {base['kind']} {path.name} is gone"
    if current.get("created_at") != base["created_at"]:
        return f"its base {base['kind']} {path.name} was made again since"
    return _base_problem(current) if base["kind"] == "template" else None


def load_template(path: Path) -> Template | None:
    try:
        golden = Golden.load(path)
    except (OSError, ValueError):
        return None
    return Template(golden) if golden.manifest.get("kind") == "template" else None


def templates() -> list[Template]:
    """Every saved template, stale ones included (see :attr:`Template.stale`)."""
    found = (load_template(p) for p in sorted(templates_root().iterdir())
             if not p.name.startswith("."))
    return sorted((t for t in found if t is not None), key=lambda t: (t.name, t.created))


def find_template(ref: str | Template) -> Template:
    """The template ``ref`` names: an id (``name-<id>``) exactly, or a name (its newest
    version that is not stale). TemplateError, listing what exists, when there is none."""
    if isinstance(ref, Template):
        ref = ref.id
    exact = load_template(templates_root() / ref) if _NAME.match(ref) else None
    if exact is not None:
        return exact
    versions = [t for t in templates() if t.name == ref]
    usable = [t for t in versions if not t.stale]
    if usable:
        return usable[-1]
    if versions:
        raise TemplateError(f"template {ref!r} is stale ({versions[-1].stale_reason()}); save "
                            f"it again, and remove the old one with: sandbox template rm {ref}")
    known = ", ".join(sorted({t.name for t in templates()})) or "none"
    raise TemplateError(f"no template named {ref!r}; known templates: {known}. Save one with "
                        "vm.save_template(name) or: sandbox template save MACHINE NAME")


def remove_template(name: str) -> list[str]:
    """Remove every version of template ``name`` (or one, by its id); what was removed.
    Running clones keep running: their files stay open."""
    removed = []
    for template in templates():
        if name in (template.name, template.id):
            with entry_lock(template.path):
                remove_entry(template.path)
            removed.append(f"removed template {template.id}")
    if not removed:
        raise TemplateError(f"no template named {name!r}; see: sandbox template ls")
    return removed


def template_id(name: str, key: str | None, base: dict[str, Any], shape: list[str]) -> str:
    payload = json.dumps([TEMPLATE_VERSION, name, key, base, qemu_version(), shape])
    return f"{name}-{hashlib.sha256(payload.encode()).hexdigest()[:16]}"


def clone_spec(template: Template, requested: MachineSpec) -> tuple[MachineSpec, Image, str]:
    """The spec, image and accelerator of a clone of ``template``: the template's shape;
    from ``requested`` only the accelerator choice and the timeouts. TemplateError when the
    template is stale or ``requested`` asks for another shape."""
    from .accel import resolve_accel

    problem = template.stale_reason()
    image_path = Path(template.manifest["image_path"])
    if problem is None and not (image_path / "manifest.json").exists():
        problem = f"its image {image_path.name} is gone"
    if problem is not None:
        raise TemplateError(f"template {template.id} cannot be cloned: {problem}; save it "
                            f"again (sandbox template rm {template.name} removes this one)")
    try:
        template.golden.check()
    except SnapshotError as exc:
        raise TemplateError(f"template {template.id} is damaged ({exc}); save it again (a "
                            "vm_template fixture does that by itself)") from exc
    saved = template.spec()
    clashes = [f"{field}={getattr(requested, field)!r} (it has {getattr(saved, field)!r})"
               for field, default in (("memory_mib", None), ("cpus", None), ("qemu_args", ()),
                                      ("network", "restricted"), ("image", "debian-12"))
               if getattr(requested, field) not in (default, getattr(saved, field))]
    if requested.cold:
        clashes.append("cold=True (a template is a saved state)")
    if len(requested.networks) != len(saved.networks):
        clashes.append(f"{len(requested.networks)} network(s) (it was saved on "
                       f"{len(saved.networks)}: its clones need as many)")
    if clashes:
        raise TemplateError(f"template {template.id} was saved from another machine shape: "
                            f"{', '.join(clashes)}; leave those out to get the template's")
    accel = resolve_accel(requested.accel)
    if accel != template.manifest["accel"]:
        raise TemplateError(f"template {template.id} was saved under "
                            f"{template.manifest['accel']}, this machine would run under "
                            f"{accel}: save it again under {accel}")
    spec = replace(saved, template=template.id, accel=requested.accel,
                   networks=requested.networks,
                   boot_timeout=requested.boot_timeout,
                   command_timeout=requested.command_timeout)
    return spec, Image.load(image_path), accel


def base_entry(kind: str, source: Golden) -> dict[str, Any]:
    return {"kind": kind, "path": str(source.path),
            "created_at": source.manifest.get("created_at")}


def base_of(machine: Machine) -> dict[str, Any]:
    """What ``machine``'s disk overlay and RAM came from."""
    source = machine.source
    if source is not None:
        return base_entry("template" if source.manifest.get("kind") == "template" else "golden",
                     source)
    assert machine.image is not None
    return {"kind": "image", "path": str(machine.image.path),
            "created_at": machine.image.manifest.get("built_at")}


def locate(machine: Machine, name: str, key: str | None) -> Path:
    assert machine.qemu is not None and machine.qemu.plan is not None
    return templates_root() / template_id(name, key, base_of(machine),
                                          machine.qemu.plan.shape())


# -- saving -----------------------------------------------------------------------------------


def save_template(machine: Machine, name: str, key: str | None = None) -> Template:
    """Save running ``machine`` as template ``name`` (replacing one of the same name, key
    and base); the machine keeps running. See the module's description."""
    check_name(name)
    if machine.qemu is None or machine.files is None or machine.image is None:
        raise TemplateError(f"{machine.name} is not running; start it before saving it")
    if machine.home is not None and machine.qemu.process is None:
        raise TemplateError(f"{machine.name}: no QEMU monitor to save it through")
    final = locate(machine, name, key)

    def build(work: Path) -> None:
        write_template(machine, name, key, work)

    with entry_lock(final):
        if final.exists():
            remove_entry(final)
        publish(final, build, owner_writable=("ram",))
    template = load_template(final)
    assert template is not None
    return template


def write_template(machine: Machine, name: str, key: str | None, work: Path) -> None:
    assert machine.qemu is not None and machine.files is not None and machine.image is not None
    assert machine.qemu.plan is not None and machine.accel is not None
    qemu, files, plan = machine.qemu, machine.files, machine.qemu.plan
    started = time.monotonic()
    agent = bool(machine.source.manifest.get("agent", True)) if machine.source else \
        machine.image.kind == "debian"
    machine._quiesce_for_save()  # now on TCP, the relay of the port's old session gone
    port: socket.socket | None = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    assert port is not None
    port.connect(str(files.ssh_socket))
    try:
        # Without an agent (an imported image where it could not start) clones use TCP.
        prelude = arm_ssh_port(qemu, files, port, machine.image) if agent else None
        machine._drop_channel()  # quiesce: no TCP connection inside the saved state
        time.sleep(0.2)
        qemu.qmp("stop")
        full = work / "full-state"
        try:
            qemu.save_state(full, f"saving {machine.name}", ignore_shared=False)
            saved = time.monotonic()
            # The migration flushed and let go of the disk: a consistent copy.
            shutil.copyfile(machine.files.overlay, work / "disk.qcow2")
        finally:
            qemu.qmp("cont")
        machine._resume_after_save(port, prelude)
        port = None  # the machine's now
        copied = time.monotonic()
        _reload_into_shared_ram(machine, full, work)
        full.unlink()
    finally:
        if port is not None:
            port.close()
    if prelude is not None:
        (work / "ssh-prelude").write_bytes(prelude)
    console.copy(files.console_log, work / "console.log", GOLDEN_CONSOLE_BYTES)
    manifest = {
        "kind": "template", "name": name, "user_key": key, "user": machine.user,
        "agent": agent,
        "template_version": TEMPLATE_VERSION, "base": base_of(machine),
        "image": machine.image.name, "image_path": str(machine.image.path),
        "image_digest": machine.image.digest,
        "image_built_at": machine.image.manifest.get("built_at"),
        "spec": dict(machine.spec.to_kwargs(), template=None),
        "qemu_version": qemu_version(), "shape": plan.shape(),
        "memory_mib": plan.memory_mib, "cpus": plan.cpus, "accel": plan.accel,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "full_save_seconds": round(saved - started, 2),
        "reload_seconds": round(time.monotonic() - copied, 2),
        "save_seconds": round(time.monotonic() - started, 2),
        "state_bytes": (work / "state").stat().st_size,
        "ram_bytes_used": (work / "ram").stat().st_blocks * 512,
        "disk_bytes": (work / "disk.qcow2").stat().st_size,
    }
    (work / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def _reload_into_shared_ram(machine: Machine, full: Path, work: Path) -> None:
    """Load the full state into a helper QEMU whose RAM is ``work/ram`` (shared), and save
    its devices again with x-ignore-shared into ``work/state``."""
    assert machine.image is not None and machine.accel is not None
    run = current_run()
    files = MachineFiles(run.machine_dir(f"template-{work.name[-24:]}"))
    plan = plan_for(machine.spec, machine.image, machine.accel, files=files,
                    tag=run_tag(run.id, files.dir.name),
                    disk=create_overlay(work / "disk.qcow2", files.overlay),
                    ram_file=work / "ram", ram_shared=True, incoming=True)
    helper = QemuProcess(plan, files)
    port: socket.socket | None = None
    try:
        helper.launch(die_with_parent=True)
        # The SSH port must count as connected in the saved state, as in a golden save.
        port = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        port.connect(str(files.ssh_socket))
        helper.wait_chardev_open("ssh0")
        helper.load_state(full, "loading the machine into shared RAM", ignore_shared=False)
        helper.save_state(work / "state", "saving the template")
    finally:
        helper.stop()
        if port is not None:
            port.close()
        shutil.rmtree(files.dir, ignore_errors=True)
