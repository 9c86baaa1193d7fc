"""The guest's side of file transfers is untrusted: what ``get`` accepts (a regular file, up to
a size, within a time) and how ``push`` keeps the end of the guest's errors.
"""

from __future__ import annotations

import stat
import time
from typing import BinaryIO

import paramiko

from ..errors import ChannelError, GuestDataError

#: The largest file ``get`` copies unless its caller says otherwise (max_size=).
GET_MAX_SIZE = 4 << 30
#: How much of the guest's stderr a failed ``push`` keeps (its end).
PUSH_ERRORS_KEEP = 64 << 10


def check_regular(remote: str, mode: int | None) -> None:
    """ChannelError for a directory, GuestDataError for anything else but a regular file
    (a device, such as a link to /dev/zero, or a pipe: neither ends)."""
    mode = mode or 0
    if stat.S_ISDIR(mode):
        raise ChannelError(f"{remote} is a directory in the guest; get copies one file (use a "
                           "tar stream: vm.run('tar -C DIR -c .'))")
    if not stat.S_ISREG(mode):
        kind = ("a character device" if stat.S_ISCHR(mode) else "a block device"
                if stat.S_ISBLK(mode) else "a pipe" if stat.S_ISFIFO(mode) else "a socket"
                if stat.S_ISSOCK(mode) else f"not a regular file (mode {mode:o})")
        raise GuestDataError(f"{remote} is {kind} in the guest (or a link to one); get copies "
                             "regular files only. For a device's bytes, read a bounded amount: "
                             f"vm.run('head -c N {remote}')")


def too_large(remote: str, max_size: int, why: str) -> GuestDataError:
    return GuestDataError(f"{remote} in the guest is larger than get's limit, max_size="
                          f"{max_size} bytes ({why}); nothing was written. Pass a larger "
                          "max_size= to get (sandbox cp --max-size) to copy it whole")


def copy_bounded(source: paramiko.SFTPFile, target: BinaryIO, remote: str, max_size: int,
                  deadline: float, timeout: float) -> None:
    """``source`` into ``target`` until its end (not its size when opened: a file in /proc
    says 0, a growing file more later), at most ``max_size`` bytes, by ``deadline``."""
    copied = 0
    while True:
        if time.monotonic() > deadline:
            raise GuestDataError(f"get of {remote} did not finish within {timeout:g} s "
                                 f"({copied} bytes copied; nothing was written). Pass a "
                                 "larger timeout= to get for a slow copy")
        data = source.read(256 << 10)
        if not data:
            return
        copied += len(data)
        if copied > max_size:
            raise too_large(remote, max_size, "it grew past it while being copied")
        target.write(data)


def read_tail(chan: paramiko.Channel, keep: int, deadline: float) -> str:
    """A session's stderr until its end or ``deadline``: its last ``keep`` bytes."""
    kept = bytearray()
    while time.monotonic() < deadline:
        chan.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            data = chan.recv_stderr(1 << 16)
        except TimeoutError:
            break
        if not data:
            break
        kept += data
        del kept[:-keep]
    return kept.decode(errors="replace")
