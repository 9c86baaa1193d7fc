"""Saved machines: a running machine's whole state (RAM, disk, devices) written beside a
manifest that says what it was doing, so that ``sandbox debug`` resumes it on any host.

A saved machine is a cache entry of kind ``saved`` (see :mod:`sandbox.share.artifact`). It
holds only what its base (the golden snapshot or template the machine was cloned from, which
a registry or the receiving cache gives) does not:

- ``ram.delta``: the pages of guest RAM that differ from the base's RAM file (a header, a
  bitmap of pages, the changed pages in order; :func:`write_delta`, :func:`apply_delta`);
- ``state``: the device state (``x-ignore-shared``: RAM is not in it);
- ``disk.qcow2``: the machine's disk overlay as it was, backed by its base's disk by a
  relative path (``../../golden/<entry>/disk.qcow2``);
- ``console.log``: the newest part of its serial console;
- ``manifest.json``: the test and machine, the failure, the command transcript, the console
  tail, the time, its base chain (image, golden snapshot, templates: entry names and keys),
  the machine's spec and shape, the QEMU version and the accelerator.

Resuming: the base's RAM file is copied sparse and the changed pages written into it; a QEMU
of the saved shape maps that file copy-on-write, loads the device state and runs on, as a
golden snapshot's clone does (:meth:`sandbox.vm.golden.Golden.start_clone`).

Everything read from a saved machine is untrusted: the manifest's fields are checked for type
and form before use, the delta's layout against the RAM size before a byte is written, and its
text (failure, transcript, console) passes :func:`sandbox.errors.printable` when shown.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import SnapshotError
from ..host.tools import qemu_version

SAVED_VERSION = "1"
MAGIC = b"SBXRAMD1"
PAGE = 4096
_HEADER = struct.Struct(">8sIQQ")  # magic, page size, pages in RAM, pages in the delta
CHUNK = 1 << 20
_KINDS = ("image", "golden", "template")
_ENTRY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,126}$")
_KEY = re.compile(r"^[0-9a-f]{64}$")
#: Bounds on the text a saved machine's manifest carries (the whole manifest is bounded by
#: the artifact format too).
TRANSCRIPT_ENTRIES = 60
TRANSCRIPT_BYTES = 96 << 10
CONSOLE_BYTES = 64 << 10
FAILURE_BYTES = 8 << 10


class ReplayError(SnapshotError):
    """A saved machine that cannot be resumed here: its format, QEMU, CPU, base or files."""


# -- the RAM delta ----------------------------------------------------------------------------


def _next_data(fd: int, offset: int, size: int) -> int:
    """The next offset at or after ``offset`` where ``fd`` has data (``size``: none)."""
    try:
        return os.lseek(fd, offset, os.SEEK_DATA)
    except OSError:  # ENXIO: only a hole is left
        return size


def write_delta(ram: Path, base: Path | None, out: Path) -> tuple[int, int]:
    """Write into ``out`` the pages of ``ram`` that differ from ``base`` (None: from zeros);
    returns (pages in RAM, pages written). Holes in both files are skipped unread."""
    size = ram.stat().st_size
    if size % PAGE:
        raise SnapshotError(f"{ram} is not a whole number of pages")
    if base is not None and base.stat().st_size != size:
        raise SnapshotError(f"the base RAM {base} has {base.stat().st_size} bytes, the "
                            f"machine's {size}")
    pages = size // PAGE
    bitmap = bytearray((pages + 7) // 8)
    changed = 0
    zero = bytes(CHUNK)
    with ram.open("rb") as new, out.open("wb") as delta, \
            (base.open("rb") if base is not None else open(os.devnull, "rb")) as old:
        delta.seek(_HEADER.size + len(bitmap))
        offset = 0
        while offset < size:
            ahead = min(_next_data(new.fileno(), offset, size),
                        _next_data(old.fileno(), offset, size) if base is not None else size)
            if ahead > offset:  # a hole in both: equal
                offset = ahead - ahead % PAGE
                continue
            length = min(CHUNK, size - offset)
            current = os.pread(new.fileno(), length, offset)
            previous = os.pread(old.fileno(), length, offset) if base is not None \
                else zero[:length]
            if current != previous:
                view, before = memoryview(current), memoryview(previous)
                for start in range(0, length, PAGE):
                    page = view[start:start + PAGE]
                    if page != before[start:start + PAGE]:
                        index = (offset + start) // PAGE
                        bitmap[index >> 3] |= 1 << (index & 7)
                        delta.write(page)
                        changed += 1
            offset += length
        delta.seek(0)
        delta.write(_HEADER.pack(MAGIC, PAGE, pages, changed))
        delta.write(bitmap)
    return pages, changed


def _runs(bitmap: bytes, pages: int) -> list[tuple[int, int]]:
    """(first page, count) of each run of set bits (bit ``i % 8`` of byte ``i // 8`` is
    page ``i``)."""
    runs: list[tuple[int, int]] = []
    for span in re.finditer(rb"[^\x00]+", bitmap):
        for byte_index in range(span.start(), span.end()):
            byte = bitmap[byte_index]
            for bit in range(8):
                if byte >> bit & 1:
                    index = byte_index * 8 + bit
                    if runs and runs[-1][0] + runs[-1][1] == index:
                        runs[-1] = (runs[-1][0], runs[-1][1] + 1)
                    else:
                        runs.append((index, 1))
    if runs and runs[-1][0] + runs[-1][1] > pages:
        raise ReplayError("its RAM delta marks pages past the end of RAM")
    return runs


def apply_delta(delta: Path, base: Path | None, ram: Path, size: int) -> int:
    """Make ``ram`` (``size`` bytes): a sparse copy of ``base`` (None: zeros) with the pages
    of ``delta`` written over it. ReplayError when the delta does not fit ``size`` or is cut
    short. Returns the pages written."""
    with delta.open("rb") as source:
        header = source.read(_HEADER.size)
        if len(header) != _HEADER.size:
            raise ReplayError("its RAM delta is truncated (no header)")
        magic, page, pages, changed = _HEADER.unpack(header)
        if magic != MAGIC or page != PAGE or pages * PAGE != size:
            raise ReplayError(f"its RAM delta does not fit a machine of {size >> 20} MiB "
                              f"(magic {magic!r}, page {page}, {pages} pages)")
        bitmap = source.read((pages + 7) // 8)
        expected = _HEADER.size + len(bitmap) + changed * PAGE
        if len(bitmap) != (pages + 7) // 8 or delta.stat().st_size != expected:
            raise ReplayError(f"its RAM delta has {delta.stat().st_size} bytes, its header "
                              f"says {expected}: it is truncated or damaged")
        runs = _runs(bitmap, pages)
        if sum(count for _, count in runs) != changed:
            raise ReplayError("its RAM delta's bitmap and page count disagree")
        with ram.open("wb") as out:
            if base is not None:
                if base.stat().st_size != size:
                    raise ReplayError(f"its base RAM has {base.stat().st_size} bytes, not "
                                      f"{size}")
                sparse_copy(base, out.fileno(), size)
            out.truncate(size)
            for first, count in runs:
                left, at = count * PAGE, first * PAGE
                while left:
                    block = source.read(min(left, 16 * CHUNK))
                    if not block:
                        raise ReplayError("its RAM delta ends early")
                    os.pwrite(out.fileno(), block, at)
                    at += len(block)
                    left -= len(block)
    return int(changed)


def sparse_copy(source: Path, target_fd: int, size: int) -> None:
    """Copy the data regions of ``source`` into ``target_fd`` at the same offsets (holes
    stay holes)."""
    with source.open("rb") as src:
        fd = src.fileno()
        offset = 0
        while offset < size:
            start = _next_data(fd, offset, size)
            if start >= size:
                break
            try:
                end = os.lseek(fd, start, os.SEEK_HOLE)
            except OSError:
                end = size
            at = start
            while at < end:
                copied = os.copy_file_range(fd, target_fd, min(end - at, 64 * CHUNK), at, at)
                if copied <= 0:
                    raise SnapshotError(f"copying {source} stopped at byte {at}")
                at += copied
            offset = end


# -- the manifest -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Base:
    """One entry a saved machine stands on (image, golden snapshot or template)."""

    kind: str
    entry: str
    key: str

    @property
    def tag(self) -> str:
        return f"{self.kind}-{self.key}"

    @property
    def key_field(self) -> str:
        """The manifest field that holds an entry's key (an image's is its digest)."""
        return "digest" if self.kind == "image" else "key"


def bases_of(manifest: dict[str, Any]) -> list[Base]:
    """The chain a saved machine stands on, image first, checked for form (it may come from
    another host)."""
    chain = manifest.get("bases")
    if not isinstance(chain, list) or not 1 <= len(chain) <= 16:
        raise ReplayError("its manifest names no base chain")
    bases = []
    for item in chain:
        try:
            base = Base(str(item["kind"]), str(item["entry"]), str(item["key"]))
        except (KeyError, TypeError):
            raise ReplayError(f"its manifest names a base badly: {str(item)[:200]}") from None
        if base.kind not in _KINDS or not _ENTRY.match(base.entry) or not _KEY.match(base.key):
            raise ReplayError(f"its manifest names a base badly: {base}")
        bases.append(base)
    if bases[0].kind != "image" or any(b.kind == "image" for b in bases[1:]):
        raise ReplayError("its base chain does not start at an image")
    return bases


def text_field(manifest: dict[str, Any], name: str, limit: int) -> str:
    """A text field of an untrusted manifest, bounded and safe to print."""
    from ..errors import printable

    value = manifest.get(name)
    return printable(value[-limit:]) if isinstance(value, str) else ""


def transcript_of(manifest: dict[str, Any]) -> list[str]:
    """The saved command transcript (each entry one formatted block), safe to print."""
    from ..errors import printable

    value = manifest.get("transcript")
    if not isinstance(value, list):
        return []
    return [printable(item[-4096:]) for item in value[-TRANSCRIPT_ENTRIES:]
            if isinstance(item, str)]


def check_format(manifest: dict[str, Any], key: str) -> None:
    """ReplayError unless ``manifest`` is a saved machine's of this format, for ``key``, from
    this QEMU version: checked before anything large is fetched."""
    if manifest.get("kind") != "saved" or manifest.get("key") != key:
        raise ReplayError("it is not a saved machine (its manifest says otherwise)")
    if manifest.get("saved_version") != SAVED_VERSION:
        raise ReplayError(f"it was saved by another version of pytest-qemu-sandbox (saved "
                          f"format {manifest.get('saved_version')!r}, this one reads "
                          f"{SAVED_VERSION!r}); debug it with the version that saved it")
    if manifest.get("qemu_version") != qemu_version():
        raise ReplayError(f"it was saved under QEMU {manifest.get('qemu_version')}, and this "
                          f"host has QEMU {qemu_version()}: QEMU loads only states of its own "
                          "version; debug it on a host with that QEMU (the saving host's "
                          "distribution release)")
    for field, kind in (("memory_mib", int), ("state_bytes", int), ("shape", list),
                        ("spec", dict), ("accel", str), ("image_entry", str)):
        if not isinstance(manifest.get(field), kind):
            raise ReplayError(f"its manifest lacks a valid {field!r}")
    if not _ENTRY.match(manifest["image_entry"]) or not 1 <= manifest["memory_mib"] <= 1 << 20:
        raise ReplayError("its manifest's image entry or memory size is not valid")
    host_cpu = [item for item in manifest["shape"] if str(item).startswith("#host-cpu=")]
    if host_cpu:
        from ..host.cpu import host_cpu_identity

        here = host_cpu_identity()
        if host_cpu[0] != f"#host-cpu={here}":
            raise ReplayError(f"it ran on the host's own CPU model under KVM, on a processor "
                              f"({str(host_cpu[0]).removeprefix('#host-cpu=')}) other than "
                              f"this host's ({here}): such a state resumes only on the same "
                              "processor; debug it on such a host, or give the machines a "
                              "named CPU model (cpu='x86-64-v2') so their states travel")


def check_shape(manifest: dict[str, Any], shape: list[str]) -> None:
    """ReplayError when this host would run the saved machine with another shape (QEMU
    command line) than it had: its state would not load."""
    saved = [str(item) for item in manifest["shape"]]
    if saved != shape:
        missing = [item for item in saved if item not in shape][:3]
        extra = [item for item in shape if item not in saved][:3]
        raise ReplayError(f"this host would run it with another machine shape (saved: "
                          f"{' '.join(missing) or '-'}; here: {' '.join(extra) or '-'}); "
                          "debug it on a host like the one that saved it")


def entry_stem(text: str, limit: int = 60) -> str:
    """``text`` (a test id, a machine name) as part of a file or entry name."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.")
    return stem[:limit].rstrip("-.") or "machine"
