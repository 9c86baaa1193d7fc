"""Prepared-state templates: a running machine's disk and RAM saved once, cloned per test.
This module holds their format, their catalogue and what a clone of one starts from.

A template has the golden snapshot format (see :mod:`sandbox.vm.golden`): ``ram`` (a file
only the pages the guest had touched occupy), ``state`` (devices only, under 1 MB),
``disk.qcow2`` (the machine's overlay as it was, on its base's disk), ``ssh-prelude``,
``console.log`` and ``manifest.json``; so its clones start through
:meth:`sandbox.vm.golden.Golden.start_clone`, with their own overlay, copy-on-write RAM and
identity, and an SSH server already waiting.

Saving (QEMU 7.2 has no way to write a private RAM mapping to a file of its own; steps 1
and 2 are the machine's, :meth:`sandbox.machine.states.SavedStates.save_template`):

1. the machine gets a fresh SSH server waiting on its virtio-serial port (the fast first
   command of its clones), its TCP session is closed, and it is stopped;
2. its full state (RAM included) goes to a scratch file, and its disk overlay, flushed by
   the migration, is copied as the template's disk; then the machine runs on;
3. a helper QEMU of the same shape, its RAM a new shared file, loads the full state and
   saves it again with ``x-ignore-shared``: RAM stays in the file, the state is tiny.

Layout: ``<cache>/templates/<name>-<id>/``; the id covers the name, the user's key, the
base (the golden snapshot or template the machine came from, by entry name, as made at that
time) and the machine's shape; never a path, so hosts that share entries agree on it. The
manifest names its base and image by entry name (resolved in the current cache), and
``disk.qcow2`` names its base's disk by a relative path (``../../golden/<entry>/disk.qcow2``,
``../<id>/disk.qcow2``, ``../../images/<entry>/disk.qcow2``). A template whose base was
rebuilt or removed is stale: listed, never cloned (its disk is an overlay on a base that no
longer exists as it was).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..base.entries import entry_backing, entry_lock, remove_entry
from ..base.paths import cache_dir, find_tool
from ..errors import SandboxError, SnapshotError, TemplateError
from ..host.tools import qemu_version
from ..imaging.image import Image, images_dir
from .files import MachineFiles, run_tag
from .golden import Golden, golden_root
from .plan import create_overlay, plan_for
from .qemu import QemuProcess
from .runs import current_run
from .spec import MachineSpec

TEMPLATE_VERSION = "2"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_ENTRY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


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
        return f"{base['kind']}:{base.get('entry') or Path(base.get('path', '?')).name}"

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


def base_path(base: dict[str, Any]) -> Path:
    """Where the entry a template's manifest names as its ``base`` is in this cache."""
    root = {"image": images_dir, "golden": golden_root, "template": templates_root}
    return root[base["kind"]]() / entry_name(base["entry"])


def entry_name(value: object) -> str:
    """An entry name read from a manifest (which may come from another host): one plain
    directory name, never a path."""
    if not isinstance(value, str) or not _ENTRY.match(value):
        raise TemplateError(f"its manifest names an entry {value!r}, which is not an entry "
                            "name")
    return value


def _base_problem(manifest: dict[str, Any]) -> str | None:
    if manifest.get("template_version") != TEMPLATE_VERSION:
        return (f"it was saved by another version of the sandbox (template format "
                f"{manifest.get('template_version')}, not {TEMPLATE_VERSION})")
    if manifest.get("qemu_version") != qemu_version():
        return f"it was saved by QEMU {manifest.get('qemu_version')}, not {qemu_version()}"
    base = manifest["base"]
    try:
        path = base_path(base)
    except (TemplateError, KeyError, TypeError) as exc:
        return f"its manifest does not name its base ({exc})"
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
    pulled = _pull_by_name(ref) if _NAME.match(ref) else None
    if pulled is not None and not pulled.stale:
        return pulled
    if versions:
        raise TemplateError(f"template {ref!r} is stale ({versions[-1].stale_reason()}); save "
                            f"it again, and remove the old one with: sandbox template rm {ref}")
    known = ", ".join(sorted({t.name for t in templates()})) or "none"
    raise TemplateError(f"no template named {ref!r}; known templates: {known}. Save one with "
                        "vm.save_template(name) or: sandbox template save MACHINE NAME")


def _pull_by_name(name: str) -> Template | None:
    """The newest template ``name`` pushed to the configured registry (tag
    ``template-latest-<name>``), pulled with what it stands on; None when no registry is
    set, it has none, or it failed (a warning)."""
    from ..share.store import registry, registry_setting, warn_once

    reference = registry_setting()
    if reference is None:
        return None
    from ..share.store import receive

    try:
        source = registry(reference)
        if source.manifest(f"template-latest-{name}") is None:
            return None
        done = receive(source, f"template-latest-{name}", f"registry {reference}")
    except SandboxError as exc:
        warn_once(reference, exc, f"template {name} was not pulled")
        return None
    return load_template(templates_root() / done[-1][0].entry)


