"""Export files: cache entries in one file instead of a registry, for hosts that share files
(CI caches and artifacts) rather than a registry.

The file is a tar holding an OCI image layout (``oci-layout``, ``index.json`` whose manifests
carry their tag as ``org.opencontainers.image.ref.name``, ``blobs/sha256/<hex>``): the same
manifests and blobs a registry would get, so ``skopeo``/``oras`` can read it too. A name
ending in ``.zst`` gets the tar compressed as a whole as well (the blobs already are; it
costs little). Reading one is as careful as a pull: every blob's digest is checked while
it is copied out, names and sizes are bounded, and nothing but ``blobs/sha256/<hex>``,
``index.json`` and ``oci-layout`` is taken from it.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import zstandard

from ..errors import DigestMismatch, RegistryError, RegistryNotFound

REF_NAME = "org.opencontainers.image.ref.name"
INDEX_LIMIT = 4 << 20
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_BLOB = re.compile(r"^blobs/sha256/([0-9a-f]{64})$")


class ArchiveWriter:
    """A :class:`sandbox.share.artifact.Sink` that writes an export file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.partial = path.with_name(path.name + ".part")
        self._raw: IO[bytes] = self.partial.open("wb")
        self._zstd: Any = None
        stream: IO[bytes] = self._raw
        if path.name.endswith(".zst"):
            self._zstd = zstandard.ZstdCompressor(level=1, threads=-1).stream_writer(
                self._raw, closefd=False)
            stream = self._zstd
        self._tar = tarfile.open(fileobj=stream, mode="w|",  # noqa: SIM115 (closed by close())
                                 format=tarfile.PAX_FORMAT)
        self._blobs: dict[str, int] = {}
        self._manifests: list[dict[str, Any]] = []
        self._add_bytes("oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())

    def _add_bytes(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode = len(data), 0o444
        self._tar.addfile(info, io.BytesIO(data))

    def blob_size(self, digest: str) -> int | None:
        return self._blobs.get(digest)

    def push_blob(self, path: Path, digest: str, *,
                  advance: Callable[[int], None] | None = None,
                  mount_from: str | None = None) -> bool:
        if digest in self._blobs:
            return False
        size = path.stat().st_size
        info = tarfile.TarInfo(f"blobs/sha256/{digest.split(':')[1]}")
        info.size, info.mode = size, 0o444
        with path.open("rb") as file:
            self._tar.addfile(info, file)
        self._blobs[digest] = size
        if advance is not None:
            advance(size)
        return True

    def put_manifest(self, tag: str, manifest: dict[str, Any]) -> str:
        data = json.dumps(manifest, indent=2).encode()
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if digest not in self._blobs:
            self._add_bytes(f"blobs/sha256/{digest.split(':')[1]}", data)
            self._blobs[digest] = len(data)
        self._manifests.append({"mediaType": manifest["mediaType"], "digest": digest,
                                "size": len(data), "annotations": {REF_NAME: tag}})
        return digest

    def close(self) -> None:
        """Write the index and move the finished file into place."""
        self._add_bytes("index.json", json.dumps({"schemaVersion": 2,
                                                  "manifests": self._manifests}).encode())
        self._tar.close()
        if self._zstd is not None:
            self._zstd.close()
        self._raw.close()
        self.partial.replace(self.path)

    def abort(self) -> None:
        self._raw.close()
        self.partial.unlink(missing_ok=True)


class Archive:
    """A :class:`sandbox.share.artifact.Source` over an export file: its blobs are copied out
    once, each checked against its digest, into a private scratch directory (removed by
    :meth:`close`)."""

    def __init__(self, path: Path, scratch_root: Path, *, max_size: int) -> None:
        self.path = path
        self.scratch = Path(tempfile.mkdtemp(prefix=".import-", dir=scratch_root))
        self.tags: dict[str, str] = {}   # tag -> manifest digest
        self.order: list[str] = []
        try:
            self._read(max_size)
        except BaseException:
            self.close()
            raise

    def _read(self, max_size: int) -> None:
        try:
            raw = self.path.open("rb")
        except OSError as exc:
            raise RegistryError(f"cannot read {self.path}: {exc.strerror}") from None
        with raw:
            stream: IO[bytes] = raw
            if raw.read(4) == ZSTD_MAGIC:
                raw.seek(0)
                stream = zstandard.ZstdDecompressor().stream_reader(raw)
            else:
                raw.seek(0)
            total, index = 0, None
            try:
                with tarfile.open(fileobj=stream, mode="r|") as tar:
                    for member in tar:
                        if not member.isfile():
                            continue
                        if member.name == "index.json":
                            if member.size > INDEX_LIMIT:
                                raise RegistryError(f"{self.path}: its index.json is too large")
                            index = _json(tar.extractfile(member), self.path)
                            continue
                        match = _BLOB.match(member.name)
                        if match is None:
                            continue
                        total += member.size
                        if total > max_size:
                            raise RegistryError(f"{self.path} holds more than {max_size >> 20} "
                                                "MiB; raise SANDBOX_IMPORT_MAX_SIZE if it is "
                                                "really that large")
                        self._copy_blob(tar.extractfile(member), match.group(1))  # type: ignore[arg-type]
            except (tarfile.TarError, zstandard.ZstdError, EOFError) as exc:
                raise DigestMismatch(f"{self.path} is damaged or truncated ({exc}); make it "
                                     "again with: sandbox export") from None
        if not isinstance(index, dict) or not isinstance(index.get("manifests"), list):
            raise RegistryError(f"{self.path} is not a sandbox export file (it has no OCI "
                                "index); make one with: sandbox export")
        for item in index["manifests"]:
            tag = (item.get("annotations") or {}).get(REF_NAME)
            digest = str(item.get("digest", ""))
            if isinstance(tag, str) and (self.scratch / digest.split(":")[-1]).exists():
                self.tags[tag] = digest
                self.order.append(tag)

    def _copy_blob(self, source: IO[bytes], hexdigest: str) -> None:
        digest = hashlib.sha256()
        dest = self.scratch / hexdigest
        with dest.open("wb") as out:
            while chunk := source.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != hexdigest:
            dest.unlink()
            raise DigestMismatch(f"{self.path}: blob sha256:{hexdigest} has sha256:"
                                 f"{digest.hexdigest()} (tampered or damaged); nothing was "
                                 "imported")

    def manifest(self, tag: str) -> tuple[dict[str, Any], str] | None:
        digest = self.tags.get(tag)
        if digest is None:
            return None
        with (self.scratch / digest.split(":")[1]).open("rb") as file:
            return _json(file, self.path), digest

    def pull_blob(self, digest: str, size: int, dest: Path, *,
                  advance: Callable[[int], None] | None = None) -> None:
        blob = self.scratch / digest.split(":")[-1]
        if not blob.exists():
            raise RegistryNotFound(f"{self.path} lacks blob {digest}: it is incomplete; make "
                                   "it again with: sandbox export")
        if blob.stat().st_size != size:
            raise DigestMismatch(f"{self.path}: blob {digest} has {blob.stat().st_size} bytes, "
                                 f"its manifest says {size}")
        shutil.copyfile(blob, dest)
        if advance is not None:
            advance(size)

    def close(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)


def _json(file: IO[bytes] | None, path: Path) -> Any:
    if file is None:
        raise RegistryError(f"{path}: unreadable member")
    data = file.read(INDEX_LIMIT + 1)
    if len(data) > INDEX_LIMIT:
        raise RegistryError(f"{path}: a manifest is larger than {INDEX_LIMIT >> 20} MiB")
    try:
        return json.loads(data)
    except ValueError as exc:
        raise RegistryError(f"{path}: a manifest is not JSON ({exc})") from None
