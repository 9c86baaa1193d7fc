"""Big payloads without a cipher: ``put``, ``get`` and ``push`` of a MiB or more go through the
machine's payload disk, a sparse raw file of its own the guest sees as a virtio disk
(``/dev/disk/by-id/virtio-sandbox-data``, see :mod:`sandbox.vm.plan`), instead of SFTP or a
tar stream over SSH, whose cipher the guest runs under emulation.

The SSH channel stays the control path: one command per transfer moves the bytes between the
disk and the file with ``dd`` (O_DIRECT, so no stale page cache and, for a put, no copy by
the guest's CPU at all), and checks the content's sha256 against the host's, in parallel
with the copy. The content is hashed in pieces (:func:`piece_size`), each piece's sha256
checked, so that the guest's vCPUs share the hashing: under emulation sha256 runs at about
65 MiB/s per vCPU, and a single digest would bound every transfer to that. A put lands under
a temporary name and is renamed into place only once its digests match. A get is bounded as
over SFTP (size and time) and written on the host only once its digests match. The disk is
emptied after each transfer (its file truncated), and one transfer at a time uses it (a lock
in the machine's directory, shared with ``sandbox cp`` in other processes).

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
#: count_bytes and O_DIRECT flags), else the fast path is not there. dd is asked once per
#: machine (each new process costs tens of milliseconds under emulation).
_NEEDS = f'D={DEVICE}; [ -b "$D" ] || exit {NO_DEVICE}'
_NEEDS_DD = f'case "$(dd --version 2>/dev/null)" in *coreutils*) ;; *) exit {NO_DEVICE};; esac'


def _needs(machine: Machine) -> str:
    return _NEEDS if getattr(machine, "_payload_dd", False) else f"{_NEEDS}; {_NEEDS_DD}"


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
    machine._payload_dd = True  # type: ignore[attr-defined]
    if result.exit_status != 0:
        raise ChannelError(f"{what}: the guest side failed (status {result.exit_status}): "
                           f"{guest_text(result.stderr.strip(), 20)}")
    return result.stdout


#: Content is hashed in pieces of a multiple of PIECE_UNIT: about PIECES_AIM of them (each
#: a process pair in the guest, which costs under emulation; two, as a machine has two vCPUs
#: unless asked for more), hashed by up to LANES_MAX vCPUs at once.
PIECE_UNIT = 4 << 20
PIECES_AIM = 2
LANES_MAX = 4


#: piece_size in shell, of the content's size in $sz.
_PIECE_SHELL = (f"$(( (sz + {PIECE_UNIT * PIECES_AIM - 1}) / {PIECE_UNIT * PIECES_AIM} "
                f"* {PIECE_UNIT} ))")


def piece_size(size: int) -> int:
    """The piece length for ``size`` bytes of content: ceil(size / 8 MiB) * 4 MiB, so a
    payload has at most two pieces (the guest script computes the same in shell)."""
    return max(1, -(-size // (PIECE_UNIT * PIECES_AIM))) * PIECE_UNIT


class _Hashing:
    """A file object that hashes what is written through it, in pieces of ``piece`` bytes:
    one sha256 per piece."""

    def __init__(self, target: BinaryIO, piece: int) -> None:
        self.target, self.piece, self.size = target, piece, 0
        self.digests: list[str] = []
        self._current, self._filled = hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        written = self.target.write(data)
        self._hash(data)
        return written

    def _hash(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            take = min(len(view), self.piece - self._filled)
            self._current.update(view[:take])
            self._filled += take
            self.size += take
            view = view[take:]
            if self._filled == self.piece:
                self.digests.append(self._current.hexdigest())
                self._current, self._filled = hashlib.sha256(), 0

    def pad(self) -> None:
        """Hash the zeros up to the next block, as the guest reads them, and close the last
        piece."""
        self._hash(bytes(_padded(self.size) - self.size))
        self.finish()

    def finish(self) -> None:
        """Close the last piece."""
        if self._filled:
            self.digests.append(self._current.hexdigest())
            self._current, self._filled = hashlib.sha256(), 0


def _hash_pieces(source: str, total: str, piece: int | str, out: str) -> str:
    """Shell lines that hash ``total`` bytes of ``source`` (the dd input options included)
    in pieces of ``piece`` bytes, each piece's sha256 into ``out``.K (K its index), up to
    LANES_MAX pieces at a time: one lane per guest vCPU, each lane every so-many-th piece.
    A shell word each (variables allowed). The caller waits for the lanes."""
    return f"""P={piece}; T={total}; N=$(( (T + P - 1) / P ))
set -- /sys/devices/system/cpu/cpu[0-9]*; L=$#; [ "$L" -gt {LANES_MAX} ] && L={LANES_MAX}
lane=0
while [ $lane -lt $L ]; do
  ( k=$lane
    while [ $k -lt $N ]; do
      o=$((k * P)); n=$P; [ $((o + n)) -gt $T ] && n=$((T - o))
      dd {source},skip_bytes,count_bytes skip=$o count=$n bs=4M status=none \\
        | sha256sum > {out}.$k
      k=$((k + L))
    done ) &
  lane=$((lane + 1))
done"""


def _digests_of(out: str) -> str:
    """Shell: $got, the pieces' digests from :func:`_hash_pieces` in order, space-separated
    (after a ``wait`` for the lanes; a piece a lane could not hash reads as empty)."""
    return f"""got=""; k=0
