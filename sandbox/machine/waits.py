"""What a machine shows and the waits on it: its serial console (log, tail, what is new since
an offset), and the public waits (port, command, unit, console), each a :func:`wait_until`
that names what it waited for and what it saw last.

:class:`GuestWaits` is a mixin of :class:`sandbox.Machine`; what it needs from the machine is
declared in its body (the machine provides it).
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..base.waits import trim, wait_until
from ..errors import CommandTimeout, WaitTimeout
from ..guest.commands import command_string

if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import BinaryIO

    from ..guest.commands import CommandResult
    from ..vm.files import MachineFiles
    from ..vm.qemu import QemuProcess

#: How much of the console already read wait_for_console searches again with new output.
CONSOLE_WINDOW = 1 << 20


class GuestWaits:
    """The console and the waits of :class:`sandbox.Machine`: each wait with ``timeout=``,
    each failing with a WaitTimeout that says what it waited for, for how long, and what it
    saw last."""

    name: str
    qemu: QemuProcess | None
    files: MachineFiles | None

    if TYPE_CHECKING:  # what the machine provides
        def run(self, cmd: str | Sequence[str], *, timeout: float | None = None,
                env: Mapping[str, str] | None = None, input: bytes | str | None = None,
                stdout: BinaryIO | None = None,
                stderr: BinaryIO | None = None) -> CommandResult: ...

    def console_log(self) -> str:
        """The serial console output so far."""
        return self.files.console_since(0)[0] if self.files else ""

    def console_since(self, offset: int) -> tuple[str, int]:
        """The console output after byte ``offset``, and the offset after it."""
        return self.files.console_since(offset) if self.files else ("", offset)

    def console_tail(self, lines: int = 40) -> str:
        """The last ``lines`` console lines, without colour codes or blank lines."""
        return self.files.console_tail(lines) if self.files else ""

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
