"""The cache as a client of an OCI registry (``SANDBOX_REGISTRY``): a cache miss asks the
registry for the entry's tag before anything is built, and what was built is pushed when
``SANDBOX_PUSH=1``.

In the automatic path a registry that cannot be used never fails a run: its error becomes a
:class:`~sandbox.errors.SandboxWarning` and the entry is built here, as without a registry.
``sandbox pull`` and ``sandbox push`` (:func:`receive`, :func:`send`) raise instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..base.entries import entry_lock
from ..base.paths import cache_dir
from ..base.progress import QUIET, Reporter
from ..base.sizes import parse_size
from ..errors import RegistryError, SandboxError, SandboxWarning
from .artifact import (
    KINDS,
    MANIFEST_TYPE,
    Entry,
    Remote,
    Sink,
    Source,
    downloads_dir,
    lookup,
    push_entry,
    tag_for,
    unpack,
)

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


def warn_once(reference: str, exc: SandboxError, what: str) -> None:
    """Warn that the registry failed (once per registry and kind of error)."""
    cause = f"{reference}: {type(exc).__name__}"
    if cause not in _WARNED:
        _WARNED.add(cause)
        warnings.warn(f"registry {reference} could not be used ({exc}); {what}",
                      SandboxWarning, stacklevel=3)


class RemoteEntry:
    """What the registry said of one missing entry (see :func:`remote_entry`)."""

    def __init__(self, kind: str, key: str, final: Path) -> None:
        self.kind, self.key, self.final = kind, key, final
        #: The entry's manifest when it was pulled; None when the caller must build it.
        self.manifest: dict[str, Any] | None = None
        self.reference = registry_setting()
        self._claim: Claim | None = None

    def built(self, entry: Entry, *, reporter: Reporter = QUIET,
              extra_tags: tuple[str, ...] = ()) -> None:
        """The caller built the entry: push it when ``SANDBOX_PUSH=1`` (a failure is a
        warning), which also ends this host's claim on it."""
        offer(entry, reporter=reporter, extra_tags=extra_tags)
        self.release()

    def release(self) -> None:
        if self._claim is not None:
            self._claim.stop()
            self._claim = None


@contextmanager
def remote_entry(kind: str, key: str, final: Path, *, reporter: Reporter = QUIET,
                 check: Callable[[Path, dict[str, Any]], None] | None = None
                 ) -> Iterator[RemoteEntry]:
    """For an entry missing from the cache (call it holding the entry's lock): pull it from
    the configured registry when the registry has it (``.manifest`` is then set), else leave
    it to the caller to build (and call ``.built(entry)``).

    Runners that miss the same entry at once build it once: a runner that will push
    (``SANDBOX_PUSH=1``) claims the entry with a small tag (``claim-<tag>``, refreshed while
    it builds); the others wait for the entry to appear and pull it, or build it themselves
    when the claim is not refreshed for :data:`CLAIM_STALE` seconds (its runner died). A
    registry that cannot be used is a warning: the caller builds."""
    state = RemoteEntry(kind, key, final)
    try:
        if state.reference is not None:
            try:
                state.manifest, state._claim = _obtain(state.reference, kind, key, final,
                                                       reporter, check)
            except SandboxError as exc:
                warn_once(state.reference, exc, f"{final.name} is made here instead")
        yield state
    finally:
        state.release()


#: A claim not refreshed for this long is abandoned (its runner died); the claimant
#: refreshes it every CLAIM_REFRESH seconds while it builds.
CLAIM_STALE = 60.0
CLAIM_REFRESH = 15.0
#: How long a new claim settles before it is read back (concurrent claims: the last one
#: written wins, and every claimant reads the same winner).
CLAIM_SETTLE = 1.5
#: How long a runner waits for another runner's claimed entry in all.
CLAIM_WAIT = float(os.environ.get("SANDBOX_CLAIM_WAIT", "1800"))


