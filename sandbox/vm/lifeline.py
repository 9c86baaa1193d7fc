"""The lifeline of QEMUs that may outlive their owner only once it says so: the machines of a
pytest run with ``--sandbox-keep-on-failure``, which stay running when their test fails.

Such a QEMU cannot get a parent-death signal (nothing takes one back), so this helper holds
it instead. It reads lines from its owner on stdin::

    hold PID TICKS      kill PID (started at TICKS, see sandbox.base.processes) when the owner dies
    release PID         let it live on (the machine was kept)

and when stdin ends, because the owner exited or was killed (even by SIGKILL), it kills every
QEMU it still holds that is still the process it was. It runs as a script of its own (the
standard library only, ``python -I -S``), in a session of its own, so it starts in a few
milliseconds and a signal to the owner's process group does not take it along.
See :class:`sandbox.vm.qemu.Lifeline` for the owner's side.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys


def start_ticks(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    held: dict[int, str] = {}
    for line in sys.stdin:
        fields = line.split()
        try:
            if fields[0] == "hold" and len(fields) == 3:
                held[int(fields[1])] = fields[2]
            elif fields[0] == "release" and len(fields) == 2:
                held.pop(int(fields[1]), None)
        except (IndexError, ValueError):
            continue
    for pid, ticks in held.items():
        if start_ticks(pid) == ticks:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
