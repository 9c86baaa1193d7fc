"""One exception hierarchy for everything the sandbox can report.

Every error says what went wrong and, where there is one, what to do next.

Guest text (command output, a unit's status, the console, anything a guest sent) goes into
a message only through :func:`guest_text`, which shows terminal control characters escaped
instead of passing them to whoever reads the message; and every message is filtered so
once more when it is shown (``str()``), for guest text that reached one some other way.
"""

from __future__ import annotations

import re

#: Terminal control sequences, in their 7-bit (ESC ...) and 8-bit (C1) forms: CSI, and the
#: strings (OSC, DCS, SOS, PM, APC) only where an end (BEL or ST) follows on their line;
#: then two- and three-character escapes. Removed whole: they are formatting (colours,
#: titles) a report does without.
_SEQUENCE = re.compile(r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]"
                       r"|(?:\x1b[\]PX^_]|[\x90\x98\x9d\x9e\x9f])[^\x07\x1b\x9c\n]*"
                       r"(?:\x07|\x1b\\|\x9c)"
                       r"|\x1b[ -/]*[0-~]")
#: What else could steer a terminal or a reader's eye, escaped (shown as \xNN or \uNNNN):
#: C0 controls but line feed and tab, DEL, C1 controls, lone surrogates and the
#: bidirectional controls (U+202E and the like, which reorder what is shown). A lone
#: carriage return (a progress bar's) is dropped.
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff\u061c\u200e\u200f"
                     "\u202a-\u202e\u2066-\u2069]")


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char == "\r":
        return ""
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str) -> str:
    """Guest-controlled ``text`` made safe for a terminal or a report: terminal control
    sequences removed, every other control character (C0 but line feed and tab, DEL, C1),
    lone surrogate and bidirectional control shown escaped (``\\x1b``, ``\\u202e``); line
    breaks and tabs kept. The one filter for guest text in errors, reports and the CLI;
    what it returns holds none of those characters, so applying it again changes nothing."""
    return _UNSAFE.sub(_escape, _SEQUENCE.sub("", text.replace("\r\n", "\n")))


def guest_text(text: str, lines: int | None = None) -> str:
    """Guest-controlled ``text`` for a message, through :func:`printable`; its last
    ``lines`` lines when given, with a note of how many were cut."""
    return printable(text) if lines is None else _tail(printable(text), lines)


class SandboxError(Exception):
    """Base of every error raised by pytest-qemu-sandbox."""

    def __str__(self) -> str:
        return printable(super().__str__())


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
            parts.append("console tail:\n" + guest_text(console_tail))
        super().__init__("\n".join(parts))


class ChannelError(SandboxError):
    """The SSH channel to the guest failed."""


class GuestPanic(ChannelError):
    """The guest kernel panicked (reported by QEMU's pvpanic device); the console tail shows
    why. The machine is stopped where it panicked and can only be closed."""

    def __init__(self, message: str, *, console_tail: str = "") -> None:
        self.console_tail = console_tail
        super().__init__(f"{message}\nconsole tail:\n{guest_text(console_tail)}" if console_tail
                         else message)


class CommandFailed(SandboxError):
    """A guest command exited with a status other than the one expected. ``stdout`` and
    ``stderr`` are the output as the guest sent it; the message shows it escaped."""

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
            f"--- stdout ---\n{guest_text(stdout, 30)}\n--- stderr ---\n{guest_text(stderr, 30)}"
        )


class CommandTimeout(SandboxError):
    """A guest command did not finish in time; its guest processes were killed. ``stdout``
    and ``stderr`` are the output as the guest sent it; the message shows it escaped."""

    def __init__(self, command: str, timeout: float, stdout: str = "", stderr: str = "") -> None:
        self.command = command
        self.timeout = timeout
        self.stdout = stdout
        self.stderr = stderr
        super().__init__(
            f"command {command!r} did not finish within {timeout:g} s and was killed\n"
            f"--- stdout so far ---\n{guest_text(stdout, 30)}\n"
            f"--- stderr so far ---\n{guest_text(stderr, 30)}"
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

    def __str__(self) -> str:
        return printable(super().__str__())


def _tail(text: str, lines: int = 30) -> str:
    parts = text.rstrip("\n").splitlines()
    if len(parts) <= lines:
        return "\n".join(parts)
    return f"[... {len(parts) - lines} lines cut ...]\n" + "\n".join(parts[-lines:])


class MachineNameError(SandboxError):
    """A machine name breaks the rule for names (it becomes a directory, a QEMU tag and a
    socket path): up to 63 letters, digits, '.', '_', '-', starting with a letter or digit."""


class GuestDataError(SandboxError):
    """The guest sent something the sandbox does not take: more than a size limit, not
    within a deadline, or not in the form expected (an agent answer that is not JSON, a
    file for ``get`` that is too large or not a regular file). The message names the limit
    and how to raise it where there is a way."""


class RegistryError(SandboxError):
    """An OCI registry (``SANDBOX_REGISTRY``) could not be used: the message names the
    registry, what was asked and what to do."""


class RegistryUnavailable(RegistryError):
    """The registry did not answer (refused, timed out, DNS, TLS) within its bound."""


class RegistryAuthError(RegistryError):
    """The registry refused the credentials (or asked for some and none were found)."""


class RegistryNotFound(RegistryError):
    """The registry has no such tag, manifest or blob."""


class DigestMismatch(RegistryError):
    """Bytes from a registry or an export file are not what their digest says (tampered
    or truncated); they were discarded."""
