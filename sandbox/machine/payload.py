"""Big payloads without a cipher: ``put``, ``get`` and ``push`` of a MiB or more go through the
machine's payload disk, a sparse raw file of its own the guest sees as a virtio disk
(``/dev/disk/by-id/virtio-sandbox-data``, see :mod:`sandbox.vm.plan`), instead of SFTP or a
tar stream over SSH, whose cipher the guest runs under emulation.

The SSH channel stays the control path: one command per transfer moves the bytes between the
disk and the file with ``dd`` (O_DIRECT, so no stale page cache), and checks the content's
sha256 against the host's, in parallel with the copy. A put lands under a temporary name and
is renamed into place only once its digest matches. A get is bounded as over SFTP (size and
time) and written on the host only once its digest matches. The disk is emptied after each
transfer (its file truncated), and one transfer at a time uses it (a lock in the machine's
directory, shared with ``sandbox cp`` in other processes).

Where the fast path is not available (a machine started before the payload disk existed, an
image whose login account is not root, a guest without the device) the transfer goes over
SSH as before, and a SandboxWarning says so once per machine.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shlex
import shutil
import stat
import tarfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol

import filelock

from ..errors import ChannelError, GuestDataError, SandboxWarning, guest_text
from ..guest.transfer import too_large
from ..vm.plan import DATA_DISK_SIZE, DATA_SERIAL

if TYPE_CHECKING:
    from ..guest.channel import Channel
    from ..vm.files import MachineFiles


class Machine(Protocol):
    """What a transfer uses of :class:`sandbox.Machine` (which imports this module)."""

    name: str
    user: str
    files: MachineFiles | None

    @property
    def channel(self) -> Channel: ...

    def _watch(self) -> None: ...

#: Payloads smaller than this go over SSH (one round trip costs more than the cipher).
FAST_FROM = 1 << 20
DEVICE = f"/dev/disk/by-id/virtio-{DATA_SERIAL}"
BLOCK = 4096
CHUNK = 4 << 20
#: Exit statuses of the guest scripts: no payload disk; not worth it (fall back quietly);
#: the content's digest differs.
NO_DEVICE, FALL_BACK, MISMATCH = 97, 93, 98


#: The first line of every transfer script: the payload disk and GNU coreutils' dd (its
#: count_bytes and O_DIRECT flags), else the fast path is not there.
_NEEDS = (f'D={DEVICE}; [ -b "$D" ] || exit {NO_DEVICE}; '
          f'case "$(dd --version 2>/dev/null)" in *coreutils*) ;; *) exit {NO_DEVICE};; esac')


class Unavailable(Exception):
    """The fast path cannot serve this transfer: use SSH."""


def _padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


#: Room the payload disk's filesystem keeps free beyond a payload (the runtime directory may
#: be a small tmpfs): a payload that does not fit goes over SSH instead.
SPARE = 64 << 20
_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def _room(machine: Machine) -> int:
    """The largest payload the payload disk's filesystem has room for now."""
    assert machine.files is not None
    return max(0, shutil.disk_usage(machine.files.dir).free - SPARE)


def available(machine: Machine) -> bool:
    """Whether this machine can take fast transfers (a payload disk, root login)."""
    files = machine.files
    if getattr(machine, "_payload_off", False) or files is None:
        return False
    if not files.data_disk.exists():
        _off(machine, "it was started without a payload disk (by an earlier version?)")
        return False
    if machine.user != "root":
        _off(machine, f"it logs in as {machine.user}, and reading the payload disk needs root")
        return False
    return True


def _off(machine: Machine, why: str) -> None:
    machine._payload_off = True  # type: ignore[attr-defined]
    warnings.warn(f"{machine.name}: big put/get/push go over SSH ({why}); that is slower under "
                  "emulation", SandboxWarning, stacklevel=5)


@contextmanager
def _disk(machine: Machine) -> Iterator[Path]:
    """The payload disk, held by this transfer; emptied afterwards."""
    assert machine.files is not None
    disk = machine.files.data_disk
    with filelock.FileLock(str(machine.files.dir / "data.lock")):
        try:
            yield disk
        finally:
            with disk.open("r+b") as handle:  # drop the payload, keep the size QEMU knows
                handle.truncate(0)
                handle.truncate(DATA_DISK_SIZE)


