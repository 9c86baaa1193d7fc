"""Disk images brought by the user: a recipe's ``disk`` (a file, or an http(s) URL downloaded
once) imported into the image cache.

Import: the source's sha256 (checked against the recipe's when given; a file's digest is
remembered by its inode, size and times, so it is hashed once), ``qemu-img info`` to learn
its format (qcow2, raw, VMDK, VDI or VHDX), ``qemu-img convert`` into the entry's
``disk.qcow2``, a look at its first sectors (a partition table or a boot sector must be
there), and a cloud-init NoCloud seed (:mod:`sandbox.imaging.seed`) with an SSH host key of the
entry's own, which the sandbox pins. Machines boot it through firmware (SeaBIOS, or OVMF for
``boot = "uefi"``); bringing such a guest up (cloud-init, first SSH, the agent) is
:mod:`sandbox.vm.bringup`'s.

A disk image is untrusted input. Its format may name other files: a qcow2 backing file or
external data file, a VMDK descriptor's extents. qemu-img would read those files of this host
and flatten them into the image, where the guest (and whoever made the disk) could read
them. Only self-contained disks are imported: any such reference is refused, and the source
is opened with its backing file disabled, so nothing but the file the user named is read.
What an import may cost is bounded too: a download's size and time, the converted disk's
size (``qemu-img measure``, checked against the free space before converting) and the
conversion's time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..base.paths import cache_dir, find_tool
from ..base.processes import dies_with
from ..base.progress import QUIET, Reporter
from ..base.sizes import format_size, parse_size
from ..errors import (
    HostError,
    ImageError,
    RecipeError,
)
from ..guest.keys import KeyPair
from ..host.firmware import ovmf_firmware
from .recipe import Recipe
from .seed import host_key_pair, user_data, write_seed

#: Bumped whenever importing changes what ends up in an entry.
IMPORT_VERSION = "2"
SUPPORTED_FORMATS = ("qcow2", "raw", "vmdk", "vdi", "vhdx")
#: How long one read of a download may wait for data.
DOWNLOAD_TIMEOUT = 30.0
#: VMDK subformats whose data lives in the one file that holds the descriptor.
SINGLE_FILE_VMDK = ("monolithicSparse", "streamOptimized")
#: Free space an import leaves in the cache beyond the converted disk.
IMPORT_HEADROOM = 1 << 30


def import_limits() -> tuple[int, float, float]:
    """(largest disk, whole download's seconds, conversion's seconds) an import may take:
    ``SANDBOX_IMPORT_MAX_SIZE`` (default 64G: bytes downloaded, and bytes the converted disk
    needs), ``SANDBOX_DOWNLOAD_TIMEOUT`` (default 3600) and ``SANDBOX_IMPORT_TIMEOUT``
    (default 1800)."""
    return (int(_setting("SANDBOX_IMPORT_MAX_SIZE", "64G", parse_size, "a size like 64G")),
            _setting("SANDBOX_DOWNLOAD_TIMEOUT", "3600", float, "a number of seconds"),
            _setting("SANDBOX_IMPORT_TIMEOUT", "1800", float, "a number of seconds"))


def _setting(name: str, default: str, parse: Callable[[str], float], what: str) -> float:
    text = os.environ.get(name, default)
    try:
        value = parse(text)
    except ValueError:
        value = 0
    if not value > 0:
        raise HostError(f"{name}={text!r} is not {what} above zero; fix or unset it")
    return value


# -- the source -----------------------------------------------------------------------------


def source_sha256(recipe: Recipe) -> str:
    """The sha256 of the recipe's disk: the recipe's own for a URL; for a file, computed
    (once per version of the file) and checked against the recipe's when it gives one."""
    if recipe.disk_is_url:
        return recipe.sha256
    path = recipe.disk_path
    if not path.is_file():
        raise ImageError(f"recipe {recipe.name!r}: disk {recipe.disk!r}: no such file {path}")
    digest = file_sha256(path)
    if recipe.sha256 and digest != recipe.sha256:
        raise ImageError(f"recipe {recipe.name!r}: {path} has sha256 {digest}, not the "
                         f"recipe's {recipe.sha256}: the file changed, or the recipe's sha256 "
                         "is wrong; fix one of them")
    return digest


