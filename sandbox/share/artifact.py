"""A cache entry (an image, a golden snapshot, a template) as an OCI artifact: one manifest
whose config blob is the entry's ``manifest.json`` and whose layers are its files, each
compressed with zstd.

An entry's tag is its content key: ``image-<key>``, ``golden-<key>``, ``template-<key>``
(64 hex digits), so a lookup is one request. The manifest's annotations name the entry's
directory, its kind, and the tags of the entries it stands on (a golden snapshot on its
image; a template on its golden snapshot or parent template), so pulling one brings what it
needs.

Everything pulled is untrusted until checked: each blob's sha256 as it arrives (the client),
each file's size and zstd's content checksum after decompression (bounded: a small blob
cannot inflate past the size it declares), file names from a fixed set, and every qcow2
file's header: no external data file, and a backing file only where the entry's format has
one, naming the entry it stands on by the relative path the cache uses. Files are written
sparse (a golden snapshot's RAM is mostly holes), and the entry appears only when complete
(temp + rename, :func:`sandbox.base.entries.publish`, under the entry's lock held by the
caller).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import zstandard

from ..base.entries import publish
from ..base.paths import cache_dir
from ..base.progress import QUIET, Reporter
from ..errors import DigestMismatch, RegistryError

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
ARTIFACT_TYPE = "application/vnd.pytest-qemu-sandbox.entry.v1"
CONFIG_TYPE = "application/vnd.pytest-qemu-sandbox.manifest.v1+json"
FILE_TYPE = "application/vnd.pytest-qemu-sandbox.file.v1+zstd"
TITLE = "org.opencontainers.image.title"
KINDS = {"image": "images", "golden": "golden", "template": "templates", "saved": "saved"}
#: The files each kind of entry may hold (besides manifest.json).
FILES = {
    "image": {"disk.qcow2", "vmlinuz", "initrd.img", "seed.iso", "client_key"},
    "golden": {"ram", "state", "disk.qcow2", "ssh-prelude", "console.log"},
    "template": {"ram", "state", "disk.qcow2", "ssh-prelude", "console.log"},
    # a machine saved as it was (sandbox.vm.replay): its RAM as a delta on its base's
    "saved": {"ram.delta", "state", "disk.qcow2", "console.log"},
}
#: Files only the owner may read (0400), and files the owner keeps writable (0644, see
#: :func:`sandbox.base.entries.publish`).
PRIVATE = ("client_key", "seed.iso")
OWNER_WRITABLE = ("ram",)
#: The largest entry manifest (JSON) and the most files one entry may have.
CONFIG_LIMIT = 1 << 20
#: zstd level 1: 2.8x on an image disk at several times the speed of level 3 (which saves
#: a further 10%).
ZSTD_LEVEL = 1
#: Blobs this large or larger get a progress line (bytes, rate); smaller ones are quick.
PROGRESS_FROM = 8 << 20
CHUNK = 1 << 20
_ENTRY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,126}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_KEY = re.compile(r"^[0-9a-f]{64}$")


class Source(Protocol):
    """Where entries come from: a registry (:class:`sandbox.share.oci.Registry`) or an
    export file (:class:`sandbox.share.archive.Archive`)."""

    def manifest(self, tag: str) -> tuple[dict[str, Any], str] | None: ...

    def pull_blob(self, digest: str, size: int, dest: Path, *,
                  advance: Callable[[int], None] | None = None) -> None: ...


class Sink(Protocol):
    """Where entries go: a registry, or an export file being written."""

    def blob_size(self, digest: str) -> int | None: ...

    def push_blob(self, path: Path, digest: str, *,
                  advance: Callable[[int], None] | None = None,
                  mount_from: str | None = None) -> bool: ...

    def put_manifest(self, tag: str, manifest: dict[str, Any]) -> str: ...


def tag_for(kind: str, key: str) -> str:
    """The tag of an entry of ``kind`` whose content key is ``key`` (64 hex digits)."""
    if kind not in KINDS or not _KEY.match(key):
        raise ValueError(f"no tag for a {kind} entry with key {key!r}")
    return f"{kind}-{key}"


@dataclass(frozen=True)
class Entry:
    """A local cache entry to push: its kind, directory, content key, and the tags of the
    entries it stands on."""

    kind: str
    path: Path
    key: str
    needs: tuple[str, ...] = ()

    @property
    def tag(self) -> str:
        return tag_for(self.kind, self.key)


def downloads_dir() -> Path:
    """Blobs being fetched (``<sha256>.part``, resumed by the next pull) or waiting to be
    unpacked; private to this account, as the whole cache is."""
    path = cache_dir() / "downloads"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


# -- pushing ----------------------------------------------------------------------------------


def push_entry(sink: Sink, entry: Entry, *, reporter: Reporter = QUIET,
               extra_tags: tuple[str, ...] = ()) -> dict[str, int]:
    """Compress and push every file of ``entry``, then its manifest under its tag (and
    ``extra_tags``). Blobs the sink already has are not sent again. Returns the byte counts:
    ``size`` (the files, as their apparent size), ``stored`` (their compressed blobs),
    ``sent`` (what went over the wire)."""
    config = (entry.path / "manifest.json").read_bytes()
    layers, sizes = [], {"size": 0, "stored": 0, "sent": 0}
    allowed = FILES[entry.kind]
    names = sorted(p.name for p in entry.path.iterdir() if p.name != "manifest.json")
    unknown = [name for name in names if name not in allowed]
    if unknown:
        raise RegistryError(f"{entry.path} holds files a {entry.kind} entry does not have "
                            f"({', '.join(unknown)}); remove the entry and make it again")
    with _scratch() as scratch:
        for name in names:
            source = entry.path / name
            blob = scratch / name
            digest, size = compress(source, blob)
            stored = blob.stat().st_size
            shown = reporter if stored >= PROGRESS_FROM else QUIET
            with shown.progress(f"pushing {entry.path.name}/{name}", stored) as advance:
                if sink.push_blob(blob, digest, advance=advance):
                    sizes["sent"] += stored
            blob.unlink()
            sizes["size"] += size
            sizes["stored"] += stored
            layers.append({"mediaType": FILE_TYPE, "digest": digest, "size": stored,
                           "annotations": {TITLE: name, "sandbox.size": str(size)}})
        config_path = scratch / "manifest.json"
        config_path.write_bytes(config)
        config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
        sink.push_blob(config_path, config_digest)
    manifest = {
        "schemaVersion": 2, "mediaType": MANIFEST_TYPE, "artifactType": ARTIFACT_TYPE,
        "config": {"mediaType": CONFIG_TYPE, "digest": config_digest, "size": len(config)},
        "layers": layers,
        "annotations": {"sandbox.kind": entry.kind, "sandbox.entry": entry.path.name,
                        "sandbox.key": entry.key, "sandbox.needs": ",".join(entry.needs),
                        "org.opencontainers.image.created":
                            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
    }
    for tag in (entry.tag, *extra_tags):
        sink.put_manifest(tag, manifest)
    return sizes


def compress(source: Path, blob: Path) -> tuple[str, int]:
    """Compress ``source`` into ``blob`` (zstd, multithreaded, with zstd's content checksum);
    the blob's digest and the file's size. Holes are read as zeros, which zstd stores in a
    few bytes."""
    blob_hash, size = hashlib.sha256(), 0
    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=-1, write_checksum=True)

    class Hashing:
        def write(self, data: bytes) -> int:
            blob_hash.update(data)
            return out.write(data)

    with source.open("rb") as src, blob.open("wb") as out, \
            compressor.stream_writer(Hashing(), closefd=False) as writer:  # type: ignore[arg-type]
        while chunk := src.read(CHUNK * 8):
            size += len(chunk)
            writer.write(chunk)
    return "sha256:" + blob_hash.hexdigest(), size


# -- pulling ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Remote:
    """An entry's manifest as a source holds it, checked for form."""

    tag: str
    kind: str
    entry: str
    key: str
    needs: tuple[str, ...]
    manifest: dict[str, Any]
    digest: str

    @property
    def stored(self) -> int:
        """Bytes its blobs take in the registry."""
        return sum(int(layer["size"]) for layer in self.manifest["layers"]) + \
            int(self.manifest["config"]["size"])

    @property
    def size(self) -> int:
        """Bytes its files take once unpacked (apparent size)."""
        return sum(int(layer["annotations"]["sandbox.size"])
                   for layer in self.manifest["layers"])


def lookup(source: Source, tag: str, where: str) -> Remote | None:
    """The entry tagged ``tag`` in ``source`` (None when there is none), its manifest checked:
    RegistryError naming ``where`` when it is not a sandbox entry or breaks the format."""
    found = source.manifest(tag)
    if found is None:
        return None
    manifest, digest = found

    def bad(why: str) -> RegistryError:
        return RegistryError(f"{where} has {tag}, but it is not a usable sandbox entry "
                             f"({why}); remove that tag, or push it again from a host that "
                             "has the entry")
    try:
        notes = manifest["annotations"]
        kind, entry, key = notes["sandbox.kind"], notes["sandbox.entry"], notes["sandbox.key"]
        needs = tuple(t for t in str(notes.get("sandbox.needs", "")).split(",") if t)
        config = manifest["config"]
        layers = manifest["layers"]
    except (KeyError, TypeError) as exc:
        raise bad(f"its manifest lacks {exc}") from None
    if kind not in KINDS or not isinstance(entry, str) or not _ENTRY.match(entry):
        raise bad(f"kind {kind!r}, entry {entry!r}")
    if not isinstance(key, str) or not _KEY.match(key) or (
            tag != tag_for(kind, key) and not tag.startswith(f"{kind}-latest-")):
        raise bad(f"key {key!r}")
    if config.get("mediaType") != CONFIG_TYPE or not _DIGEST.match(str(config.get("digest"))) \
            or not 0 < int(config.get("size", 0)) <= CONFIG_LIMIT:
        raise bad("its config is not an entry manifest")
    if not isinstance(layers, list) or len(layers) > len(FILES[kind]):
        raise bad("it has too many files")
    names = set()
    for layer in layers:
        try:
            name = layer["annotations"][TITLE]
            int(layer["annotations"]["sandbox.size"])
        except (KeyError, TypeError, ValueError) as exc:
            raise bad(f"a file's annotations lack {exc}") from None
        if name not in FILES[kind] or name in names:
            raise bad(f"file {name!r}")
        if layer.get("mediaType") != FILE_TYPE or not _DIGEST.match(str(layer.get("digest"))):
            raise bad(f"file {name}'s type or digest")
        names.add(name)
    for need in needs:
        if not re.match(r"^(image|golden|template)-[0-9a-f]{64}$", need):
            raise bad(f"it stands on {need!r}")
    return Remote(tag_for(kind, key), kind, entry, key, needs, manifest, digest)


def unpack(source: Source, remote: Remote, final: Path, *, max_size: int,
           check: Callable[[Path, dict[str, Any]], None] | None = None,
           reporter: Reporter = QUIET) -> dict[str, Any]:
    """Fetch ``remote``'s blobs from ``source`` and publish them as the entry ``final``
    (call it holding the entry's lock). ``check(work, manifest)`` looks at the unpacked
    files before they are published (raise to refuse them). Blobs fetched half-way stay
    in :func:`downloads_dir` for the next pull to resume. Returns the entry's manifest."""
    largest = max(remote.size, remote.stored)
    if largest > max_size:
        raise RegistryError(f"{remote.tag} takes {largest >> 20} MiB, more than "
                            f"{max_size >> 20} MiB, the most this cache takes for one entry; "
                            "raise SANDBOX_IMPORT_MAX_SIZE if it is really that large")
    downloads = downloads_dir()
    final.parent.mkdir(parents=True, exist_ok=True)
    # Room for the largest compressed blob beside the unpacked files (sparse files need
    # less than their size: this errs on the safe side).
    needed = remote.size + max((int(layer["size"]) for layer in remote.manifest["layers"]),
                               default=0)
    free = shutil.disk_usage(final.parent).free
    if needed > free:
        raise RegistryError(f"not enough space in the cache for {remote.entry}: it needs up "
                            f"to {needed >> 20} MiB, {free >> 20} MiB are free in "
                            f"{final.parent}; free some (sandbox image rm NAME --old) or set "
                            "SANDBOX_CACHE_DIR")

    def build(work: Path) -> dict[str, Any]:
        config = remote.manifest["config"]
        config_path = downloads / config["digest"].split(":")[1]
        source.pull_blob(config["digest"], int(config["size"]), config_path)
        config_bytes = config_path.read_bytes()
        try:
            manifest = json.loads(config_bytes)
        except ValueError as exc:
            raise RegistryError(f"{remote.tag}'s manifest is not JSON ({exc})") from None
        finally:
            config_path.unlink(missing_ok=True)
        if not isinstance(manifest, dict):
            raise RegistryError(f"{remote.tag}'s manifest is not a JSON object")
        for layer in remote.manifest["layers"]:
            name = layer["annotations"][TITLE]
            blob = downloads / layer["digest"].split(":")[1]
            shown = reporter if int(layer["size"]) >= PROGRESS_FROM else QUIET
            with shown.progress(f"pulling {remote.entry}/{name}", int(layer["size"])) as advance:
                source.pull_blob(layer["digest"], int(layer["size"]), blob, advance=advance)
            decompress(blob, work / name, int(layer["annotations"]["sandbox.size"]))
            blob.unlink()
        (work / "manifest.json").write_bytes(config_bytes)
        for qcow2 in work.glob("*.qcow2"):
            check_qcow2(qcow2, remote)
        if check is not None:
            check(work, manifest)
        return manifest

    return publish(final, build, private=PRIVATE, owner_writable=OWNER_WRITABLE)


def decompress(blob: Path, dest: Path, size: int) -> None:
    """Decompress ``blob`` (its digest already checked) into ``dest``, sparse (zero blocks
    are skipped, not written), stopping at ``size`` bytes; DigestMismatch unless exactly
    ``size`` bytes came out and zstd's content checksum holds."""
    written = 0
    block = 64 << 10
    zero = bytes(block)
    decompressor = zstandard.ZstdDecompressor()
    try:
        with blob.open("rb") as src, dest.open("wb") as out, \
                decompressor.stream_reader(src) as reader:
            while chunk := reader.read(CHUNK * 4):
                written += len(chunk)
                if written > size:
                    raise DigestMismatch(f"{dest.name} decompresses to more than the {size} "
                                         "bytes its entry declares; it was discarded")
                view = memoryview(chunk)
                for start in range(0, len(view), block):
                    part = view[start:start + block]
                    if part == zero[:len(part)]:
                        out.seek(len(part), os.SEEK_CUR)
                    else:
                        out.write(part)
            out.truncate(written)
    except zstandard.ZstdError as exc:
        raise DigestMismatch(f"{dest.name} is not a valid zstd stream ({exc}); it was "
                             "discarded") from None
    if written != size:
        raise DigestMismatch(f"{dest.name} should have {size} bytes, but has {written}; it "
                             "was discarded")


def qcow2_backing(path: Path) -> str | None:
    """The backing file a qcow2 header names (None for none), read from the header itself
    (no qemu-img: the file is untrusted). RegistryError for a file that is not qcow2 or that
    keeps its data in an external file."""
    with path.open("rb") as file:
        header = file.read(104)
        if len(header) < 72 or header[:4] != b"QFI\xfb":
            raise RegistryError(f"{path.name} is not a qcow2 image")
        version, offset, length = struct.unpack(">IQI", header[4:20])
        if version >= 3:
            incompatible = struct.unpack(">Q", header[72:80])[0]
            if incompatible & (1 << 2):
                raise RegistryError(f"{path.name} keeps its data in an external file "
                                    "(qcow2 data-file): entries never do")
        if offset == 0:
            return None
        if length > 1023:
            raise RegistryError(f"{path.name} names a backing file of {length} bytes")
        file.seek(offset)
        return file.read(length).decode("utf-8", "replace")


def check_qcow2(path: Path, remote: Remote) -> None:
    """Refuse a pulled qcow2 file whose backing file is anything but what its entry stands
    on, inside this cache (``../../<kind dir>/<entry>/disk.qcow2`` or, for a template on a
    template, ``../<entry>/disk.qcow2``); an image's disk has none."""
    backing = qcow2_backing(path)
    if backing is None:
        if remote.kind == "image":
            return
        raise RegistryError(f"{remote.tag}: {path.name} has no backing file, but a "
                            f"{remote.kind}'s disk is an overlay")
    pattern = r"^(\.\./\.\./(images|golden|templates)|\.\.)/[A-Za-z0-9][A-Za-z0-9_.-]*/disk\.qcow2$"
    if remote.kind == "image" or not re.match(pattern, backing):
        raise RegistryError(f"{remote.tag}: {path.name} names the backing file {backing!r}, "
                            "which is not an entry of this cache; refused (it would read "
                            "another file of this host)")


@contextmanager
def _scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix=".push-", dir=cache_dir()) as name:
        yield Path(name)