def _obtain(reference: str, kind: str, key: str, final: Path, reporter: Reporter,
            check: Callable[[Path, dict[str, Any]], None] | None
            ) -> tuple[dict[str, Any] | None, Claim | None]:
    source = registry(reference)
    tag = tag_for(kind, key)
    where = f"registry {reference}"
    deadline = time.monotonic() + CLAIM_WAIT
    claim: Claim | None = None
    waited = False
    while True:
        remote = lookup(source, tag, where)
        if remote is not None:
            if remote.entry != final.name:
                raise RegistryError(f"{remote.tag} is entry {remote.entry}, not {final.name}")
            if claim is not None:
                claim.stop()
            with reporter.stage(f"{final.name}: pulling {remote.stored >> 20} MiB from "
                                f"{reference}"):
                return unpack(source, remote, final, max_size=max_entry_size(), check=check,
                              reporter=reporter), None
        holder = Claim.current(source, tag)
        if holder is None or holder.stale or time.monotonic() > deadline:
            if not push_wanted():
                return None, None
            if claim is None:
                claim = Claim(source, tag)
                claim.put()
                time.sleep(CLAIM_SETTLE)
                continue
        if claim is not None and holder is not None and holder.owner == claim.owner:
            claim.start()
            return None, claim
        if not waited:
            waited = True
            owner = holder.owner if holder is not None else "?"
            reporter.note(f"{final.name}: another runner is making it ({owner}); waiting for "
                          f"it to appear in {reference}")
        if claim is not None:  # another runner's claim won
            claim = None
        time.sleep(2.0)


class Claim:
    """A runner's claim on an entry it is about to build: a manifest tagged
    ``claim-<tag>`` whose annotations name the runner and the time of the claim."""

    EMPTY = b"{}"

    def __init__(self, source: Any, tag: str, owner: str | None = None,
                 at: float | None = None) -> None:
        self.source, self.tag = source, tag
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.at = at if at is not None else time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def stale(self) -> bool:
        return time.time() - self.at > CLAIM_STALE

    @classmethod
    def current(cls, source: Any, tag: str) -> Claim | None:
        found = source.manifest(f"claim-{tag}")
        if found is None:
            return None
        notes = found[0].get("annotations") or {}
        try:
            return cls(source, tag, str(notes["sandbox.claim"]), float(notes["sandbox.at"]))
        except (KeyError, TypeError, ValueError):
            return None

    def put(self) -> None:
        with tempfile.NamedTemporaryFile(dir=downloads_dir()) as empty:
            empty.write(self.EMPTY)
            empty.flush()
            digest = "sha256:" + hashlib.sha256(self.EMPTY).hexdigest()
            self.source.push_blob(Path(empty.name), digest)
        self.at = time.time()
        self.source.put_manifest(f"claim-{self.tag}", {
            "schemaVersion": 2, "mediaType": MANIFEST_TYPE,
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": digest,
                       "size": len(self.EMPTY)},
            "layers": [],
            "annotations": {"sandbox.claim": self.owner, "sandbox.at": f"{self.at:.3f}"}})

    def start(self) -> None:
        """Refresh the claim every CLAIM_REFRESH seconds until :meth:`stop`."""
        def refresh() -> None:
            while not self._stop.wait(CLAIM_REFRESH):
                # A failed refresh: the next one tries again; waiters time out at worst.
                with contextlib.suppress(SandboxError):
                    self.put()
        self._thread = threading.Thread(target=refresh, daemon=True, name="sandbox-claim")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()


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
        warn_once(reference, exc, f"{entry.path.name} was not pushed")


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
    field = "digest" if remote.kind == "image" else "key"

    def checked(work: Path, manifest: dict[str, Any]) -> None:
        if manifest.get(field) != remote.key:
            raise RegistryError(f"{remote.tag} holds an entry whose {field} is "
                                f"{str(manifest.get(field))[:16]}...; it was not used")
        if check is not None:
            check(remote, work, manifest)

    with entry_lock(final):
        if (final / "manifest.json").exists():
            return [*done, (remote, False)]
        with reporter.stage(f"{remote.entry}: pulling {remote.stored >> 20} MiB from {where}"):
            unpack(source, remote, final, max_size=max_entry_size(), reporter=reporter,
                   check=checked)
    return [*done, (remote, True)]
