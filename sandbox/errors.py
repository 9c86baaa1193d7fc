"""One exception hierarchy for everything the sandbox can report.

Every error says what went wrong and, where there is one, what to do next.
"""

from __future__ import annotations


class SandboxError(Exception):
    """Base of every error raised by pytest-qemu-sandbox."""


class HostError(SandboxError):
    """The host cannot do what was asked (missing QEMU, unusable KVM, no space...)."""


class ImageError(SandboxError):
    """An image recipe is invalid or an image could not be built or found."""


class RecipeError(ImageError):
    """A recipe file is malformed; the message names the file and the field."""


class BootError(SandboxError):
    """QEMU died or the guest never became reachable."""

    def __init__(self, message: str, *, exit_status: int | None = None,
                 console_tail: str = "", command_line: list[str] | None = None) -> None:
        self.exit_status = exit_status
        self.console_tail = console_tail
        self.command_line = command_line or []
        parts = [message]
        if exit_status is not None:
            parts.append(f"QEMU exit status: {exit_status}")
        if console_tail:
            parts.append("console tail:\n" + console_tail)
        super().__init__("\n".join(parts))


class ChannelError(SandboxError):
    """The SSH channel to the guest failed."""


class GuestPanic(ChannelError):
    """The guest kernel panicked (reported by QEMU's pvpanic device); the console tail shows
    why. The machine is stopped where it panicked and can only be closed."""

    def __init__(self, message: str, *, console_tail: str = "") -> None:
        self.console_tail = console_tail
        super().__init__(f"{message}\nconsole tail:\n{console_tail}" if console_tail
                         else message)


class CommandFailed(SandboxError):
    """A guest command exited with a status other than the one expected."""

    def __init__(self, command: str, status: int, stdout: str, stderr: str,
                 expected: str = "zero") -> None:
        self.command = command
        self.status = status
        self.exit_status = status
        self.stdout = stdout
        self.stderr = stderr
        self.output = stdout + stderr
        super().__init__(
            f"command {command!r} exited with status {status} (expected {expected})\n"
            f"--- stdout ---\n{_tail(stdout)}\n--- stderr ---\n{_tail(stderr)}"
        )


class CommandTimeout(SandboxError):
    """A guest command did not finish in time; its guest processes were killed."""

    def __init__(self, command: str, timeout: float, stdout: str = "", stderr: str = "") -> None:
        self.command = command
        self.timeout = timeout
        self.stdout = stdout
        self.stderr = stderr
        super().__init__(
            f"command {command!r} did not finish within {timeout:g} s and was killed\n"
            f"--- stdout so far ---\n{_tail(stdout)}\n--- stderr so far ---\n{_tail(stderr)}"
        )


class WaitTimeout(SandboxError):
    """A wait_* helper gave up; the message says what it waited for and what it saw."""


class SnapshotError(SandboxError):
    """A snapshot could not be saved, found or restored."""


class TemplateError(SnapshotError):
    """A template cannot be made or cloned: its setup failed, it is stale or damaged, or
    none has the name asked for."""


class SandboxWarning(UserWarning):
    """Something was worked around (a golden snapshot rebuilt, a cold boot instead)."""


def _tail(text: str, lines: int = 30) -> str:
    parts = text.rstrip("\n").splitlines()
    if len(parts) <= lines:
        return "\n".join(parts)
    return f"[... {len(parts) - lines} lines cut ...]\n" + "\n".join(parts[-lines:])


class MachineNameError(SandboxError):
    """A machine name breaks the rule for names (it becomes a directory, a QEMU tag and a
    socket path): up to 63 letters, digits, '.', '_', '-', starting with a letter or digit."""