def file_sha256(path: Path) -> str:
    """sha256 of ``path``, remembered by (device, inode, size, modification and change
    time): rewriting a file in place and setting its modification time back (``cp -p``,
    ``rsync -t --inplace``) still changes its change time, which no one can set back."""
    info = path.stat()
    stamp = (f"{info.st_dev}:{info.st_ino}:{info.st_size}:{info.st_mtime_ns}:"
             f"{info.st_ctime_ns}:{path}")
    memo = cache_dir() / "digests" / hashlib.sha256(stamp.encode()).hexdigest()
    with contextlib.suppress(OSError):
        return memo.read_text().strip()
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    memo.parent.mkdir(mode=0o700, exist_ok=True)
    temporary = memo.with_suffix(f".{os.getpid()}")
    temporary.write_text(digest.hexdigest() + "\n")
    temporary.replace(memo)
    return digest.hexdigest()


def download(url: str, sha256: str, *, reporter: Reporter = QUIET) -> Path:
    """The file at ``url`` in the download cache (fetched once; an interrupted download
    resumes where it stopped), checked against ``sha256``. A body larger than the import
    size limit, or one that takes longer than the download timeout, is not kept waiting for:
    the server's bytes are untrusted until their digest matches."""
    limit, seconds, _ = import_limits()
    folder = cache_dir() / "downloads"
    folder.mkdir(mode=0o700, exist_ok=True)
    final = folder / sha256
    if final.is_file():
        return final
    partial = folder / f"{sha256}.part"
    have = partial.stat().st_size if partial.exists() else 0
    deadline = time.monotonic() + seconds
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # the partial file is complete already
            response = None
        else:
            raise ImageError(f"downloading {url} failed: HTTP {exc.code} {exc.reason}; check "
                             "the recipe's disk URL") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ImageError(f"cannot download {url}: {reason}; check the URL and that this "
                         "machine can reach it") from None
    if response is not None:
        with response:
            if have and response.status != 206:  # the server ignored the range: start over
                have = 0
            size = response.headers.get("Content-Length")
            total = int(size) + have if size is not None and size.isdigit() else None
            if total is not None:
                _check_room(url, total, limit, "the download")
            with partial.open("ab" if have else "wb") as out, \
                    reporter.progress(f"downloading {url}", total, have) as advance:
                got = have
                try:
                    while chunk := response.read1(1 << 20):  # what has come, so
                        got += len(chunk)                     # the deadline is seen
                        if got > limit:
                            out.close()
                            partial.unlink()
                            raise ImageError(
                                f"the download of {url} is larger than "
                                f"{format_size(limit)}, the largest disk the sandbox imports "
                                "(it was discarded); raise SANDBOX_IMPORT_MAX_SIZE if the "
                                "disk is really that large")
                        out.write(chunk)
                        advance(len(chunk))
                        if time.monotonic() > deadline:
                            raise ImageError(
                                f"downloading {url} took longer than {seconds:.0f} s "
                                f"(SANDBOX_DOWNLOAD_TIMEOUT; {format_size(got)} so far, kept): "
                                "run again to resume it, or raise SANDBOX_DOWNLOAD_TIMEOUT")
                except OSError as exc:
                    raise ImageError(f"downloading {url} was interrupted ({exc}); run again "
                                     "to resume it") from None
        if total is not None and partial.stat().st_size < total:
            raise ImageError(f"downloading {url} was interrupted ({partial.stat().st_size} of "
                             f"{total} bytes); run again to resume it")
    digest = hashlib.sha256()
    with partial.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    if digest.hexdigest() != sha256:
        partial.unlink()
        raise ImageError(f"the download of {url} has sha256 {digest.hexdigest()}, not the "
                         f"recipe's {sha256}: the file at that URL changed, or the recipe's "
                         "sha256 is wrong (the download was discarded)")
    partial.replace(final)
    return final


def _check_room(what: str, size: int, limit: int, how: str) -> None:
    """ImageError unless ``size`` bytes of ``what`` are within the import size limit and
    fit in the cache's free space (leaving some over)."""
    if size > limit:
        raise ImageError(f"{how} of {what} needs {format_size(size)}, more than "
                         f"{format_size(limit)}, the largest disk the sandbox imports; raise "
                         "SANDBOX_IMPORT_MAX_SIZE if the disk is really that large")
    free = shutil.disk_usage(cache_dir()).free
    if size + IMPORT_HEADROOM > free:
        raise ImageError(f"{how} of {what} needs {format_size(size)}, and the cache "
                         f"{cache_dir()} has {format_size(free)} free; free some space "
                         "(sandbox image rm NAME) or point SANDBOX_CACHE_DIR at a larger disk")