def check_pulled(key: str, work: Path, manifest: dict[str, Any]) -> None:
    """Refuse a pulled template that is not the one asked for, cannot be cloned here (its
    QEMU, its base), or whose files disagree with its manifest."""
    if manifest.get("kind") != "template" or manifest.get("key") != key:
        raise TemplateError(f"the registry's template-{key[:16]}... is another entry; it was "
                            "not used")
    problem = _base_problem(manifest)
    if problem is not None:
        raise TemplateError(f"the registry's template {manifest.get('name')} cannot be cloned "
                            f"here: {problem}")
    Golden(work, manifest).check()


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


def template_key(name: str, key: str | None, base: dict[str, Any], shape: list[str]) -> str:
    """The full content key (64 hex digits) of template ``name`` for ``key`` on ``base``
    (:func:`base_entry`: an entry name and when it was made, no path) and ``shape``; its
    manifest's ``key``, as a golden snapshot's (``user_key`` is the user's)."""
    payload = json.dumps([TEMPLATE_VERSION, name, key,
                          [base["kind"], base["entry"], base["created_at"]],
                          qemu_version(), shape])
    return hashlib.sha256(payload.encode()).hexdigest()


def template_id(name: str, key: str | None, base: dict[str, Any], shape: list[str]) -> str:
    """The template's entry name: ``name-`` and the first 16 digits of :func:`template_key`."""
    return f"{name}-{template_key(name, key, base, shape)[:16]}"


def clone_spec(template: Template, requested: MachineSpec) -> tuple[MachineSpec, Image, str]:
    """The spec, image and accelerator of a clone of ``template``: the template's shape;
    from ``requested`` only the accelerator choice and the timeouts. TemplateError when the
    template is stale or ``requested`` asks for another shape."""
    from .accel import resolve_accel

    problem = template.stale_reason()
    image_path = images_dir() / entry_name(template.manifest.get("image_entry"))
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
               for field, default in (("memory_mib", None), ("cpus", None), ("cpu", None),
                                      ("qemu_args", ()),
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
    """How a template's manifest names the golden snapshot or template (``kind``) it was
    made from: by entry name, and when that was made (another make is another base)."""
    return {"kind": kind, "entry": source.path.name,
            "created_at": source.manifest.get("created_at")}


def image_base(image: Image) -> dict[str, Any]:
    """How a template's manifest names the image it was made from (a cold-booted machine)."""
    return {"kind": "image", "entry": image.path.name,
            "created_at": image.manifest.get("built_at")}


def rebase_into_entry(overlay: Path, base: dict[str, Any], entry: Path) -> None:
    """Point ``overlay`` (a copy of a machine's disk overlay, in entry directory ``entry``)
    at its base's disk by a relative path (the header only: the data stays as it is)."""
    backing = entry_backing(base_path(base) / "disk.qcow2", entry)
    result = subprocess.run([find_tool("qemu-img") or "qemu-img", "rebase", "-u", "-f", "qcow2",
                             "-F", "qcow2", "-b", str(backing), str(overlay)],
                            capture_output=True, text=True, timeout=60, check=False)
    if result.returncode != 0:
        raise SnapshotError(f"could not point the template's disk at {backing}: "
                            f"{result.stderr.strip() or f'qemu-img exited {result.returncode}'}")


# -- saving -----------------------------------------------------------------------------------


def reload_into_shared_ram(spec: MachineSpec, image: Image, accel: str, full: Path,
                           work: Path) -> None:
    """Step 3 of a save: load the full state of a machine of ``spec`` into a helper QEMU
    whose RAM is ``work/ram`` (shared), and save its devices again with x-ignore-shared
    into ``work/state``."""
    run = current_run()
    files = MachineFiles(run.machine_dir(f"template-{work.name[-24:]}"))
    plan = plan_for(spec, image, accel, files=files,
                    tag=run_tag(run.id, files.dir.name),
                    disk=create_overlay(work / "disk.qcow2", files.overlay),
                    ram_file=work / "ram", ram_shared=True, incoming=True)
    helper = QemuProcess(plan, files)
    port: socket.socket | None = None
    try:
        helper.launch(die_with_parent=True)
        # The SSH port must count as connected in the saved state, as in a golden save.
        port = helper.connect_ssh_port()
        helper.load_state(full, "loading the machine into shared RAM", ignore_shared=False)
        helper.save_state(work / "state", "saving the template")
    finally:
        helper.stop()
        if port is not None:
            port.close()
        shutil.rmtree(files.dir, ignore_errors=True)