def _run(machine: Machine, script: str, timeout: float, what: str) -> str:
    """Run a transfer script; its stdout. Unavailable for NO_DEVICE and FALL_BACK."""
    try:
        result = machine.channel.run(script, timeout=timeout, watch=machine._watch)
    except ChannelError as exc:
        raise ChannelError(f"{what}: {exc}") from exc
    if result.exit_status == NO_DEVICE:
        _off(machine, f"the guest lacks {DEVICE} or GNU coreutils' dd")
        raise Unavailable
    if result.exit_status == FALL_BACK:
        raise Unavailable
    if result.exit_status == MISMATCH:
        raise ChannelError(f"{what}: the content that arrived has another sha256 than what was "
                           f"sent ({guest_text(result.stderr.strip()[-200:])}); nothing was "
                           "written")
    if result.exit_status != 0:
        raise ChannelError(f"{what}: the guest side failed (status {result.exit_status}): "
                           f"{guest_text(result.stderr.strip(), 20)}")
    return result.stdout


class _Hashing:
    """A file object that hashes what is written through it."""

    def __init__(self, target: BinaryIO) -> None:
        self.target, self.digest, self.size = target, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.target.write(data)

    def pad(self) -> None:
        """Hash the zeros up to the next block, as the guest reads them."""
        self.digest.update(bytes(_padded(self.size) - self.size))


def put(machine: Machine, local: Path, remote: str, timeout: float) -> bool:
    """Copy ``local`` into the guest as ``remote`` (mode kept) through the payload disk;
    False when the fast path does not serve it (the caller uses SSH)."""
    size = local.stat().st_size
    if not FAST_FROM <= size <= DATA_DISK_SIZE or not available(machine) or \
            size > _room(machine):
        return False
    mode = stat.S_IMODE(local.stat().st_mode)
    with _disk(machine) as disk:
        try:
            with local.open("rb") as source, disk.open("r+b") as target:
                sink = _Hashing(target)
                while chunk := source.read(CHUNK):
                    sink.write(chunk)
                sink.pad()
        except OSError as exc:
            if exc.errno in _FULL:
                return False  # the host's disk filled meanwhile: SSH
            raise ChannelError(f"could not copy {local} into the guest as {remote}: "
                               f"{exc.strerror or exc}") from exc
        quoted = shlex.quote(remote)
        script = f"""{_NEEDS}
dest={quoted}
if [ -d "$dest" ]; then echo "$dest is a directory" >&2; exit 2; fi
t="$(dirname -- "$dest")/.sandbox-put-$$"; h="/run/.sandbox-put-$$"
dd if="$D" iflag=direct,count_bytes count={_padded(size)} bs=4M status=none | sha256sum > "$h" &
if ! dd if="$D" of="$t" iflag=direct,count_bytes count={_padded(size)} bs=4M status=none; then
  wait; rm -f "$t" "$h"; exit 1; fi
wait $! || {{ rm -f "$t" "$h"; exit 1; }}
got=$(cut -c1-64 "$h"); rm -f "$h"
if [ "$got" != {sink.digest.hexdigest()} ]; then rm -f "$t"; echo "$got" >&2; exit {MISMATCH}; fi
truncate -s {size} "$t" && chmod {mode:o} "$t" && mv -f "$t" "$dest"
"""
        try:
            _run(machine, script, timeout, f"could not copy {local} into the guest as {remote}")
        except Unavailable:
            return False
    return True