def write_disk_recipe(disk: Path, *, name: str | None, boot: str, user: str, memory: str,
                      cpus: int, force: bool) -> Recipe:
    """Write ``images/NAME.toml`` (in the working directory) for disk image ``disk``, with its
    sha256; the parsed recipe."""
    from .recipe import _NAME, parse_recipe

    name = name or disk.name.split(".")[0].lower()
    if not _NAME.match(name):
        raise RecipeError(f"image name {name!r} must be lower case letters, digits, '.', '_' "
                          "or '-'; give one with --name")
    folder = Path.cwd() / "images"
    folder.mkdir(exist_ok=True)
    target = folder / f"{name}.toml"
    if target.exists() and not force:
        raise RecipeError(f"{target} exists already; choose another --name, or --force to "
                          "replace it")
    source = disk.resolve()
    lines = [f"# Imported from {source} by sandbox image import.",
             f"description = {json.dumps(f'imported from {source.name}')}",
             f"disk = {json.dumps(os.path.relpath(source, folder))}",
             f"sha256 = \"{file_sha256(source)}\"",
             f"boot = \"{boot}\"", *([f"user = \"{user}\""] if user else []),
             f"memory = \"{memory}\"", f"cpus = {cpus}"]
    work = target.with_suffix(f".toml.{os.getpid()}")
    work.write_text("\n".join(lines) + "\n")
    try:
        parse_recipe(work)  # validated before it replaces anything
    except RecipeError:
        work.unlink()
        raise
    work.replace(target)
    return parse_recipe(target)


# -- the import -----------------------------------------------------------------------------


def import_into(recipe: Recipe, key: str, digest: str, work: Path,
                reporter: Reporter, client: KeyPair) -> dict[str, Any]:
    """Fill cache entry ``work`` from the recipe's disk (its seed lets ``client``'s key in);
    the entry's manifest."""
    started = time.monotonic()
    qemu_img = find_tool("qemu-img")
    if qemu_img is None:
        raise HostError("importing disk images needs qemu-img; install with: "
                        "sudo apt-get install qemu-utils")
    if recipe.boot == "uefi":
        ovmf_firmware()
    source = (download(recipe.disk, digest, reporter=reporter) if recipe.disk_is_url
              else recipe.disk_path)
    fmt = disk_format(qemu_img, source)
    spec = source_spec(fmt, source)
    info = _qemu_img_json(qemu_img, ["info", spec], source)
    check_self_contained(info, fmt, source)
    limit, _, seconds = import_limits()
    needed = int(_qemu_img_json(qemu_img, ["measure", "-O", "qcow2", spec], source)["required"])
    _check_room(str(source), needed, limit, "the converted disk")
    with reporter.stage(f"{recipe.name}: converting {fmt} to qcow2 (qemu-img convert)"):
        try:
            converted = subprocess.run(
                [qemu_img, "convert", "-O", "qcow2", spec, str(work / "disk.qcow2")],
                capture_output=True, text=True, timeout=seconds, check=False,
                preexec_fn=dies_with(os.getpid()))
        except subprocess.TimeoutExpired:
            raise ImageError(f"converting {source} ({fmt}, {format_size(needed)}) took longer "
                             f"than {seconds:.0f} s; raise SANDBOX_IMPORT_TIMEOUT if this host "
                             "is that slow") from None
    if converted.returncode != 0:
        raise ImageError(f"qemu-img could not convert {source} ({fmt}): "
                         f"{converted.stderr.strip()[-500:]}")
    check_bootable(qemu_img, work / "disk.qcow2", source)
    private, public = host_key_pair()
    hostname = recipe.name.replace(".", "-").replace("_", "-")[:63]
    write_seed(work / "seed.iso", instance_id=f"{recipe.name}-{key[:16]}", hostname=hostname,
               user_data_text=user_data(user=recipe.user,
                                        authorized_key=client.public_line,
                                        host_key=(private, public),
                                        extra=recipe.cloud_init_user_data))
    return {
        "name": recipe.name, "digest": key, "kind": "disk",
        "builder_version": IMPORT_VERSION,
        "builder": f"qemu-img convert from {fmt}",
        "recipe_path": str(recipe.path) if recipe.path else None,
        "recipe": recipe.canonical(),
        "source": recipe.disk if recipe.disk_is_url else str(source),
        "source_sha256": digest, "source_format": fmt,
        "source_bytes": source.stat().st_size,
        "boot": recipe.boot, "user": recipe.user, "hostname": hostname,
        "memory": recipe.memory, "cpus": recipe.cpus,
        "host_key": " ".join(public.split()[:2]),
        "client_key": client.public_line,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "build_seconds": round(time.monotonic() - started, 1),
    }


