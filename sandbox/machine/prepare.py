"""Preparing templates: a setup run once per host, keyed by its content, saved, reused.

:func:`ensure_template` is what the ``vm_template`` fixture calls: the template for a name and
key is looked up where it would be (its base, the golden snapshot, decides), and made under
that place's lock when it is missing, stale or damaged, so that one process of a test run
(one xdist worker) makes it and every other waits and reuses it.
"""

from __future__ import annotations

import hashlib
import os
import stat
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..base.entries import entry_lock, publish, remove_entry
from ..base.progress import QUIET, Reporter
from ..errors import SandboxError, SandboxWarning, TemplateError
from ..share.artifact import Entry, tag_for
from ..share.store import remote_entry
from ..vm.spec import MachineSpec
from ..vm.template import (
    Template,
    base_entry,
    check_name,
    check_pulled,
    clone_spec,
    find_template,
    load_template,
    template_key,
    templates_root,
)

if TYPE_CHECKING:
    from .machine import Machine


def content_key(*parts: str | os.PathLike[str]) -> str:
    """A stable key from payload content: each part that names an existing file or
    directory counts by its files' relative paths, modes and bytes; any other string (a
    command, a version) counts as itself. Give it to ``save_template``/``vm_template``."""
    digest = hashlib.sha256()
    for part in parts:
        path = Path(part)
        if isinstance(part, os.PathLike) or path.exists():
            if not path.exists():
                raise TemplateError(f"content_key: {path} does not exist")
            digest.update(b"path\0")
            for file in sorted([path] if path.is_file() else path.rglob("*")):
                if file.is_symlink() or not file.is_file():
                    if file.is_symlink():
                        digest.update(f"link {file.relative_to(path)} {os.readlink(file)}\0"
                                      .encode())
                    continue
                relative = file.name if file == path else str(file.relative_to(path))
                mode = stat.S_IMODE(file.stat().st_mode)
                digest.update(f"file {relative} {mode:o}\0".encode())
                with file.open("rb") as handle:
                    while chunk := handle.read(1 << 20):
                        digest.update(chunk)
        else:
            digest.update(f"text\0{part}\0".encode())
    return digest.hexdigest()[:16]



Step = str | Callable[["Machine"], Any]


def run_setup(machine: Machine, name: str, setup: Step | Sequence[Step]) -> None:
    """Run a template's setup: a callable taking the machine, a command, or a list of
    those; TemplateError naming the step that failed."""
    steps: list[Step] = [setup] if isinstance(setup, str) or callable(setup) else list(setup)
    for number, step in enumerate(steps, 1):
        what = repr(step) if isinstance(step, str) else getattr(step, "__name__", repr(step))
        label = f"step {number} of {len(steps)} ({what})" if len(steps) > 1 else what
        try:
            if isinstance(step, str):
                machine.succeed(step)
            else:
                step(machine)
        except Exception as exc:
            raise TemplateError(f"the setup of template {name!r} failed at {label}: "
                                f"{exc}") from exc


def expected_location(name: str, key: str | None, spec: MachineSpec, *,
                      reporter: Reporter = QUIET) -> tuple[Path, str, str]:
    """Where template ``name`` for ``key``, made from a machine of ``spec``, is (or will be),
    its full content key and the registry tag of its base: its base (the golden snapshot,
    made or pulled now if needed, or the base template) decides."""
    from ..imaging.image import get_image
    from ..vm.accel import resolve_accel
    from ..vm.golden import ensure_golden, shape_plan

    if spec.cold:
        raise TemplateError("a template is saved from a clone; leave out cold=True")
    if spec.template is not None:
        parent = find_template(spec.template)
        clone_spec(parent, spec)  # usable?
        full = template_key(name, key, base_entry("template", parent.golden),
                            list(parent.manifest["shape"]))
        base_tag = tag_for("template", str(parent.manifest["key"]))
    else:
        image = get_image(spec.image, reporter=reporter)
        accel = resolve_accel(spec.accel)
        golden = ensure_golden(image, spec, accel, reporter=reporter)
        full = template_key(name, key, base_entry("golden", golden),
                            shape_plan(image, spec, accel).shape())
        base_tag = tag_for("golden", str(golden.manifest["key"]))
    return templates_root() / f"{name}-{full[:16]}", full, base_tag


def ensure_template(name: str, setup: Step | Sequence[Step], *, key: str | None = None,
                    spec: MachineSpec | None = None, reporter: Reporter = QUIET) -> Template:
    """Template ``name`` for ``key``: the cached one while its key and base stay the same;
    else made once (under a lock, whatever the number of processes asking) by running
    ``setup`` in a fresh machine of ``spec`` and saving it. A damaged or stale one is made
    again."""
    from .machine import Machine

    spec = spec or MachineSpec()
    check_name(name)
    final, full, base_tag = expected_location(name, key, spec, reporter=reporter)
    with entry_lock(final):
        found = load_template(final)
        if found is not None and found.stale_reason() is None:
            try:
                found.golden.check()
                return found
            except SandboxError as exc:
                warnings.warn(f"template {found.id} is damaged ({exc}); making it again",
                              SandboxWarning, stacklevel=2)
        remove_entry(final)
        with remote_entry("template", full, final, reporter=reporter,
                          check=lambda work, manifest: check_pulled(full, work, manifest)
                          ) as remote:
            if remote.manifest is None:
                with Machine(spec, reporter=reporter) as machine, \
                        reporter.stage(f"template {name}: setup and save"):
                    run_setup(machine, name, setup)
                    if machine.template_location(name, key) != final:
                        raise TemplateError(f"template {name!r}: its base changed while it "
                                            "was set up (a golden snapshot made again?); run "
                                            "again")
                    publish(final, lambda work: machine.write_template(name, key, work),
                            owner_writable=("ram",))
                remote.built(Entry("template", final, full, needs=(base_tag,)),
                             reporter=reporter, extra_tags=(f"template-latest-{name}",))
    template = load_template(final)
    assert template is not None
    return template
