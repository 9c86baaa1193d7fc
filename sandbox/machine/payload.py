"""Big payloads without a cipher: ``put``, ``get`` and ``push`` of a MiB or more go through the
machine's payload disk, a sparse raw file of its own the guest sees as a virtio disk
(``/dev/disk/by-id/virtio-sandbox-data``, see :mod:`sandbox.vm.plan`), instead of SFTP or a
tar stream over SSH, whose cipher the guest runs under emulation.

The SSH channel stays the control path: one command per transfer moves the bytes between the
disk and the file, with O_DIRECT on both sides where the guest's filesystem allows it, so
that the virtual disks move them and the guest's CPU copies none (under TCG a buffered write
of 100 MiB costs the guest seconds; a direct one a fifth of a second).

Every transfer is checked by sha256, and the host does the hashing, at its native speed: the
guest's CPU would hash at 30-65 MiB/s under emulation, which bounded every transfer to that.

- ``put``: the guest copies the disk into a temporary file, then reads that file back onto a
  second region of the disk; the host compares the sha256 of what came back with what it
  sent, and only on its word ("ok" on the command's stdin) is the file renamed into place.
- ``get``: the guest reads its file twice onto two regions of the disk, and says whether its
  size and times changed meanwhile; the host writes the file only when both reads have the
  same sha256 (and the guest's own checks passed), once whole.
- ``push``: the host lays the tree's files out on the disk, each at a block boundary, with a
  manifest (names, modes, times, links); a small Python program in the guest (:data:`UNPACK`,
  run by the guest agent's runner, an interpreter started before the golden snapshot, or
  else by a python3 of its own) writes each file from the disk (O_DIRECT) and reads it back
  onto a second region, and the host checks the sha256 of all that came back. A guest
  without Python 3 gets one tar archive instead, whose sha256 the guest itself checks, in
  pieces hashed by its vCPUs in parallel.

The disk is emptied after each transfer (its file truncated), and one transfer at a time
uses it (a lock in the machine's directory, shared with ``sandbox cp`` in other processes).

Where the fast path is not available (a machine started before the payload disk existed, an
image whose login account is not root, a guest without the device) the transfer goes over
SSH as before, and a SandboxWarning says so once per machine.
"""

from __future__ import annotations

import errno
import hashlib
import os
import queue
import shlex
import shutil
import stat
import tarfile
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol, cast

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


def _run(machine: Machine, script: str, timeout: float, what: str,
         input: Iterable[bytes] | None = None, stdout: BinaryIO | None = None) -> str:
    """Run a transfer script; its stdout. Unavailable for NO_DEVICE and FALL_BACK."""
    try:
        result = machine.channel.run(script, timeout=timeout, watch=machine._watch,
                                     input=input, stdout=stdout)
    except ChannelError as exc:
        raise ChannelError(f"{what}: {exc}") from exc
    if result.exit_status == NO_DEVICE:
        _off(machine, f"the guest lacks {DEVICE} or GNU coreutils' dd")
        raise Unavailable
    if result.exit_status == FALL_BACK:
        raise Unavailable
    if result.exit_status == MISMATCH:
        raise ChannelError(f"{what}: the content that arrived has another sha256 than what was "
                           f"sent, or changed while it was copied "
                           f"({guest_text(result.stderr.strip()[-200:])}); nothing was written")
    machine._payload_dd = True  # type: ignore[attr-defined]
    if result.exit_status != 0:
        raise ChannelError(f"{what}: the guest side failed (status {result.exit_status}): "
                           f"{guest_text(result.stderr.strip(), 20)}")
    return result.stdout


#: A tar archive (a push to a guest without Python) is hashed by the guest in pieces of a
#: multiple of PIECE_UNIT: about PIECES_AIM of them (each a process pair in the guest, which
#: costs under emulation; two, as a machine has two vCPUs unless asked for more), hashed by
#: up to LANES_MAX vCPUs at once.
PIECE_UNIT = 4 << 20
PIECES_AIM = 2
LANES_MAX = 4


def piece_size(size: int) -> int:
    """The piece length for ``size`` bytes of content: ceil(size / 8 MiB) * 4 MiB, so a
    payload has at most two pieces."""
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


#: Readback regions start at a multiple of this (dd's blocks, padded by conv=sync).
REGION = 4 << 20