def get(machine: Machine, remote: str, local: Path, max_size: int, timeout: float) -> bool:
    """Copy regular guest file ``remote`` to ``local`` through the payload disk, bounded as
    over SFTP; False when the fast path does not serve it (small, missing, not a regular
    file, past ``max_size``: the SSH path says what is wrong)."""
    if not available(machine):
        return False
    started = time.monotonic()
    # Past what the host has room for, the SSH path copies it (into the caller's directory).
    limit = min(max_size, DATA_DISK_SIZE, _room(machine))
    script = f"""{_NEEDS}
s={shlex.quote(remote)}
[ -f "$s" ] || exit {FALL_BACK}
sz=$(stat -L -c %s -- "$s")
if [ "$sz" -lt {FAST_FROM} ] || [ "$sz" -gt {limit} ]; then exit {FALL_BACK}; fi
h="/run/.sandbox-get-$$"
sha256sum < "$s" > "$h" &
if ! dd if="$s" of="$D" bs=4M iflag=count_bytes count="$sz" oflag=direct conv=sync,notrunc \\
    status=none; then wait; rm -f "$h"; exit 1; fi
wait $! || {{ rm -f "$h"; exit 1; }}
echo "$sz $(cut -c1-64 "$h")"; rm -f "$h"
"""
    if local.is_dir():
        return False  # the SSH path says so
    with _disk(machine) as disk:
        try:
            answer = _run(machine, script, timeout, f"could not copy {remote} from the guest")
        except Unavailable:
            return False
        try:
            size_text, digest = answer.split()
            size = int(size_text)
        except ValueError:
            raise GuestDataError(f"copying {remote} from the guest: an answer that is not a "
                                 f"size and a digest: {guest_text(answer[:200])!r}") from None
        if not 0 <= size <= limit:  # the guest's own word, checked
            raise too_large(remote, max_size, f"it has {size} bytes")
        part = local.parent / f".{local.name[:200]}.{os.urandom(4).hex()}.part"
        try:
            fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
            with os.fdopen(fd, "wb") as target, disk.open("rb") as source:
                check = hashlib.sha256()
                left = size
                while left:
                    if time.monotonic() - started > timeout:
                        raise GuestDataError(f"get of {remote} did not finish within "
                                             f"{timeout:g} s; nothing was written")
                    chunk = source.read(min(CHUNK, left))
                    if not chunk:
                        raise GuestDataError(f"get of {remote}: the payload disk ended early")
                    check.update(chunk)
                    target.write(chunk)
                    left -= len(chunk)
            if check.hexdigest() != digest:
                raise ChannelError(f"copying {remote} from the guest: what arrived has another "
                                   "sha256 than the guest's file (it changed while copied?); "
                                   "nothing was written")
            os.replace(part, local)
        finally:
            part.unlink(missing_ok=True)
    return True


def push(machine: Machine, local_dir: Path, remote_dir: str, timeout: float) -> bool:
    """The contents of ``local_dir`` into ``remote_dir`` (made; modes kept) as one tar
    archive through the payload disk; False when the fast path does not serve it."""
    total = sum(p.lstat().st_size for p in local_dir.rglob("*") if p.is_file())
    if not FAST_FROM <= total <= DATA_DISK_SIZE // 2 or not available(machine) or \
            total * 2 > _room(machine):
        return False
    with _disk(machine) as disk:
        try:
            with disk.open("r+b") as target:
                sink = _Hashing(target)
                with tarfile.open(fileobj=sink, mode="w|",  # type: ignore[call-overload]
                                  format=tarfile.PAX_FORMAT) as tar:
                    for entry in sorted(local_dir.iterdir()):
                        tar.add(str(entry), arcname=entry.name)
                sink.pad()
        except OSError as exc:
            if exc.errno in _FULL:
                return False
            raise ChannelError(f"push of {local_dir} to {remote_dir} failed: {exc}") from exc
        if sink.size > DATA_DISK_SIZE:
            return False
        padded = _padded(sink.size)
        script = f"""{_NEEDS}
dest={shlex.quote(remote_dir)}; h="/run/.sandbox-push-$$"
mkdir -p -- "$dest" || exit 1
dd if="$D" iflag=direct,count_bytes count={padded} bs=4M status=none | sha256sum > "$h" &
# tar reads the disk itself, in 1 MiB records (a pipe costs much under emulation); the
# disk's page cache is dropped first, so that no earlier transfer's bytes are read.
blockdev --flushbufs "$D"
if ! tar -x -p -b 2048 -f "$D" -C "$dest"; then wait; rm -f "$h"; exit 1; fi
wait $! || {{ rm -f "$h"; exit 1; }}
got=$(cut -c1-64 "$h"); rm -f "$h"
if [ "$got" != {sink.digest.hexdigest()} ]; then echo "$got" >&2; exit {MISMATCH}; fi
"""
        try:
            _run(machine, script, timeout, f"push of {local_dir} to {remote_dir}")
        except Unavailable:
            return False
    return True
