"""The cache as a client of an OCI registry (``SANDBOX_REGISTRY``): a cache miss asks the
registry for the entry's tag before anything is built, and what was built is pushed when
``SANDBOX_PUSH=1``.

In the automatic path a registry that cannot be used never fails a run: its error becomes a
:class:`~sandbox.errors.SandboxWarning` and the entry is built here, as without a registry.
``sandbox pull`` and ``sandbox push`` (:func:`receive`, :func:`send`) raise instead.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..base.entries import entry_lock
from ..base.paths import cache_dir
from ..base.progress import QUIET, Reporter
from ..base.sizes import parse_size
from ..errors import RegistryError, SandboxError, SandboxWarning
from .artifact import KINDS, Entry, Remote, Sink, Source, lookup, push_entry, tag_for, unpack

#: Registry errors already warned about in this process (one warning per registry and cause).
_WARNED: set[str] = set()
_REGISTRIES: dict[str, Any] = {}


def registry_setting() -> str | None:
    """The registry the cache uses (``SANDBOX_REGISTRY``; the plugin sets it from
    ``--sandbox-registry`` and the ini key ``sandbox_registry``), or None."""
    value = os.environ.get("SANDBOX_REGISTRY", "").strip()
    return value or None


def push_wanted() -> bool:
    """Whether entries built here are pushed (``SANDBOX_PUSH=1``, ``--sandbox-push``)."""
    return os.environ.get("SANDBOX_PUSH", "").strip().lower() in ("1", "yes", "true", "on")


def max_entry_size() -> int:
    """The most one pulled or imported entry may unpack to (``SANDBOX_IMPORT_MAX_SIZE``)."""
    return parse_size(os.environ.get("SANDBOX_IMPORT_MAX_SIZE", "64G"), default_unit="B")


def registry(reference: str | None = None) -> Any:
    """The client for ``reference`` (default: the configured registry), made once per
    process; RegistryError when none is configured."""
    from .oci import Registry

    reference = reference or registry_setting()
    if reference is None:
        raise RegistryError("no registry is set: set SANDBOX_REGISTRY (host/repository, "
                            "e.g. ghcr.io/acme/vm-cache) or pass --registry")
    if reference not in _REGISTRIES:
        _REGISTRIES[reference] = Registry(reference)
    return _REGISTRIES[reference]


def entry_dir(kind: str, name: str) -> Path:
    path = cache_dir() / KINDS[kind]
    path.mkdir(parents=True, exist_ok=True)
    return path / name


def _warn(reference: str, exc: SandboxError, what: str) -> None:
    cause = f"{reference}: {type(exc).__name__}"
    if cause not in _WARNED:
        _WARNED.add(cause)
        warnings.warn(f"registry {reference} could not be used ({exc}); {what}",
                      SandboxWarning, stacklevel=3)


def fetch(kind: str, key: str, final: Path, *, reporter: Reporter = QUIET,
          check: Callable[[Path, dict[str, Any]], None] | None = None) -> dict[str, Any] | None:
    """Pull the entry ``kind``/``key`` from the configured registry into ``final`` (the
    caller holds its lock and found it missing): its manifest, or None when no registry is
    set, the registry has no such entry, or the registry failed (warned once; the caller
    builds)."""
    reference = registry_setting()
    if reference is None:
        return None
    try:
        source = registry(reference)
        remote = lookup(source, tag_for(kind, key), f"registry {reference}")
        if remote is None:
            return None
        if remote.entry != final.name:
            raise RegistryError(f"{remote.tag} is entry {remote.entry}, not {final.name}")
        with reporter.stage(f"{final.name}: pulling from {reference} "
                            f"({remote.stored >> 20} MiB)"):
            return unpack(source, remote, final, max_size=max_entry_size(), check=check,
                          reporter=reporter)
    except SandboxError as exc:
        _warn(reference, exc, f"{final.name} is made here instead")
        return None


def offer(entry: Entry, *, reporter: Reporter = QUIET, extra_tags: tuple[str, ...] = ()) -> None:
    """Push ``entry`` (just built here) when ``SANDBOX_PUSH=1``; a failure is a warning."""
    reference = registry_setting()
    if reference is None or not push_wanted():
        return
    try:
        sink = registry(reference)
        with reporter.stage(f"{entry.path.name}: pushing to {reference}"):
            push_entry(sink, entry, reporter=reporter, extra_tags=extra_tags)
    except SandboxError as exc:
        _warn(reference, exc, f"{entry.path.name} was not pushed")


def send(sink: Sink, entries: list[Entry], *, reporter: Reporter = QUIET,
         skip_present: bool = True, extra: dict[str, tuple[str, ...]] | None = None
         ) -> list[tuple[Entry, dict[str, int] | None]]:
    """Push ``entries`` in order (what each stands on first); one whose tag the sink already
    has is skipped (None) when ``skip_present``. Raises what the sink raises."""
    done: list[tuple[Entry, dict[str, int] | None]] = []
    for entry in entries:
        if skip_present and hasattr(sink, "manifest") and sink.manifest(entry.tag) is not None:
            for tag in (extra or {}).get(entry.tag, ()):
                found = sink.manifest(entry.tag)
                if found is not None:
                    sink.put_manifest(tag, found[0])
            done.append((entry, None))
            continue
        sizes = push_entry(sink, entry, reporter=reporter,
                           extra_tags=(extra or {}).get(entry.tag, ()))
        done.append((entry, sizes))
    return done


def receive(source: Source, tag: str, where: str, *, reporter: Reporter = QUIET,
            check: Callable[[Remote, Path, dict[str, Any]], None] | None = None,
            seen: set[str] | None = None) -> list[tuple[Remote, bool]]:
    """Pull the entry tagged ``tag`` and, first, every entry it stands on, into this cache;
    entries already here are kept. Returns (entry, pulled now) pairs in the order they were
    handled. RegistryNotFound-like RegistryError when ``tag`` is missing."""
    seen = set() if seen is None else seen
    remote = lookup(source, tag, where)
    if remote is None:
        raise RegistryError(f"{where} has no {tag}")
    done: list[tuple[Remote, bool]] = []
    for need in remote.needs:
        if need not in seen:
            done += receive(source, need, where, reporter=reporter, check=check, seen=seen)
    seen.add(remote.tag)
    final = entry_dir(remote.kind, remote.entry)
    with entry_lock(final):
        if (final / "manifest.json").exists():
            return [*done, (remote, False)]
        with reporter.stage(f"{remote.entry}: pulling {remote.stored >> 20} MiB from {where}"):
            unpack(source, remote, final, max_size=max_entry_size(), reporter=reporter,
                   check=(lambda work, manifest: check(remote, work, manifest))
                   if check is not None else None)
    return [*done, (remote, True)]