def disk_format(qemu_img: str, source: Path) -> str:
    """The format qemu-img sees in ``source``, if it is one the sandbox imports."""
    fmt = str(_qemu_img_json(qemu_img, ["info", str(source)], source).get("format"))
    if fmt not in SUPPORTED_FORMATS:
        raise ImageError(f"{source} is a {fmt} image, which the sandbox does not import; "
                         f"convert it to one of {', '.join(SUPPORTED_FORMATS)} (qemu-img "
                         "convert -O qcow2 ...)")
    return fmt


def source_spec(fmt: str, source: Path) -> str:
    """How qemu-img opens an imported disk: its format given (never probed again), the one
    file named, and no backing file even if the image's header names one."""
    return "json:" + json.dumps({"driver": fmt, "backing": None,
                                 "file": {"driver": "file", "filename": str(source)}})


def check_self_contained(info: dict[str, Any], fmt: str, source: Path) -> None:
    """ImageError when ``qemu-img info`` shows that the image's data is not all in
    ``source``: a backing file, an external data file, a VMDK whose extents are other files.
    Each of those would make qemu-img read another file of this host into the image."""
    why = ("the sandbox imports only self-contained disks, since qemu-img would copy that "
           "file of this host into the guest's disk. Where the disk came from, flatten it "
           "into one file (qemu-img convert -O qcow2 DISK flat.qcow2, with files you trust) "
           "and import that")
    backing = info.get("backing-filename") or info.get("full-backing-filename")
    if backing:
        raise ImageError(f"{source} is a {fmt} image with a backing file "
                         f"(backing-filename: {backing}); {why}")
    data = info.get("format-specific", {}).get("data", {})
    if data.get("data-file"):
        raise ImageError(f"{source} is a {fmt} image with an external data file "
                         f"(data-file: {data['data-file']}); {why}")
    if fmt == "vmdk":
        extents = [str(e.get("filename")) for e in data.get("extents", [])]
        if (data.get("create-type") not in SINGLE_FILE_VMDK
                or any(Path(e) != source for e in extents)):
            raise ImageError(f"{source} is a {data.get('create-type')} VMDK whose data is in "
                             f"other files (extents: {', '.join(extents) or 'none'}); {why}")


def _qemu_img_json(qemu_img: str, args: list[str], source: Path) -> dict[str, Any]:
    """``qemu-img ARGS --output=json``, parsed; ImageError when qemu-img cannot read the
    disk."""
    try:
        result = subprocess.run([qemu_img, args[0], "--output=json", *args[1:]],
                                capture_output=True, text=True, timeout=120, check=False,
                                preexec_fn=dies_with(os.getpid()))
    except subprocess.TimeoutExpired:
        raise ImageError(f"qemu-img {args[0]} of {source} took longer than 120 s; is it on a "
                         "file system that answers?") from None
    if result.returncode != 0:
        raise ImageError(f"{source} is not a disk image qemu-img can read: "
                         f"{result.stderr.strip()[-300:]}")
    try:
        answer = json.loads(result.stdout)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise ImageError(f"qemu-img {args[0]} of {source} gave no JSON object: "
                         f"{result.stdout.strip()[:200]!r}")
    return answer


def check_bootable(qemu_img: str, disk: Path, source: Path) -> None:
    """A disk firmware can boot starts with a boot sector (0x55AA) or a GPT header."""
    head = disk.with_name("head.raw")
    try:
        result = subprocess.run([qemu_img, "dd", "-f", "qcow2", "-O", "raw", "bs=512", "count=2",
                                 f"if={disk}", f"of={head}"],
                                capture_output=True, text=True, timeout=60, check=False)
        data = head.read_bytes() if result.returncode == 0 else b""
    finally:
        head.unlink(missing_ok=True)
    if len(data) < 1024:
        raise ImageError(f"{source} is too small to be a bootable disk ({len(data)} bytes "
                         "read)")
    if data[510:512] != b"\x55\xaa" and data[512:520] != b"EFI PART":
        raise ImageError(f"{source} has no partition table or boot sector (no MBR signature, "
                         "no GPT header): it is not a disk image, or nothing on it can boot. "
                         "Point 'disk' at the disk image of an installed system.")
