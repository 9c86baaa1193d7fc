"""Cache entries as OCI artifacts, through export files (no VM, no registry: the registry
tests are in test_registry.py, the real-guest ones in test_distribution.py)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from sandbox.errors import DigestMismatch, RegistryError
from sandbox.share import artifact
from sandbox.share.archive import Archive, ArchiveWriter
from sandbox.share.artifact import Entry, lookup, push_entry, unpack
from sandbox.share.store import receive, send

KEY = "ab" * 32
IMAGE_KEY = "cd" * 32


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv("SANDBOX_CACHE_DIR", str(path))
    return path


def make_golden(root: Path, image_entry: str = "img-cdcdcdcdcdcdcdcd") -> Entry:
    """A golden-shaped entry: a 64 MiB sparse ram file with a few data blocks, a state file,
    a qcow2 overlay on ``../../images/<image_entry>/disk.qcow2``."""
    image = root / "images" / image_entry
    image.mkdir(parents=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image / "disk.qcow2"), "16M"],
                   check=True)
    (image / "manifest.json").write_text(json.dumps({"digest": IMAGE_KEY}))
    golden = root / "golden" / "img-abababababababab"
    golden.mkdir(parents=True)
    with (golden / "ram").open("wb") as ram:
        ram.truncate(64 << 20)
        for offset in (0, 5 << 20, 40 << 20):
            ram.seek(offset)
            ram.write(os.urandom(8192))
    (golden / "state").write_bytes(os.urandom(300_000))
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                    f"../../images/{image_entry}/disk.qcow2", str(golden / "disk.qcow2")],
                   check=True, cwd=golden)
    (golden / "manifest.json").write_text(json.dumps({"key": KEY, "image_entry": image_entry}))
    return Entry("golden", golden, KEY, needs=(f"image-{IMAGE_KEY}",))


def digests(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def export(entries: list[Entry], out: Path) -> None:
    writer = ArchiveWriter(out)
    try:
        send(writer, entries, skip_present=False)
    finally:
        writer.close()


@pytest.mark.parametrize("name", ["cache.tar", "cache.tar.zst"])
def test_an_entry_round_trips_through_an_export_file_sparse_and_verified(
        tmp_path: Path, cache: Path, name: str) -> None:
    source = tmp_path / "other-host"
    golden = make_golden(source)
    image = Entry("image", source / "images" / "img-cdcdcdcdcdcdcdcd", IMAGE_KEY)
    out = tmp_path / name
    export([image, golden], out)
    assert out.stat().st_size < 2 << 20  # 64 MiB of mostly holes, compressed

    archive = Archive(out, tmp_path, max_size=1 << 30)
    try:
        done = receive(archive, golden.tag, str(out))
    finally:
        archive.close()
    assert [(r.kind, pulled) for r, pulled in done] == [("image", True), ("golden", True)]
    landed = cache / "golden" / golden.path.name
    assert digests(landed) == digests(golden.path)
    ram = landed / "ram"
    assert ram.stat().st_size == 64 << 20
    assert ram.stat().st_blocks * 512 < 1 << 20, "the ram file was not written sparse"
    assert oct(landed.stat().st_mode & 0o777) == "0o555"
    assert oct(ram.stat().st_mode & 0o777) == "0o644"
    # The overlay resolves its backing file inside the new cache.
    info = json.loads(subprocess.run(
        ["qemu-img", "info", "--output=json", "--backing-chain", "-U", str(landed / "disk.qcow2")],
        capture_output=True, text=True, check=True).stdout)
    assert Path(info[1]["filename"]).resolve() == \
        cache / "images" / "img-cdcdcdcdcdcdcdcd" / "disk.qcow2"


def test_a_tampered_or_truncated_export_file_is_refused(tmp_path: Path, cache: Path) -> None:
    golden = make_golden(tmp_path / "src")
    out = tmp_path / "cache.tar"
    export([Entry("image", tmp_path / "src/images/img-cdcdcdcdcdcdcdcd", IMAGE_KEY), golden],
           out)
    data = bytearray(out.read_bytes())
    state = (golden.path / "state").read_bytes()
    # Flip bytes inside a blob (the compressed state: random bytes stay as they are).
    at = data.find(state[1000:1100])
    assert at > 0
    data[at:at + 4] = b"EVIL"
    tampered = tmp_path / "tampered.tar"
    tampered.write_bytes(bytes(data))
    with pytest.raises(DigestMismatch, match=r"blob sha256:[0-9a-f]{64} has sha256:"):
        Archive(tampered, tmp_path, max_size=1 << 30)
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(out.read_bytes()[: out.stat().st_size // 2])
    with pytest.raises(RegistryError, match="truncated|incomplete|not a sandbox export"):
        Archive(truncated, tmp_path, max_size=1 << 30)
    assert not list(cache.glob("golden/*")) if cache.exists() else True
    assert not list(tmp_path.glob(".import-*")), "the scratch directory was left"


def test_pulled_files_are_bounded_by_what_the_entry_declares(tmp_path: Path, cache: Path) -> None:
    blob, plain = tmp_path / "blob", tmp_path / "plain"
    plain.write_bytes(bytes(10 << 20))
    digest, size = artifact.compress(plain, blob)
    assert size == 10 << 20
    with pytest.raises(DigestMismatch, match="decompresses to more than the 4096 bytes"):
        artifact.decompress(blob, tmp_path / "out", 4096)
    with pytest.raises(DigestMismatch, match=f"should have {size + 1} bytes, but has {size}"):
        artifact.decompress(blob, tmp_path / "out", size + 1)
    # A damaged frame (its digest would have been checked first: here it is not).
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(DigestMismatch):
        artifact.decompress(blob, tmp_path / "out", size)


@pytest.mark.parametrize("backing", ["/etc/shadow", "../../images/x/../../../etc/passwd",
                                     "../../../elsewhere/disk.qcow2", None])
def test_a_pulled_overlay_may_only_stand_on_an_entry_of_the_cache(
        tmp_path: Path, cache: Path, backing: str | None) -> None:
    golden = make_golden(tmp_path / "src")
    disk = golden.path / "disk.qcow2"
    disk.unlink()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *(
        ["-F", "raw", "-b", backing, "-u"] if backing else []), str(disk), "16M"], check=True)
    out = tmp_path / "cache.tar"
    export([golden], out)
    archive = Archive(out, tmp_path, max_size=1 << 30)
    try:
        remote = lookup(archive, golden.tag, "test")
        assert remote is not None
        with pytest.raises(RegistryError, match="backing file"):
            unpack(archive, remote, cache / "golden" / golden.path.name, max_size=1 << 30)
    finally:
        archive.close()
    assert not (cache / "golden" / golden.path.name).exists()


def test_a_qcow2_with_an_external_data_file_is_refused(tmp_path: Path) -> None:
    disk = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                    f"data_file={tmp_path / 'data.raw'}", str(disk), "16M"], check=True)
    with pytest.raises(RegistryError, match="external file"):
        artifact.qcow2_backing(disk)


def test_an_entry_with_unexpected_files_is_not_pushed(tmp_path: Path, cache: Path) -> None:
    golden = make_golden(tmp_path / "src")
    (golden.path / "notes.txt").write_text("x")
    with pytest.raises(RegistryError, match=r"does not have \(notes.txt\)"):
        push_entry(ArchiveWriter(tmp_path / "x.tar"), golden)


def test_an_entry_larger_than_the_limit_is_not_fetched(tmp_path: Path, cache: Path) -> None:
    golden = make_golden(tmp_path / "src")
    out = tmp_path / "cache.tar"
    export([golden], out)
    archive = Archive(out, tmp_path, max_size=1 << 30)
    try:
        remote = lookup(archive, golden.tag, "test")
        assert remote is not None
        with pytest.raises(RegistryError, match=r"takes 64 MiB, more than 32 MiB.*"
                                                r"SANDBOX_IMPORT_MAX_SIZE"):
            unpack(archive, remote, cache / "golden" / golden.path.name, max_size=32 << 20)
    finally:
        archive.close()
    assert not (cache / "golden" / golden.path.name).exists()