def _region(size: int) -> int:
    """Where the second region starts after ``size`` bytes of the first."""
    return max(REGION, -(-size // REGION) * REGION)


def _digest_of(disk: Path, offset: int, size: int) -> str:
    """The sha256 of ``size`` bytes of the payload disk at ``offset`` (zeros past its end)."""
    digest = hashlib.sha256()
    with disk.open("rb") as source:
        source.seek(offset)
        left = size
        while left:
            chunk = source.read(min(CHUNK, left)) or bytes(min(CHUNK, left))
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


class _Verdict:
    """The host's side of a put's check: the guest's stdout (``ready`` once it has read its
    copy back), and the stdin that answers it ``ok`` or ``no`` when the host has compared
    that copy's sha256 with what it sent."""

    def __init__(self, check: Callable[[], bool]) -> None:
        self.check, self.said = check, bytearray()
        self.matched: bool | None = None
        self.answers: queue.Queue[bytes | None] = queue.Queue()

    def write(self, data: bytes) -> int:
        self.said += data
        if self.matched is None and b"ready\n" in self.said:
            try:
                self.matched = self.check()
            except OSError:
                self.matched = False
            self.answers.put(b"ok\n" if self.matched else b"no\n")
        return len(data)

    def flush(self) -> None:
        pass

    def replies(self) -> Iterator[bytes]:
        """The answer, once there is one; ends (the guest reads end-of-file and gives up) when
        :meth:`done` is called first."""
        answer = self.answers.get()
        if answer is not None:
            yield answer

    def done(self) -> None:
        self.answers.put(None)


def put(machine: Machine, local: Path, remote: str, timeout: float) -> bool:
    """Copy ``local`` into the guest as ``remote`` (mode kept) through the payload disk;
    False when the fast path does not serve it (the caller uses SSH)."""
    size = local.stat().st_size
    padded = _padded(size)
    back = _region(padded)
    if size < FAST_FROM or back + padded > DATA_DISK_SIZE or not available(machine) or \
            back + padded > _room(machine):
        return False
    mode = stat.S_IMODE(local.stat().st_mode)
    with _disk(machine) as disk:
        try:
            with local.open("rb") as source, disk.open("r+b") as target:
                sink = _Hashing(target, padded)
                while chunk := source.read(CHUNK):
                    sink.write(chunk)
                sink.pad()
        except OSError as exc:
            if exc.errno in _FULL:
                return False  # the host's disk filled meanwhile: SSH
            raise ChannelError(f"could not copy {local} into the guest as {remote}: "
                               f"{exc.strerror or exc}") from exc
        if sink.size != padded:
            raise ChannelError(f"could not copy {local} into the guest as {remote}: it changed "
                               "while it was read (its size is not what it was)")
        copy = f'dd if="$D" of="$t" iflag=direct,count_bytes count={padded} bs=4M status=none'
        readback = f'dd if="$t" of="$D" oflag=direct,seek_bytes seek={back} bs=4M status=none'
        # The file is written and read back with O_DIRECT where its filesystem allows it
        # (not tmpfs): the virtual disks move the bytes, the guest's CPU copies none of them.
        script = f"""{_needs(machine)}
dest={shlex.quote(remote)}
if [ -d "$dest" ]; then echo "$dest is a directory" >&2; exit 2; fi
case "$dest" in */*) t="${{dest%/*}}";; *) t=.;; esac
t="${{t:-/}}/.sandbox-put-$$"
if ! {copy} oflag=direct 2>/dev/null && ! {copy}; then rm -f "$t"; exit 1; fi
if ! {readback} iflag=direct 2>/dev/null && ! {readback}; then rm -f "$t"; exit 1; fi
echo ready
IFS= read -r verdict || verdict=
if [ "$verdict" != ok ]; then
  rm -f "$t"; echo "the host's check: ${{verdict:-none}}" >&2; exit {MISMATCH}
fi
truncate -s {size} "$t" && chmod {mode:o} "$t" && mv -f "$t" "$dest"
"""
        verdict = _Verdict(lambda: _digest_of(disk, back, padded) == sink.digests[0])
        try:
            _run(machine, script, timeout, f"could not copy {local} into the guest as {remote}",
                 input=verdict.replies(), stdout=cast(BinaryIO, verdict))
        except Unavailable:
            return False
        finally:
            verdict.done()
    return True


def get(machine: Machine, remote: str, local: Path, max_size: int, timeout: float) -> bool:
    """Copy regular guest file ``remote`` to ``local`` through the payload disk, bounded as
    over SFTP; False when the fast path does not serve it (small, missing, not a regular
    file, past ``max_size``: the SSH path says what is wrong)."""
    if not available(machine):
        return False
    started = time.monotonic()
    # Past what the host has room for (twice: two reads), the SSH path copies it.
    limit = min(max_size, DATA_DISK_SIZE // 2 - REGION, _room(machine) // 2 - REGION)
    copy = 'dd if="$s" of="$D" bs=4M count="$sz" oflag=direct,seek_bytes conv=sync,notrunc ' \
           'status=none'
    script = f"""{_needs(machine)}
s={shlex.quote(remote)}
[ -f "$s" ] || exit {FALL_BACK}
was=$(stat -L -c '%s %Y %Z %i' -- "$s") || exit {FALL_BACK}
sz=${{was%% *}}
if [ "$sz" -lt {FAST_FROM} ] || [ "$sz" -gt {limit} ]; then exit {FALL_BACK}; fi
second=$(( (sz + {REGION - 1}) / {REGION} * {REGION} ))
for at in 0 "$second"; do
  {copy} seek="$at" iflag=direct,count_bytes 2>/dev/null || {copy} seek="$at" \\
    iflag=count_bytes || exit 1
done
[ "$(stat -L -c '%s %Y %Z %i' -- "$s")" = "$was" ] || exit {MISMATCH}
echo "$sz $second"
"""
    if local.is_dir():
        return False  # the SSH path says so
    what = f"could not copy {remote} from the guest"
    with _disk(machine) as disk:
        try:
            answer = _run(machine, script, timeout, what)
        except Unavailable:
            return False
        try:
            size, second = (int(word) for word in answer.split())
        except ValueError:
            raise GuestDataError(f"copying {remote} from the guest: an answer that is not a "
                                 f"size and an offset: {guest_text(answer[:200])!r}") from None
        if not 0 <= size <= limit:  # the guest's own word, checked
            raise too_large(remote, max_size, f"it has {size} bytes")
        if second != _region(size):
            raise GuestDataError(f"copying {remote} from the guest: its second read is at "
                                 f"{second}, not at {_region(size)}")
        part = local.parent / f".{local.name[:200]}.{os.urandom(4).hex()}.part"
        try:
            fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
            with os.fdopen(fd, "wb") as target, disk.open("rb") as source:
                check = _Hashing(target, max(1, size))
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
            if check.digests != [_digest_of(disk, second, size)]:
                raise ChannelError(f"copying {remote} from the guest: two reads of it had "
                                   "different sha256 (it changed while copied?); nothing was "
                                   "written")
            os.replace(part, local)
        finally:
            part.unlink(missing_ok=True)
    return True


#: Exit status of the push script when the guest has no Python 3 (or one too old): the
#: push takes the tar archive's way instead.
NO_HELPER = 96

#: The guest's side of a push: the files from the disk into place, each read back onto the
#: second region. Python 3.3 or newer, standard library only, run with -I -S.
#: argv: disk, manifest offset, manifest length, readback region, destination.
UNPACK = r"""
import errno, mmap, os, sys, time
if not all(hasattr(os, n) for n in ("O_DIRECT", "preadv", "pwrite")):
    sys.exit(96)
B = 4 << 20
disk, moff, mlen, back, dest = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), \
    int(sys.argv[4]), os.fsencode(sys.argv[5])
deadline = time.monotonic() + float(sys.argv[6])


def fill(fd, view, at):
    got = 0
    while got < len(view):
        k = os.preadv(fd, [view[got:]], at + got)
        if k <= 0:
            break
        got += k
    return got


def padded(n):
    return -(-n // 4096) * 4096


def clear(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def create(path):
    clear(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    try:
        return os.open(path, flags | os.O_DIRECT, 0o600), True
    except OSError as exc:  # tmpfs and others: through the page cache
        if exc.errno != errno.EINVAL:
            raise
        clear(path)  # the refusal comes after the file was made
        return os.open(path, flags, 0o600), False


def settle(out, path, size, mode, mtime, direct):
    # A written file's size, mode and time; then it opened again, to be read back.
    os.ftruncate(out, size)
    os.fchmod(out, mode)
    os.utime(out, ns=(mtime, mtime))
    os.close(out)
    return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | (os.O_DIRECT if direct else 0))


def place(fd, files, start, data):
    # Files from one read of the disk (data, from start), each read back where it was.
    for path, size, offset, mode, mtime in files:
        rel = offset - start
        out, direct = create(path)
        end = rel + (padded(size) if direct else size)
        if size and os.pwrite(out, data[rel:end], 0) != end - rel:
            sys.exit("push: a short write to %r" % path)
        source = settle(out, path, size, mode, mtime, direct)
        view = data[rel:rel + padded(size)]
        got = fill(source, view, 0)
        os.close(source)
        view[got:] = bytes(len(view) - got)


def batches(files):
    # Consecutive files that fit one buffer; a larger file is a batch of its own.
    group, start = [], 0
    for item in files:
        if group and padded(item[2] + item[1]) - start > B:
            yield start, group
            group = []
        if not group:
            start = item[2]
        group.append(item)
    if group:
        yield start, group


def work(fd, mine):
    # One buffer: each page a process touches first costs a fault, dear under emulation.
    data = memoryview(mmap.mmap(-1, B))
    for start, group in mine:
        if time.monotonic() > deadline:  # the host has given up: stop, even if orphaned
            sys.exit("push: past its timeout")
        path, size, offset, mode, mtime = group[0]
        if padded(size) > B:  # one big file, a buffer at a time
            out, direct = create(path)
            done = 0
            while done < size:
                n = min(B, padded(size - done))
                if fill(fd, data[:n], offset + done) != n:
                    sys.exit("push: the payload disk ended early")
                os.pwrite(out, data[:n] if direct else data[:min(n, size - done)], done)
                done += n
            source, done = settle(out, path, size, mode, mtime, direct), 0
            while done < size:
                n = min(B, padded(size - done))
                got = fill(source, data[:n], done)
                data[got:n] = bytes(n - got)
                os.pwrite(fd, data[:n], back + offset + done)
                done += n
            os.close(source)
            continue
        length = padded(group[-1][2] + group[-1][1]) - start
        if fill(fd, data[:length], start) != length:
            sys.exit("push: the payload disk ended early")
        place(fd, group, start, data)
        os.pwrite(fd, data[:length], back + start)


def unpack():
    os.makedirs(dest, exist_ok=True)
    said = b""
    while not said.endswith(b"\n"):  # the host's go, once the files are on the disk
        more = os.read(0, 16)
        if not more:
            break
        said += more
    if said != b"go\n":
        sys.exit(95)
    fd = os.open(disk, os.O_RDWR | os.O_DIRECT)
    raw = memoryview(mmap.mmap(-1, padded(mlen)))
    if fill(fd, raw, moff) != len(raw):
        sys.exit("push: the payload disk ended early")
    fields, dirs, files = bytes(raw[:mlen]).split(b"\0"), [], []
    for i in range(0, len(fields) - 1, 7):
        kind, mode, mtime, size, offset, name, link = fields[i:i + 7]
        path = os.path.join(dest, name)
        mode, mtime, size, offset = int(mode, 8), int(mtime), int(size), int(offset)
        if kind == b"d":
            if os.path.islink(path) or os.path.exists(path) and not os.path.isdir(path):
                clear(path)
            if not os.path.isdir(path):
                os.mkdir(path, 0o700)
            dirs.append((path, mode, mtime))
        elif kind == b"l":
            clear(path)
            os.symlink(link, path)
            os.utime(path, ns=(mtime, mtime), follow_symlinks=False)
        else:
            files.append((path, size, offset, mode, mtime))
    # One lane per vCPU (up to four), each a process (threading costs a long import under
    # emulation): each reads its batches, writes their files and reads them back onto the
    # second region.
    lanes = max(1, min(4, os.cpu_count() or 1))
    groups, children = list(batches(files)), []
    for k in range(1, lanes):
        pid = os.fork()
        if not pid:
            try:
                work(fd, groups[k::lanes])
            except OSError as exc:
                sys.stderr.write("push: %s\n" % exc)
                os._exit(1)
            except SystemExit as exc:
                sys.stderr.write("%s\n" % exc.code)
                os._exit(1)
            os._exit(0)
        children.append(pid)
    try:
        work(fd, groups[0::lanes])
    finally:
        failed = [pid for pid in children if os.waitpid(pid, 0)[1]]
    if failed:
        sys.exit(1)
    for path, mode, mtime in reversed(dirs):  # last: a read-only directory is filled first
        os.chmod(path, mode)
        os.utime(path, ns=(mtime, mtime))


try:
    unpack()
except OSError as exc:
    sys.exit("push: %s" % exc)
"""

#: Runs a program sent on stdin as the guest agent's runner does (run_program in
#: sandbox-agent, a file of the guest's that cannot import this one), where the runner is not
#: there: python3 -I -S -c BOOT. A test holds the two to the same protocol.
BOOT = r"""
import os, sys
status = 1
try:
    length = b""
    while not length.endswith(b"\n") and len(length) < 12:
        more = os.read(0, 1)
        if not more:
            os._exit(1)
        length += more
    left, program = int(length), b""
    while left:
        more = os.read(0, min(left, 65536))
        if not more:
            os._exit(1)
        program, left = program + more, left - len(more)
    source, *argv = program.split(b"\0")
    sys.argv = ["-c"] + [os.fsdecode(arg) for arg in argv]
    try:
        exec(compile(source, "<sandbox>", "exec"), {"__name__": "__main__"})
        status = 0
    except SystemExit as exc:
        if isinstance(exc.code, int) or exc.code is None:
            status = exc.code or 0
        else:
            sys.stderr.write("%s\n" % exc.code)
except BaseException:
    import traceback
    traceback.print_exc()
finally:
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        os.write(1, b"\nsandbox-exit %d\n" % status)
    finally:
        os._exit(0)  # the interpreter's own teardown costs a tenth of a second under TCG
"""
#: The guest agent's runner (see sandbox-agent).
RUNNER = "/run/sandbox-runner"


def program(source: str, *argv: object) -> bytes:
    """A program for the runner (or BOOT): its length, then its source and arguments."""
    body = b"\0".join([source.encode(), *(os.fsencode(str(arg)) for arg in argv)])
    return b"%d\n%s" % (len(body), body)


def program_status(output: str, exit_status: int) -> tuple[int, str]:
    """The status and output of a program run by the runner or BOOT (its last line says the
    status); for a script that ended before it, its own exit status (1 when it had none)."""
    head, said, tail = output.rstrip("\n").rpartition("\nsandbox-exit ")
    if said and tail.isdigit():
        return int(tail), head
    return exit_status if exit_status > 0 else 1, output


def _manifest(local_dir: Path) -> list[tuple[str, int, int, int, int, bytes, bytes, Path]] | None:
    """The tree's directories, regular files and links in order, each file at its offset on
    the disk, or None when it holds anything else (a pipe, a device: tar's way)."""
    entries: list[tuple[str, int, int, int, int, bytes, bytes, Path]] = []
    offset = 0

    def walk(directory: Path, prefix: bytes) -> bool:
        nonlocal offset
        for path in sorted(directory.iterdir()):
            info = path.lstat()
            name = prefix + os.fsencode(path.name)
            mode, mtime = stat.S_IMODE(info.st_mode), info.st_mtime_ns
            if stat.S_ISDIR(info.st_mode):
                entries.append(("d", mode, mtime, 0, 0, name, b"", path))
                if not walk(path, name + b"/"):
                    return False
            elif stat.S_ISREG(info.st_mode):
                entries.append(("f", mode, mtime, info.st_size, offset, name, b"", path))
                offset += _padded(info.st_size)
            elif stat.S_ISLNK(info.st_mode):
                entries.append(("l", mode, mtime, 0, 0, name, os.fsencode(os.readlink(path)),
                                path))
            else:
                return False
        return True

    return entries if walk(local_dir, b"") else None


class _Laying:
    """The host's work for a push (``lay``: the files onto the disk, their sha256), in a
    thread of its own while the guest starts; and the push script's stdin: "go" once that
    is done, or "stop" when it failed (``error``)."""

    def __init__(self, lay: Callable[[], str]) -> None:
        self.lay, self.digest = lay, ""
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name="sandbox-push")
        self.thread.start()

    def _run(self) -> None:
        try:
            self.digest = self.lay()
        except BaseException as exc:  # noqa: BLE001 - the caller raises it
            self.error = exc

    def replies(self, first: bytes = b"") -> Iterator[bytes]:
        """``first`` at once, then "go" or "stop" once the host's work is done."""
        if first:
            yield first
        self.thread.join()
        yield b"stop\n" if self.error is not None else b"go\n"


def push(machine: Machine, local_dir: Path, remote_dir: str, timeout: float) -> bool:
    """The contents of ``local_dir`` into ``remote_dir`` (made; modes and times kept, owned
    by the guest's account) through the payload disk; False when the fast path does not
    serve it."""
    entries = _manifest(local_dir)
    if entries is None or getattr(machine, "_payload_tar", False):
        total = sum(p.lstat().st_size for p in local_dir.rglob("*") if p.is_file())
        if not FAST_FROM <= total <= DATA_DISK_SIZE // 2 or not available(machine) or \
                total * 2 > _room(machine):
            return False
        return _push_tar(machine, local_dir, remote_dir, timeout, total)
    data = sum(_padded(entry[3]) for entry in entries)
    manifest = b"".join(b"%s\0%o\0%d\0%d\0%d\0%s\0%s\0" % (kind.encode(), mode, mtime, size,
                                                             offset, name, link)
                        for kind, mode, mtime, size, offset, name, link, _ in entries)
    back = _region(data + len(manifest))
    if data < FAST_FROM or back + data > DATA_DISK_SIZE or not available(machine) or \
            back + data > _room(machine):
        return False
    what = f"push of {local_dir} to {remote_dir}"

    def lay_out(disk: Path) -> str:
        """The files and the manifest onto the disk; the sha256 of the files' region."""
        with disk.open("r+b") as target:
            sink = _Hashing(target, max(1, data))
            for kind, _mode, _mtime, size, _offset, _name, _link, path in entries:
                if kind != "f":
                    continue
                with path.open("rb") as source:
                    left = size
                    while left and (chunk := source.read(min(CHUNK, left))):
                        sink.write(chunk)
                        left -= len(chunk)
                if left:
                    raise ChannelError(f"{what} failed: {path} changed while it was read (it "
                                       "is shorter than it was)")
                sink.write(bytes(_padded(size) - size))
            sink.finish()
            target.write(manifest)
        return sink.digests[0]

    # The guest's side is a program for the agent's runner, an interpreter started long ago
    # (or, without it, a python3 of its own, which starts as the host lays the files out); it
    # begins once told "go". socat waits for it however long it takes after "go" (-t).
    script = f"""{_needs(machine)}
if [ -S {RUNNER} ] && command -v socat >/dev/null 2>&1; then
  exec socat -t 86400 - UNIX-CONNECT:{RUNNER}
fi
command -v python3 >/dev/null 2>&1 || exit {NO_HELPER}
exec python3 -I -S -c {shlex.quote(BOOT)}
"""
    job = program(UNPACK, DEVICE, data, len(manifest), back, remote_dir, timeout)
    with _disk(machine) as disk:
        laying = _Laying(lambda: lay_out(disk))
        try:
            result = machine.channel.run(script, timeout=timeout, watch=machine._watch,
                                         input=laying.replies(job))
        except ChannelError as exc:
            raise ChannelError(f"{what}: {exc}") from exc
        finally:
            laying.thread.join()  # nothing writes to the disk once it is emptied
        if isinstance(laying.error, OSError):
            if laying.error.errno in _FULL:
                return False  # the host's disk filled meanwhile: SSH
            raise ChannelError(f"{what} failed: {laying.error}") from laying.error
        if laying.error is not None:
            raise laying.error
        status, said = program_status(result.stdout, result.exit_status)
        if status == NO_HELPER:
            machine._payload_tar = True  # type: ignore[attr-defined]
        elif status == NO_DEVICE:
            _off(machine, f"the guest lacks {DEVICE} or GNU coreutils' dd")
            return False
        elif status != 0:
            raise ChannelError(f"{what}: the guest side failed (status {status}): "
                               f"{guest_text((said + result.stderr).strip(), 20)}")
        elif data and _digest_of(disk, back, data) != laying.digest:
            raise ChannelError(f"{what}: the files as the guest read them back have another "
                               "sha256 than what was sent")
        else:
            machine._payload_dd = True  # type: ignore[attr-defined]
            return True
    return push(machine, local_dir, remote_dir, timeout)  # tar's way, once per machine


def _push_tar(machine: Machine, local_dir: Path, remote_dir: str, timeout: float,
              total: int) -> bool:
    """:func:`push` as one tar archive, which the guest's tar unpacks and its vCPUs hash."""
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
if ! tar -x -p --no-same-owner -b 2048 -f "$D" -C "$dest"; then wait; rm -f "$h".*; exit 1; fi
wait
{_digests_of('"$h"')}
if [ "$got" != " {' '.join(sink.digests)}" ]; then echo "$got" >&2; exit {MISMATCH}; fi
"""
        try:
            _run(machine, script, timeout, f"push of {local_dir} to {remote_dir}")
        except Unavailable:
            return False
    return True