while [ $k -lt $N ]; do
  d=""; read -r d _ < {out}.$k; got="$got $d"; k=$((k + 1))
done 2>/dev/null
rm -f {out}.*"""


def put(machine: Machine, local: Path, remote: str, timeout: float) -> bool:
    """Copy ``local`` into the guest as ``remote`` (mode kept) through the payload disk;
    False when the fast path does not serve it (the caller uses SSH)."""
    size = local.stat().st_size
    if not FAST_FROM <= size <= DATA_DISK_SIZE or not available(machine) or \
            size > _room(machine):
        return False
    mode = stat.S_IMODE(local.stat().st_mode)
    padded = _padded(size)
    with _disk(machine) as disk:
        try:
            with local.open("rb") as source, disk.open("r+b") as target:
                sink = _Hashing(target, piece_size(padded))
                while chunk := source.read(CHUNK):
                    sink.write(chunk)
                sink.pad()
        except OSError as exc:
            if exc.errno in _FULL:
                return False  # the host's disk filled meanwhile: SSH
            raise ChannelError(f"could not copy {local} into the guest as {remote}: "
                               f"{exc.strerror or exc}") from exc
        copy = f'dd if="$D" of="$t" iflag=direct,count_bytes count={padded} bs=4M status=none'
        # The file is written with O_DIRECT where its filesystem allows it (not tmpfs): the
        # virtual disks move the bytes, the guest's CPU copies none of them.
        script = f"""{_needs(machine)}
dest={shlex.quote(remote)}
if [ -d "$dest" ]; then echo "$dest is a directory" >&2; exit 2; fi
case "$dest" in */*) t="${{dest%/*}}";; *) t=.;; esac
t="${{t:-/}}/.sandbox-put-$$"; h="/run/.sandbox-put-$$"
{_hash_pieces('if="$D" iflag=direct', str(padded), sink.piece, '"$h"')}
if ! {copy} oflag=direct 2>/dev/null && ! {copy}; then wait; rm -f "$t" "$h".*; exit 1; fi
wait
{_digests_of('"$h"')}
if [ "$got" != " {' '.join(sink.digests)}" ]; then rm -f "$t"; echo "$got" >&2; exit {MISMATCH}; fi
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
    script = f"""{_needs(machine)}
s={shlex.quote(remote)}
[ -f "$s" ] || exit {FALL_BACK}
sz=$(stat -L -c %s -- "$s")
if [ "$sz" -lt {FAST_FROM} ] || [ "$sz" -gt {limit} ]; then exit {FALL_BACK}; fi
h="/run/.sandbox-get-$$"
{_hash_pieces('if="$s" iflag=fullblock', '$sz', _PIECE_SHELL, '"$h"')}
if ! dd if="$s" of="$D" bs=4M iflag=count_bytes count="$sz" oflag=direct conv=sync,notrunc \\
    status=none; then wait; rm -f "$h".*; exit 1; fi
wait
{_digests_of('"$h"')}
echo "$sz$got"
"""
    if local.is_dir():
        return False  # the SSH path says so
    with _disk(machine) as disk:
        try:
            answer = _run(machine, script, timeout, f"could not copy {remote} from the guest")
        except Unavailable:
            return False
        try:
            size_text, *digests = answer.split()
            size = int(size_text)
        except ValueError:
            raise GuestDataError(f"copying {remote} from the guest: an answer that is not a "
                                 f"size and digests: {guest_text(answer[:200])!r}") from None
        if not 0 <= size <= limit:  # the guest's own word, checked
            raise too_large(remote, max_size, f"it has {size} bytes")
        part = local.parent / f".{local.name[:200]}.{os.urandom(4).hex()}.part"
        try:
            fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
            with os.fdopen(fd, "wb") as target, disk.open("rb") as source:
                check = _Hashing(target, piece_size(size))
                left = size
                while left:
                    if time.monotonic() - started > timeout:
                        raise GuestDataError(f"get of {remote} did not finish within "
                                             f"{timeout:g} s; nothing was written")
                    chunk = source.read(min(CHUNK, left))
                    if not chunk:
                        raise GuestDataError(f"get of {remote}: the payload disk ended early")
                    check.write(chunk)
                    left -= len(chunk)
                check.finish()
            if check.digests != digests:
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
                sink = _Hashing(target, piece_size(total))
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
        script = f"""{_needs(machine)}
dest={shlex.quote(remote_dir)}; h="/run/.sandbox-push-$$"
mkdir -p -- "$dest" || exit 1
{_hash_pieces('if="$D" iflag=direct', str(padded), sink.piece, '"$h"')}
# tar reads the disk itself, in 1 MiB records (a pipe costs much under emulation); the
# disk's page cache is dropped first, so that no earlier transfer's bytes are read.
blockdev --flushbufs "$D"
if ! tar -x -p -b 2048 -f "$D" -C "$dest"; then wait; rm -f "$h".*; exit 1; fi
wait
{_digests_of('"$h"')}
if [ "$got" != " {' '.join(sink.digests)}" ]; then echo "$got" >&2; exit {MISMATCH}; fi
"""
        try:
            _run(machine, script, timeout, f"push of {local_dir} to {remote_dir}")
        except Unavailable:
            return False
    return True
