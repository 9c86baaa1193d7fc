"""Cache entries (images, golden snapshots, templates): made once, under a file lock, in a
temporary directory beside their final place; sealed read-only; published with one atomic
rename.

A temporary directory is named ``.tmp-<entry>-<pid>``: one whose builder process is gone
was abandoned (the builder was killed) and is removed by the next builder.

Nothing in an entry names a path of this host: entries may be copied into another host's
cache. An entry refers to another by its directory name, and a disk overlay in one names its
backing file relative to its own directory (:func:`entry_backing`).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import filelock

from ..errors import SandboxError
from .paths import private_lock

T = TypeVar("T")

#: How long a builder waits for a concurrent builder of the same entry.
LOCK_TIMEOUT = 1800


@contextmanager
def entry_lock(final: Path, on_wait: Callable[[], None] | None = None,
               timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
    """Hold the lock of entry ``final``; ``on_wait`` is called if another holder makes us wait
    (up to ``timeout`` seconds)."""
    locks = final.parent / ".locks"
    locks.mkdir(mode=0o700, exist_ok=True)
    lock = private_lock(locks / f"{final.name}.lock")
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        if on_wait is not None:
            on_wait()
        try:
            lock.acquire(timeout=timeout)
        except filelock.Timeout:
            raise SandboxError(f"another process held the lock of {final.name} for "
                               f"{timeout:g} s (making it?); if none is, remove "
                               f"{locks / (final.name + '.lock')}") from None
    try:
        yield
    finally:
        lock.release()


def entry_backing(disk: Path, entry: Path) -> Path:
    """The relative path by which a disk overlay in entry directory ``entry`` (or in its
    temporary directory: the same parent) names ``disk`` of another entry of the same cache,
    e.g. ``../../images/<entry>/disk.qcow2``. QEMU resolves a relative backing file against
    the overlay's own directory, so the path holds wherever the cache is."""
    return Path(os.path.relpath(disk, entry))


def publish(final: Path, build: Callable[[Path], T], *, owner_writable: tuple[str, ...] = (),
            private: tuple[str, ...] = ()) -> T:
    """Run ``build(work)`` in a fresh temporary directory, then seal it and rename it to
    ``final``; on any failure nothing is left. Call it holding :func:`entry_lock`.

    Sealed means read-only for everyone, except the files named in ``owner_writable``, which
    the owner keeps write permission on (0644) because a program insists on opening them
    read-write although it never writes to them, and those in ``private`` (secrets such as
    an SSH host key), which only the owner may read (0400)."""
    reap_abandoned(final.parent)
    work = final.parent / f".tmp-{final.name}-{os.getpid()}"
    remove_entry(work)
    work.mkdir()
    try:
        result = build(work)
        for entry in work.iterdir():
            entry.chmod(0o644 if entry.name in owner_writable else
                        0o400 if entry.name in private else 0o444)
        work.chmod(0o555)
        work.rename(final)
    except BaseException:
        remove_entry(work)
        raise
    return result


def remove_entry(path: Path) -> None:
    """Delete an entry (sealed or not) or a temporary directory, whatever it holds."""
    if path.exists():
        path.chmod(0o755)
        # rm rather than shutil: a build tree holds root-owned files in their thousands.
        subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=False)


def reap_abandoned(root: Path) -> None:
    for entry in root.glob(".tmp-*"):
        pid = entry.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            remove_entry(entry)
