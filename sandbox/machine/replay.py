"""Saving a running machine whole, and resuming it anywhere (``--sandbox-save-failed``,
``sandbox save``, ``sandbox debug``); the format is :mod:`sandbox.vm.replay`'s.

Saving (:func:`capture`): the machine is stopped where it is, its full state (RAM included)
migrated to a scratch file and its disk overlay copied (the migration flushed it); it then
runs on (a failed test's teardown still talks to it). A helper QEMU puts the RAM into a file
of its own (as a template save does, :func:`sandbox.vm.template.reload_into_shared_ram`); the
pages that differ from the base's RAM become ``ram.delta``. :func:`write_file` puts the entry
(and with ``with_base`` its whole base chain) into one file, an OCI image layout in a tar;
:func:`push_saved` sends it to a registry.

Resuming (:func:`resume`): the saved entry is unpacked into a new named machine's directory,
its base chain found in the cache, the file or a registry (in that order), the RAM rebuilt,
and a QEMU of the saved shape resumes it; a fresh SSH server is armed on its virtio-serial
port, and the one on port 22 checked (restarted if it died), so every CLI verb works on it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..base.entries import reap_abandoned
from ..base.paths import cache_dir, find_tool
from ..base.progress import QUIET, Reporter
from ..errors import RegistryError, SandboxError, SandboxWarning
from ..guest.sockets import PreludeSocket
from ..host.tools import qemu_version
from ..share.artifact import KINDS, Entry, lookup, unpack
from ..vm import console
from ..vm.golden import GOLDEN_CONSOLE_BYTES, Golden, arm_ssh_port
from ..vm.plan import create_overlay, plan_for
from ..vm.replay import (
    CONSOLE_BYTES,
    FAILURE_BYTES,
    SAVED_VERSION,
    TRANSCRIPT_BYTES,
    TRANSCRIPT_ENTRIES,
    Base,
    ReplayError,
    apply_delta,
    bases_of,
    check_format,
    check_shape,
    entry_stem,
    write_delta,
)
from ..vm.template import reload_into_shared_ram

if TYPE_CHECKING:
    from ..imaging.image import Image
    from .machine import Machine

#: What a saved machine's file name ends with.
SUFFIX = ".sandbox"
#: How long the restored guest's old SSH relay may hold the virtio-serial port.
ARM_TIMEOUT = 10.0
#: How long the resumed guest's SSH server on port 22 may take to answer.
TCP_TIMEOUT = 10.0


# -- saving -----------------------------------------------------------------------------------


def chain_of(source: Golden) -> list[Base]:
    """The entries a machine cloned from ``source`` (a golden snapshot or a template) stands
    on, image first."""
    from ..imaging.image import Image, images_dir
    from ..vm.template import base_path

    chain: list[Base] = []
    current, kind = source, ("template" if source.manifest.get("kind") == "template"
                             else "golden")
    for _ in range(16):
        manifest = current.manifest
        chain.insert(0, Base(kind, current.path.name, str(manifest["key"])))
        base = manifest.get("base") if kind == "template" else \
            {"kind": "image", "entry": manifest["image_entry"]}
        assert isinstance(base, dict)
        if base["kind"] == "image":
            image = Image.load(images_dir() / str(base["entry"]))
            chain.insert(0, Base("image", image.path.name, image.digest))
            return chain
        current, kind = Golden.load(base_path(base)), str(base["kind"])
    raise ReplayError(f"the bases of {source.path.name} nest too deep")


def chain_entries(chain: list[Base]) -> list[Entry]:
    """The chain as entries to push or write (each standing on the one before it)."""
    from ..share.store import entry_dir

    return [Entry(base.kind, entry_dir(base.kind, base.entry), base.key,
                  needs=(chain[index - 1].tag,) if index else ())
            for index, base in enumerate(chain)]


def _backing(disk: Path) -> str | None:
    result = subprocess.run([find_tool("qemu-img") or "qemu-img", "info", "--output=json",
                             "-f", "qcow2", str(disk)], capture_output=True, text=True,
                            timeout=60, check=False)
    if result.returncode != 0:
        raise ReplayError(f"qemu-img info {disk}: {result.stderr.strip()[-300:]}")
    backing = json.loads(result.stdout).get("backing-filename")
    return str(backing) if backing is not None else None


def _rebase(disk: Path, backing: str, *, safe: bool = False) -> None:
    """Point ``disk`` at ``backing``: the header only, or (``safe``) keeping the content the
    guest sees (what differs from the new backing file is copied into ``disk``)."""
    command = [find_tool("qemu-img") or "qemu-img", "rebase", *([] if safe else ["-u"]),
               "-f", "qcow2", "-F", "qcow2", "-b", backing, str(disk)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False,
                            cwd=disk.parent)
    if result.returncode != 0:
        raise ReplayError(f"could not point {disk.name} at {backing}: "
                          f"{result.stderr.strip()[-300:] or result.returncode}")


def work_root() -> Path:
    """Where saved machines are put together (``<cache>/saved``); scratch only."""
    root = cache_dir() / KINDS["saved"]
    root.mkdir(parents=True, exist_ok=True)
    reap_abandoned(root)
    return root


def _bounded_transcript(machine: Machine) -> list[str]:
    entries = [entry.format() for entry in machine.transcript[-TRANSCRIPT_ENTRIES:]]
    while entries and sum(len(e) for e in entries) > TRANSCRIPT_BYTES:
        entries.pop(0)
    return entries


def capture(machine: Machine, parent: Path, *, test: str | None = None,
            failure: str | None = None, failed_at: str | None = None,
            resume: bool = True) -> tuple[Entry, list[Base]]:
    """Save running (or paused) ``machine`` as a saved-machine entry in a new directory under
    ``parent`` (see the module's doc); the machine runs again afterwards unless ``resume``
    is False. Returns the entry and its base chain."""
    qemu = machine._running()
    source, image, files = machine.source, machine.image, machine.files
    assert image is not None and files is not None
    if source is None:
        raise ReplayError(f"{machine.name} was booted cold (its RAM is not in a file): only "
                          "clones of a golden snapshot or template can be saved; leave out "
                          "cold=True / --sandbox-cold-boot")
    chain = chain_of(source)
    key = hashlib.sha256(f"{uuid.uuid4()} {time.time()} {test} {machine.name}".encode()) \
        .hexdigest()
    stem = entry_stem(f"{test}-{machine.name}" if test else machine.name)
    entry = parent / f"{stem}-{key[:16]}"
    entry.mkdir(mode=0o700)
    started = time.monotonic()
    full = entry / "full-state"
    disk = entry / "disk.qcow2"
    try:
        run_state = str(qemu.qmp("query-status").get("status"))
        if run_state == "running":
            qemu.qmp("stop")
        try:
            qemu.save_state(full, f"saving {machine.name}", ignore_shared=False)
            # The migration flushed the disk and let go of it: a consistent copy.
            shutil.copyfile(files.overlay, disk)
        finally:
            if resume:
                with contextlib.suppress(SandboxError):
                    qemu.qmp("cont")
        paused = time.monotonic() - started
        if _backing(disk) != str(source.disk):  # a resumed machine: one more layer
            _rebase(disk, str(source.disk), safe=True)
        reload_into_shared_ram(machine.spec, image, str(source.manifest["accel"]), full, entry)
        full.unlink()
        pages, changed = write_delta(entry / "ram", source.ram, entry / "ram.delta")
        (entry / "ram").unlink()
        kind = chain[-1].kind
        _rebase(disk, f"../../{KINDS[kind]}/{source.path.name}/disk.qcow2")
        console.copy(files.console_log, entry / "console.log", GOLDEN_CONSOLE_BYTES)
        networks = [{"index": index, "network": Path(path).name,
                     "address": machine.addresses.get(path)}
                    for index, path in enumerate(machine.spec.networks)]
        manifest = {
            "kind": "saved", "saved_version": SAVED_VERSION, "key": key, "name": stem,
            "test": test, "machine": machine.name,
            "failure": (failure or "")[-FAILURE_BYTES:] or None,
            "failed_at": failed_at or time.strftime("%Y-%m-%d %H:%M:%S"),
            "transcript": _bounded_transcript(machine),
            "console_tail": machine.console_tail(60)[-CONSOLE_BYTES:],
            "base": asdict(chain[-1]), "bases": [asdict(base) for base in chain],
            "image": image.name, "image_entry": image.path.name, "user": machine.user,
            "agent": bool(source.manifest.get("agent", True)),
            "spec": dict(machine.spec.to_kwargs(), template=None,
                         networks=[f"network-{i}" for i in range(len(machine.spec.networks))]),
            "networks": networks,
            "qemu_version": qemu_version(), "shape": list(source.manifest["shape"]),
            "memory_mib": int(source.manifest["memory_mib"]),
            "cpus": source.manifest.get("cpus"), "accel": source.manifest["accel"],
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "ram_pages": pages, "ram_changed_pages": changed,
            "state_bytes": (entry / "state").stat().st_size,
            # "paused": stopped before the save (a failed test's machines all are);
            # "guest-panicked": its kernel had panicked.
            "run_state": run_state,
            "paused_seconds": round(paused, 2),
            "save_seconds": round(time.monotonic() - started, 2),
        }
        (entry / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(entry, ignore_errors=True)
        raise
    return Entry("saved", entry, key, needs=(chain[-1].tag,)), chain


@contextlib.contextmanager
def scratch() -> Any:
    """A private directory to put saved machines together in (removed afterwards; left by a
    killed process, the next save removes it)."""
    path = Path(tempfile.mkdtemp(prefix=".tmp-save-", suffix=f"-{os.getpid()}", dir=work_root()))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def write_file(entry: Entry, chain: list[Base], path: Path, *, with_base: bool = False,
               reporter: Reporter = QUIET) -> int:
    """Write ``entry`` (and its base chain with ``with_base``) into the file ``path``
    (written beside it, then renamed); its size."""
    from ..share.archive import ArchiveWriter
    from ..share.store import send

    entries = [*(chain_entries(chain) if with_base else []), entry]
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = ArchiveWriter(path)
    try:
        send(writer, entries, reporter=reporter, skip_present=False)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return path.stat().st_size


def push_saved(entry: Entry, chain: list[Base], reference: str | None = None, *,
               reporter: Reporter = QUIET) -> tuple[str, int]:
    """Push ``entry`` and whatever of its base chain the registry lacks; the reference
    ``sandbox debug`` takes, and the bytes stored for the entry itself."""
    from ..share.store import registry, send

    sink = registry(reference)
    done = send(sink, [*chain_entries(chain), entry], reporter=reporter)
    sizes = done[-1][1] or {}
    return f"{sink.reference}:{entry.tag}", int(sizes.get("stored", 0))


# -- resuming ---------------------------------------------------------------------------------


@dataclass
class Resumed:
    """A saved machine running again as a named machine."""

    machine: Machine
    manifest: dict[str, Any]
    #: Where its base came from: "the cache", "the file", "registry HOST/REPO".
    base_from: str
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


_SAVED_REF = re.compile(
    r"^(?:(?P<registry>[^\s:]+(?::\d+)?/[^\s:]+):)?(?P<tag>saved-[0-9a-f]{64})$")


def open_source(ref: str, registry_ref: str | None) -> tuple[Any, str, str, Callable[[], None]]:
    """The source holding the saved machine ``ref`` (a file, or ``HOST/REPO:saved-<key>``, or
    ``saved-<key>`` in the configured registry): (source, its tag, where, close)."""
    from ..share.archive import Archive
    from ..share.store import max_entry_size, registry, registry_setting

    path = Path(ref)
    if path.exists():
        if not path.is_file():
            raise ReplayError(f"{path} is not a file")
        archive = Archive(path, cache_dir(), max_size=max_entry_size())
        tags = [tag for tag in archive.order if tag.startswith("saved-")]
        if len(tags) != 1:
            archive.close()
            raise ReplayError(f"{path} holds {len(tags)} saved machines, not one: it is not "
                              "a file written by --sandbox-save-failed or sandbox save")
        return archive, tags[0], f"the file {path}", archive.close
    match = _SAVED_REF.match(ref.strip())
    if match is None:
        raise ReplayError(f"{ref!r} is neither a file nor a saved machine's reference "
                          "(HOST/REPOSITORY:saved-<64 hex digits>, as the test report printed)")
    reference = match.group("registry") or registry_ref or registry_setting()
    if reference is None:
        raise ReplayError(f"{ref} names no registry: give HOST/REPOSITORY:{match.group('tag')} "
                          "or set SANDBOX_REGISTRY")
    return registry(reference), match.group("tag"), f"registry {reference}", lambda: None


def _present(base: Base) -> bool:
    from ..share.store import entry_dir

    try:
        manifest = json.loads((entry_dir(base.kind, base.entry) / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get(base.key_field) == base.key


def fetch_bases(chain: list[Base], source: Any, where: str, registry_ref: str | None, *,
                reporter: Reporter = QUIET) -> str:
    """Bring every entry of ``chain`` into the cache: kept when there, else from ``source``
    (the file or registry the saved machine came from), else from the configured registry.
    Where the top one came from; ReplayError naming the fix when none has it."""
    from ..share.store import receive, registry, registry_setting

    fallback = registry_ref or registry_setting()
    came_from = "the cache"
    seen = {base.tag for base in chain if _present(base)}
    for base in chain:
        if base.tag in seen:
            continue
        candidates: list[tuple[Any, str]] = [(source, where)]
        if fallback is not None and where != f"registry {fallback}":
            candidates.append((None, f"registry {fallback}"))
        for candidate, label in candidates:
            try:
                holder = candidate if candidate is not None else registry(fallback)
                if holder.manifest(base.tag) is None:
                    continue
                receive(holder, base.tag, label, reporter=reporter, seen=seen)
            except RegistryError as exc:
                if candidate is not None:
                    raise
                raise ReplayError(f"its base {base.kind} {base.entry} could not be pulled from "
                                  f"{label}: {exc}") from exc
            seen.add(base.tag)
            came_from = label
            break
        else:
            places = ["this host's cache", where] + \
                ([f"registry {fallback}"] if fallback and where != f"registry {fallback}"
                 else [])
            raise ReplayError(
                f"its base {base.kind} {base.entry} (key {base.key[:16]}...) is in none of: "
                f"{', '.join(places)}. Save it with its base (--sandbox-save-failed-base, "
                "sandbox save --with-base), or point SANDBOX_REGISTRY (--registry) at the "
                "registry the saving run used")
    return came_from


def read_manifest(source: Any, tag: str, where: str) -> tuple[Any, dict[str, Any]]:
    """The saved machine's remote entry and its manifest (fetched alone: small), checked
    for form and for this host before anything large is fetched."""
    from ..share.artifact import CONFIG_LIMIT, downloads_dir

    remote = lookup(source, tag, where)
    if remote is None:
        raise ReplayError(f"{where} has no {tag}")
    if remote.kind != "saved":
        raise ReplayError(f"{tag} in {where} is a {remote.kind}, not a saved machine")
    config = remote.manifest["config"]
    scratch = downloads_dir() / f"{config['digest'].split(':')[1]}.manifest"
    try:
        source.pull_blob(config["digest"], int(config["size"]), scratch)
        data = scratch.read_bytes()[:CONFIG_LIMIT + 1]
    finally:
        scratch.unlink(missing_ok=True)
    try:
        manifest = json.loads(data)
    except ValueError as exc:
        raise ReplayError(f"{tag}'s manifest is not JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise ReplayError(f"{tag}'s manifest is not a JSON object")
    check_format(manifest, remote.key)
    bases_of(manifest)
    return remote, manifest


def default_name(manifest: dict[str, Any]) -> str:
    """``<test function>-<machine>`` (``test_checkout-vm1``), or the machine's name."""
    test = manifest.get("test")
    machine = manifest.get("machine")
    machine = machine if isinstance(machine, str) else "vm"
    if isinstance(test, str) and test:
        function = test.split("::")[-1]
        return entry_stem(f"{function}-{machine}", 50)
    return entry_stem(machine, 50)


def resume(ref: str, *, name: str | None = None, keep_clock: bool = False,
           registry_ref: str | None = None, reporter: Reporter = QUIET) -> Resumed:
    """Resume the saved machine ``ref`` (a file or a registry reference) as named machine
    ``name`` (default: from its test and machine names)."""
    from ..imaging.image import Image, images_dir
    from ..share.store import entry_dir, max_entry_size
    from ..vm.accel import resolve_accel
    from .named import check_name, machines_dir, unique_name

    started = time.monotonic()
    source, tag, where, close = open_source(ref, registry_ref)
    try:
        remote, manifest = read_manifest(source, tag, where)
        chain = bases_of(manifest)
        accel = manifest["accel"]
        if accel == "kvm" and resolve_accel("auto") != "kvm":
            raise ReplayError("it ran under KVM, and this host cannot run KVM guests "
                              "(sandbox doctor says why): a KVM state resumes only under KVM")
        name = check_name(name) if name else unique_name(default_name(manifest))
        home = machines_dir() / name
        try:
            home.mkdir(mode=0o700)
        except FileExistsError:
            raise SandboxError(f"a machine named {name!r} exists already; pick another name "
                               f"(--name) or remove it with: sandbox down {name}") from None
        try:
            with reporter.stage(f"{remote.entry}: fetching the saved machine from {where}"):
                unpack(source, remote, home / "saved", max_size=max_entry_size(),
                       check=lambda work, found: check_format(found, remote.key),
                       reporter=reporter)
            # The machine's own from now on (its disk is pointed at the base here).
            (home / "saved").chmod(0o700)
            for item in (home / "saved").iterdir():
                item.chmod(0o600)
            base_from = fetch_bases(chain, source, where, registry_ref, reporter=reporter)
        except BaseException:
            shutil.rmtree(home, ignore_errors=True)
            raise
    finally:
        close()
    try:
        base = chain[-1]
        base_dir = entry_dir(base.kind, base.entry)
        saved = home / "saved"
        expected = f"../../{KINDS[base.kind]}/{base.entry}/disk.qcow2"
        if _backing(saved / "disk.qcow2") != expected:
            raise ReplayError(f"its disk names a backing file other than its base's "
                              f"({expected}); refused")
        _rebase(saved / "disk.qcow2", str(base_dir / "disk.qcow2"))
        base_golden = Golden.load(base_dir)
        memory = int(manifest["memory_mib"]) << 20
        with reporter.stage("rebuilding its RAM"):
            apply_delta(saved / "ram.delta", base_golden.ram, saved / "ram", memory)
        (saved / "ram.delta").unlink()
        image = Image.load(images_dir() / manifest["image_entry"])
        machine = _start(name, home, manifest, image, base_golden, keep_clock=keep_clock)
    except BaseException:
        shutil.rmtree(home, ignore_errors=True)
        raise
    notes = _network_notes(manifest)
    if manifest.get("run_state") == "guest-panicked":
        notes.append(f"its kernel had panicked when it was saved: it has no SSH; read its "
                     f"console with: sandbox logs {name}")
    return Resumed(machine, manifest, base_from, notes, time.monotonic() - started)


def _network_notes(manifest: dict[str, Any]) -> list[str]:
    notes = []
    for item in manifest.get("networks") or []:
        if not isinstance(item, dict):
            continue
        from ..errors import printable

        address = printable(str(item.get("address") or "?"))[:64]
        network = printable(str(item.get("network")))[:64]
        notes.append(f"network {int(item.get('index', 0))} ({network}, address {address}): on "
                     "a private network of its own; its other members are not here")
    return notes


def _start(name: str, home: Path, manifest: dict[str, Any], image: Image, base: Golden, *,
           keep_clock: bool) -> Machine:
    """Start QEMU on the rebuilt files in ``home/saved`` as named machine ``name`` and
    connect to it."""
    from ..vm.files import MachineFiles, named_tag
    from ..vm.spec import MachineSpec
    from .machine import Machine
    from .named import _as_root_in, write_state

    saved_spec = MachineSpec.from_kwargs(**manifest["spec"])
    spec = replace(saved_spec, networks=())
    lans = (None,) * len(saved_spec.networks)
    machine = Machine(spec, name=name, die_with_parent=False, home=home, tag=named_tag(name),
                      peer_shell=_as_root_in)
    machine.image, machine.accel = image, str(manifest["accel"])
    machine.dir, machine.files = home, MachineFiles(home)
    machine._reserve_networks()
    golden = Golden(home / "saved", manifest)
    golden.check()
    plan = plan_for(saved_spec, image, machine.accel, files=machine.files,
                    tag=named_tag(name), disk=create_overlay(golden.disk, machine.files.overlay),
                    ram_file=golden.ram, incoming=True, lans=lans)
    check_shape(manifest, plan.shape())
    try:
        clone = golden.start_clone(plan, die_with_parent=False, clock=not keep_clock)
        machine.qemu, machine.source = clone.process, base
        machine.user = str(manifest.get("user") or "root")
        machine._find_ssh_port()
        if manifest.get("run_state") == "guest-panicked":
            # Its kernel is where it panicked: nothing answers SSH; the console tells.
            write_state(machine)
            return machine
        error = clone.identity_error() if clone.agent else None
        _connect(machine, image, armed=bool(clone.agent), keep_clock=keep_clock)
        if error and not keep_clock:
            warnings.warn(f"{name}: its clock was not set ({error})", SandboxWarning,
                          stacklevel=3)
        write_state(machine)
    except BaseException:
        machine.close()
        raise
    return machine


def _opener(port: socket.socket, prelude: bytes) -> Callable[[float], PreludeSocket]:
    return lambda timeout: PreludeSocket(port, prelude)


def _connect(machine: Machine, image: Image, *, armed: bool, keep_clock: bool) -> None:
    """SSH to the resumed machine: over TCP to its server on port 22 (where the CLI verbs
    reach named machines); when that one does not answer (the test had stopped it), through
    a fresh server armed on its virtio-serial port (the old session's relay lets go of the
    port once it sees the host gone), and port 22's server restarted through it."""
    from ..errors import BootError
    from ..guest.commands import as_root
    from ..vm.bringup import set_clock

    files, qemu = machine.files, machine.qemu
    assert files is not None and qemu is not None
    try:
        machine._connect_ssh(TCP_TIMEOUT)
    except BootError:
        if not armed:
            raise
        _connect_through_port(machine, image)
        service = "sandbox-sshd" if image.kind == "debian" else "ssh"
        machine.run(as_root(f"systemctl restart {service}", machine.user), timeout=60)
    if not armed and not keep_clock:  # no agent set it
        set_clock(machine.channel, machine.user)


def _connect_through_port(machine: Machine, image: Image) -> None:
    files, qemu = machine.files, machine.qemu
    assert files is not None and qemu is not None
    deadline = time.monotonic() + ARM_TIMEOUT
    while machine._channel is None:
        if time.monotonic() > deadline:
            raise ReplayError(f"{machine.name} answers SSH neither on port 22 nor on its "
                              "virtio-serial port; read its console: sandbox logs "
                              f"{machine.name}")
        port = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        port.connect(str(files.ssh_socket))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SandboxWarning)
            prelude = arm_ssh_port(qemu, files, port, image)
        if prelude is None:  # the old relay still holds the port
            port.close()
            time.sleep(0.2)
            continue
        machine._port_socket = port
        try:
            machine._connect_ssh(30.0, _opener(port, prelude), attempts=1)
        except SandboxError:
            machine._port_socket = None
            port.close()
