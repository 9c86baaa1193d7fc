"""One way to wait: poll until something is true, bounded by a deadline that the error states.

Every wait in the sandbox (QEMU's monitor socket, a migration, a chardev, a guest command,
a unit, the console, a process exit) goes through :func:`wait_until`, so that each timeout
message names what was waited for, the deadline that really applied, and what was seen last.
The machine's public waits (:mod:`sandbox.machine.waits`) are built on it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from ..errors import SandboxError, WaitTimeout, printable

T = TypeVar("T")


def wait_until(check: Callable[[], T | None], *, timeout: float, what: str,
               interval: float = 0.05, seen: Callable[[], str] | None = None,
               error: type[SandboxError] = WaitTimeout) -> T:
    """Call ``check`` every ``interval`` seconds until it returns something other than None
    (or False) and return that; after ``timeout`` seconds raise ``error`` saying that
    ``what`` did not happen within ``timeout`` s, with ``seen()`` appended. ``check`` may
    raise to stop early (a process that died, a unit that failed)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result is not None and result is not False:
            return result
        if time.monotonic() >= deadline:
            detail = seen() if seen is not None else ""
            raise error(f"{what} within {timeout:g} s" + (f"; {detail}" if detail else ""))
        time.sleep(max(0.0, min(interval, deadline - time.monotonic())))


def trim(data: str, limit: int = 2000) -> str:
    """Guest output for a report: control sequences removed, cut to about ``limit``
    characters (its head and its longer tail)."""
    data = printable(data).rstrip("\n")
    if len(data) <= limit:
        return data
    return data[: limit // 4] + f"\n[... {len(data) - limit} characters cut ...]\n" + \
        data[-(limit * 3 // 4):]


