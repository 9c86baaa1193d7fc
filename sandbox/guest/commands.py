"""Guest commands: the command line and its wrapper, the result, and the output collected
from an SSH session while the command runs (bounded, with a deadline and a watch)."""

from __future__ import annotations

import re
import select
import shlex
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:
    import paramiko

#: After a command's exit status arrives, wait this long for its output to finish; a
#: background process that keeps stdout open would otherwise hold the call forever.
OUTPUT_LINGER = 1.0
#: Output kept in memory per stream (stdout, stderr) of one command; past it, the head and
#: the last TAIL_BYTES are kept with a marker. When the output also goes to a live stream
#: (the CLI), only LIVE_KEEP bytes are kept: the stream has it all.
OUTPUT_LIMIT = 64 << 20
TAIL_BYTES = 1 << 20
LIVE_KEEP = 64 << 10
#: A command silent this long gets checked (the caller's watch, the server's liveness)...
PING_AFTER = 5.0
#: ...every this long while the silence lasts.
WATCH_INTERVAL = 1.0
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class CommandResult:
    """What one guest command did. ``run`` returns it whatever the exit status."""

    command: str
    exit_status: int
    stdout_bytes: bytes
    stderr_bytes: bytes
    duration: float

    @cached_property
    def stdout(self) -> str:
        return self.stdout_bytes.decode("utf-8", errors="replace")

    @cached_property
    def stderr(self) -> str:
        return self.stderr_bytes.decode("utf-8", errors="replace")

    @property
    def succeeded(self) -> bool:
        return self.exit_status == 0

    @property
    def failed(self) -> bool:
        return self.exit_status != 0

    @property
    def rc(self) -> int:
        return self.exit_status


@dataclass(frozen=True)
class TranscriptEntry:
    """One guest command as the failure report shows it."""

    command: str
    exit_status: int | None
    duration: float
    output: str

    def format(self) -> str:
        status = "timeout" if self.exit_status is None else f"exit {self.exit_status}"
        text = f"$ {self.command}    [{status}, {self.duration:.2f} s]"
        return f"{text}\n{self.output}" if self.output else text


def command_string(cmd: str | Sequence[str]) -> str:
    """A shell command line: strings pass through, sequences are quoted word by word.
    ValueError for a NUL byte, which no command line can carry (the shell would silently
    run the part before it)."""
    line = cmd if isinstance(cmd, str) else shlex.join(cmd)
    if "\0" in line:
        raise ValueError(f"the command {line!r} holds a NUL byte (\\0), which no command line "
                         "can carry; pass binary data through input= or a file instead")
    return line


def as_root(command: str, user: str) -> str:
    """``command`` as run by root, for a guest account ``user`` (an imported image's user
    has password-less sudo, which its seed gives it)."""
    return command if user == "root" else f"sudo -n sh -c {shlex.quote(command)}"


def wrap(command: str, env: Mapping[str, str] | None) -> str:
    """What the guest's login shell runs (after its go: sandbox.guest.channel.GO): first report
    the shell's pid (so a timed-out command's process tree can be killed), export ``env``,
    then ``command``.

    One line each: the shell runs the first line before it parses the command, so even a
    command with a syntax error reports its pid and gets its own error message.
    """
    lines = ["echo $$ >&2"]
    for name, value in (env or {}).items():
        if not _ENV_NAME.match(name):
            raise ValueError(f"not an environment variable name: {name!r}")
        if "\0" in str(value):
            raise ValueError(f"the value of environment variable {name} holds a NUL byte")
        lines.append(f"export {name}={shlex.quote(str(value))}")
    return "\n".join([*lines, command])


class _Tee:
    """What is kept of one output stream, bounded: all of it up to ``limit`` bytes; past
    that its head and its last TAIL_BYTES with a marker between. Everything is also passed
    on to an optional live stream (which then has the whole output)."""

    def __init__(self, live: BinaryIO | None, limit: int) -> None:
        self.live = live
        self.limit = limit
        self.head = bytearray()
        self.tail = bytearray()
        self.cut = 0

    def write(self, data: bytes) -> None:
        if self.live is not None:
            self.live.write(data)
            self.live.flush()
        room = self.limit - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data:
            self.tail += data
            excess = len(self.tail) - TAIL_BYTES
            if excess > 0:
                self.cut += excess
                del self.tail[:excess]

    def getvalue(self) -> bytes:
        if not self.cut:
            return bytes(self.head + self.tail)
        marker = f"\n[... {self.cut} bytes of output cut ...]\n".encode()
        return bytes(self.head) + marker + bytes(self.tail)


class Deadline(Exception):
    def __init__(self, pid: int | None, stdout: bytes, stderr: bytes) -> None:
        self.pid, self.stdout, self.stderr = pid, stdout, stderr


def collect(chan: paramiko.Channel, deadline: float | None, out_tee: BinaryIO | None,
             err_tee: BinaryIO | None,
             silent: Callable[[], None] | None = None) -> tuple[bytes, bytes, int | None]:
    """Read stdout and stderr until the command is done; strip the wrapper's pid line.
    ``silent`` is called when nothing arrived for PING_AFTER seconds (then every
    WATCH_INTERVAL) and may raise."""
    out = _Tee(out_tee, LIVE_KEEP if out_tee is not None else OUTPUT_LIMIT)
    err = _Tee(err_tee, LIVE_KEEP if err_tee is not None else OUTPUT_LIMIT)
    pid: int | None = None
    header = b""
    exited_at: float | None = None
    heard = checked = time.monotonic()
    while True:
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            raise Deadline(pid, out.getvalue(), err.getvalue())
        if silent is not None and now - heard >= PING_AFTER and now - checked >= WATCH_INTERVAL:
            try:
                silent()
            except BaseException as exc:
                exc.add_note(f"output so far: {tail_text(out.getvalue() + err.getvalue())}")
                raise
            checked = time.monotonic()
        wait = 0.2 if deadline is None else min(0.2, deadline - now)
        select.select([chan], [], [], wait)
        got = False
        while chan.recv_ready():
            heard = time.monotonic()
            out.write(chan.recv(1 << 20))
            got = True
        while chan.recv_stderr_ready():
            heard = time.monotonic()
            data = chan.recv_stderr(1 << 20)
            got = True
            if pid is None:
                header += data
                if b"\n" in header:
                    line, _, rest = header.partition(b"\n")
                    if line.strip().isdigit():
                        pid = int(line)
                    else:  # not the wrapper's line: keep it, it is the command's
                        pid, rest = -1, header
                    err.write(rest)
            else:
                err.write(data)
        if chan.exit_status_ready():
            if chan.eof_received and not chan.recv_ready() and not chan.recv_stderr_ready():
                break
            if got or exited_at is None:
                exited_at = time.monotonic()
            elif time.monotonic() - exited_at > OUTPUT_LINGER:
                break
        elif chan.closed:
            break
    return out.getvalue(), err.getvalue(), (pid if pid and pid > 0 else None)


def tail_text(data: bytes, limit: int = 500) -> str:
    text = data.decode(errors="replace").strip()
    return repr(text[-limit:]) if text else "(none)"
