"""One way to wait: poll until something is true, bounded by a deadline that the error states.

Every wait in the sandbox (QEMU's monitor socket, a migration, a chardev, a guest command,
a unit, the console, a process exit) goes through :func:`wait_until`, so that each timeout
message names what was waited for, the deadline that really applied, and what was seen last.
:class:`GuestWaits` are the machine's public waits, built on it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

from ..errors import CommandTimeout, SandboxError, WaitTimeout, printable

if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import BinaryIO

    from ..guest.commands import CommandResult
    from ..vm.qemu import QemuProcess

T = TypeVar("T")

#: How much of the console already read wait_for_console searches again with new output.
CONSOLE_WINDOW = 1 << 20


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


class GuestWaits:
    """The waits of :class:`sandbox.Machine`: each with ``timeout=``, each failing with a
    WaitTimeout that says what it waited for, for how long, and what it saw last."""

    name: str
    qemu: QemuProcess | None

    if TYPE_CHECKING:  # what the machine provides
        def run(self, cmd: str | Sequence[str], *, timeout: float | None = None,
                env: Mapping[str, str] | None = None, input: bytes | str | None = None,
                stdout: BinaryIO | None = None,
                stderr: BinaryIO | None = None) -> CommandResult: ...

        def console_log(self) -> str: ...

        def console_tail(self, lines: int = 40) -> str: ...

        def console_since(self, offset: int) -> tuple[str, int]: ...

    def _console_hint(self) -> str:
        tail = self.console_tail(15)
        return f"console tail:\n{tail}" if tail else "console: (empty)"

    def wait_until_succeeds(self, cmd: str | Sequence[str], *, timeout: float = 60,
                            interval: float = 0.5) -> str:
        """Repeat ``cmd`` until it exits 0; its stdout. On timeout, the last result is shown."""
        deadline = time.monotonic() + timeout
        last: list[CommandResult] = []

        def succeeded() -> CommandResult | None:
            try:
                result = self.run(cmd, timeout=max(deadline - time.monotonic(), 1.0))
            except CommandTimeout:
                return None
            last[:] = [result]
            return result if result.succeeded else None

        def seen() -> str:
            result = (f"last exit status {last[0].exit_status}, output:\n"
                      f"{trim(last[0].stdout + last[0].stderr, 1000)}" if last else "no result")
            return f"{result}\n{self._console_hint()}"

        from ..guest.commands import command_string

        return wait_until(succeeded, timeout=timeout, interval=interval, seen=seen,
                          what=f"{self.name}: {command_string(cmd)!r} did not succeed").stdout

    def wait_for_port(self, port: int, *, timeout: float = 60) -> None:
        """Wait until something in the guest listens on TCP ``port``."""
        def listening() -> bool:
            return self.run(f"ss -Htln 'sport = :{int(port)}' | grep -q .",
                            timeout=30).succeeded

        def seen() -> str:
            now = trim(self.run("ss -Htln", timeout=10).stdout.strip()) or "(nothing)"
            return f"listening now:\n{now}\n{self._console_hint()}"

        wait_until(listening, timeout=timeout, interval=0.25, seen=seen,
                   what=f"{self.name}: nothing listened on guest TCP port {port}")

    def wait_for_unit(self, unit: str, *, timeout: float = 60) -> None:
        """Wait until a systemd unit is active; fail early when it has failed."""
        state = [""]

        def status() -> str:  # guest text: escaped
            return trim(self.run(["systemctl", "status", "--no-pager", "-n", "20", unit],
                                 timeout=30).stdout)

        def active() -> bool:
            state[0] = self.run(["systemctl", "is-active", unit], timeout=30).stdout.strip()
            if state[0] == "failed":
                raise WaitTimeout(f"{self.name}: unit {unit} failed:\n{status()}")
            return state[0] == "active"

        wait_until(active, timeout=timeout, interval=0.5,
                   what=f"{self.name}: unit {unit} was not active",
                   seen=lambda: f"state {trim(state[0], 100)!r}:\n{status()}")

    def wait_for_console(self, regex: str, *, timeout: float = 60) -> re.Match[str]:
        """Wait until the serial console shows a line matching ``regex``; the match."""
        pattern = re.compile(regex, re.MULTILINE)
        offset, window = 0, ""

        def matched() -> re.Match[str] | None:
            # Only what is new is read each time; it is searched together with the end of
            # what came before (CONSOLE_WINDOW), so a match may span two reads.
            nonlocal offset, window
            text, offset = self.console_since(offset)
            haystack = window + text
            match = pattern.search(haystack)
            window = haystack[-CONSOLE_WINDOW:]
            if match is None and self.qemu is not None:
                self.qemu.check_alive("QEMU exited while waiting for the console")
            return match

        return wait_until(matched, timeout=timeout, interval=0.1, seen=self._console_hint,
                          what=f"{self.name}: the console showed no match for {regex!r}")
