"""Serial console logs: read in bounded pieces, kept to a bounded size on disk.

QEMU appends a machine's serial console to ``console.log`` (a ``file`` chardev opened with
``append=on``). A guest can print without end, so the log is trimmed while the machine
runs: the oldest part is punched out of the file (``fallocate(PUNCH_HOLE)``: disk blocks
freed, byte offsets unchanged, so readers that remember an offset stay right), or, where
the filesystem cannot punch holes, the file is emptied and says so. At most about
:func:`keep_bytes` of console stays on disk.

Who trims: a process that runs machines has one daemon thread tending all of its consoles
(:func:`tend`); a named machine, which outlives the process that started it, gets a small
keeper process of its own (``python -m sandbox.vm.console``) that exits with its QEMU.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from ..errors import printable as printable  # the one filter for guest text (re-exported)

#: Console kept on disk unless SANDBOX_CONSOLE_KEEP says otherwise (bytes, or "8M").
DEFAULT_KEEP = 8 << 20
#: How often the logs are checked.
INTERVAL = 1.0
#: Bytes read for a tail.
TAIL_BYTES = 64 << 10
_BLOCK = 4096

def keep_bytes() -> int:
    """How much console a log keeps (SANDBOX_CONSOLE_KEEP, at least 64 KiB)."""
    from ..base.sizes import parse_size
    from ..errors import SandboxError

    raw = os.environ.get("SANDBOX_CONSOLE_KEEP")
    try:
        return max(parse_size(raw) if raw else DEFAULT_KEEP, 64 << 10)
    except ValueError as exc:
        raise SandboxError(f"SANDBOX_CONSOLE_KEEP={raw!r}: {exc}") from None


# -- reading ----------------------------------------------------------------------------------


def _first_data(fd: int, offset: int, size: int) -> int:
    """The first offset at or after ``offset`` that holds data (skipping a punched hole)."""
    try:
        return os.lseek(fd, offset, os.SEEK_DATA)
    except OSError as exc:
        return size if exc.errno == errno.ENXIO else offset


def read_since(path: Path, offset: int, limit: int | None = None) -> tuple[bytes, int]:
    """The console after byte ``offset`` (at most ``limit`` bytes, its newest; a note where
    output was trimmed or skipped) and the offset after it."""
    limit = keep_bytes() if limit is None else limit
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return b"", offset
    try:
        size = os.fstat(fd).st_size
        if offset > size:  # emptied by a trim since the reader's last look
            offset = 0
        start = max(_first_data(fd, offset, size), size - limit, offset)
        os.lseek(fd, start, os.SEEK_SET)
        raw = _read(fd, size - start)
    finally:
        os.close(fd)
    data = raw.replace(b"\0", b"")  # a hole punched while this read
    if start > offset:
        data = f"[sandbox: {start - offset} bytes of console output cut]\n".encode() + data
    return data, start + len(raw)


def _read(fd: int, count: int) -> bytes:
    chunks, left = [], count
    while left > 0:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a console log, without control sequences or blank lines
    (read from its last TAIL_BYTES)."""
    try:
        size = path.stat().st_size
    except OSError:
        return ""
    data, _ = read_since(path, max(0, size - TAIL_BYTES), TAIL_BYTES)
    text = printable(data.decode(errors="replace"))
    return "\n".join([line for line in text.splitlines() if line.strip()][-lines:])


_PANIC = re.compile(r"Kernel panic|BUG:|Oops:|general protection fault|sysrq: Trigger a crash")


def panic_tail(path: Path, lines: int = 80) -> str:
    """The console from where the kernel's last crash report begins (its first line such as
    ``Kernel panic - not syncing``, which a long stack trace would push out of a plain
    tail), at most ``lines`` lines; a plain tail when there is no such line."""
    text = tail(path, 1000).splitlines()
    starts = [n for n, line in enumerate(text) if _PANIC.search(line)]
    if not starts:
        return "\n".join(text[-lines:])
    begin = min(n for n in starts if n >= starts[-1] - 60)  # the lines of the last report
    return "\n".join(text[begin:begin + lines])


def copy(source: Path, target: Path, limit: int = 1 << 20) -> None:
    """The newest ``limit`` bytes of console ``source`` written to a new ``target``."""
    data, _ = read_since(source, 0, limit)
    target.write_bytes(data)


# -- trimming ---------------------------------------------------------------------------------

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


def _punch(fd: int, length: int) -> None:
    if _libc.fallocate(fd, _FALLOC_FL_KEEP_SIZE | _FALLOC_FL_PUNCH_HOLE, ctypes.c_longlong(0),
                       ctypes.c_longlong(length)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def trim(path: Path, keep: int | None = None) -> bool:
    """Free all but about the newest ``keep`` bytes of console log ``path`` once it holds
    more than that; whether anything was freed. A missing log is left alone."""
    keep = keep_bytes() if keep is None else keep
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        stat = os.fstat(fd)
        if stat.st_blocks * 512 <= keep + keep // 4:  # trim in steps, not on every byte
            return False
        cut = (stat.st_size - keep) // _BLOCK * _BLOCK
        try:
            _punch(fd, cut)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            os.ftruncate(fd, 0)  # QEMU appends (O_APPEND): it goes on at the new end
            os.write(fd, f"[sandbox: {stat.st_size} bytes of console output cut]\n".encode())
        return True
    finally:
        os.close(fd)


class _Tender:
    """One daemon thread trimming the console logs of this process's running machines."""

    def __init__(self) -> None:
        self.logs: dict[Path, int] = {}
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None

    def add(self, path: Path, keep: int) -> None:
        with self.lock:
            self.logs[path] = keep
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._loop, daemon=True,
                                               name="sandbox-console")
                self.thread.start()

    def discard(self, path: Path) -> None:
        with self.lock:
            self.logs.pop(path, None)

    def _loop(self) -> None:
        while True:
            time.sleep(INTERVAL)
            with self.lock:
                logs = list(self.logs.items())
            for path, keep in logs:
                with contextlib.suppress(OSError):  # tried again next round
                    trim(path, keep)


_tender = _Tender()


def _new_tender_in_child() -> None:
    """A forked child has no tending thread; its own machines start a new one."""
    global _tender
    _tender = _Tender()


os.register_at_fork(after_in_child=_new_tender_in_child)


def tend(path: Path) -> None:
    """Keep console log ``path`` bounded while this process runs (until :func:`untend`)."""
    _tender.add(path, keep_bytes())


def untend(path: Path) -> None:
    _tender.discard(path)


# -- the keeper of a named machine's console --------------------------------------------------


def start_keeper(path: Path, pid: int, start_ticks: int | None) -> None:
    """A detached process that keeps ``path`` bounded until QEMU ``pid`` exits (or the log
    is removed with its machine)."""
    from ..base.paths import module_process

    command, env = module_process(__name__, str(path), str(pid),
                                  str(start_ticks if start_ticks is not None else "-"))
    subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True,
                     cwd="/", env=env)


def keeper(path: Path, pid: int, start_ticks: int | None) -> None:
    from ..base.processes import process_alive

    keep = keep_bytes()
    while process_alive(pid, start_ticks) and path.exists():
        with contextlib.suppress(OSError):
            trim(path, keep)
        time.sleep(INTERVAL)


if __name__ == "__main__":  # pragma: no cover - run by start_keeper
    keeper(Path(sys.argv[1]), int(sys.argv[2]),
           None if sys.argv[3] == "-" else int(sys.argv[3]))
