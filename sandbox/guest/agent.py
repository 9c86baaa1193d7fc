"""Host side of the guest agent (``sandbox/guest/sandbox-agent``) on its virtio-serial port.

Used right after a clone resumes: the guest sets its clock to the host's and reseeds its
kernel RNG with bytes from the host, so clones of one snapshot never share random output.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path


class Agent:
    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self.path = path
        self.timeout = timeout
        self.error: str | None = None
        self.answer: dict[str, object] | None = None
        self._sock: socket.socket | None = None

    def request(self, op: str, **fields: object) -> dict[str, object]:
        """One request and its answer, synchronously, within ``timeout`` seconds in all;
        SandboxError when it fails (GuestDataError when the answer is late, too long or
        not a JSON object)."""
        from ..errors import SandboxError, guest_text

        deadline = time.monotonic() + self.timeout
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(self.timeout)
                sock.connect(str(self.path))
                sock.sendall(json.dumps({"op": op, **fields}).encode() + b"\n")
                answer = decode(_read_line(sock, deadline, self.timeout))
        except OSError as exc:
            raise SandboxError(f"guest agent request {op!r} failed: {exc}") from exc
        if answer.get("ok") is not True:
            raise SandboxError(f"guest agent request {op!r} failed: "
                               f"{guest_text(str(answer.get('error')))[:500]}")
        return answer

    def send_identity(self, *, clock: bool = True, **fields: object) -> None:
        """Connect and send the request (with ``fields``; the host's time too unless
        ``clock`` is False); the guest answers once it runs."""
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            sock.connect(str(self.path))
            request = {"op": "identity", "seed": os.urandom(64).hex(), **fields}
            if clock:
                request["time"] = time.time()
            sock.sendall(json.dumps(request).encode() + b"\n")
            self._sock = sock
        except OSError as exc:
            self.error = f"could not reach the agent socket: {exc}"

    def finish(self) -> None:
        """Wait for the answer (run in a thread, beside the SSH handshake): at most
        ``timeout`` seconds from now, however the guest sends it."""
        from ..errors import GuestDataError, guest_text

        if self._sock is None:
            return
        try:
            answer = decode(_read_line(self._sock, time.monotonic() + self.timeout,
                                       self.timeout))
            if answer.get("ok") is not True:
                self.error = guest_text(str(answer.get("error")))[:500]
            self.answer = answer
        except GuestDataError as exc:
            self.error = str(exc)
        except OSError as exc:
            self.error = f"no answer from the guest agent within {self.timeout:g} s ({exc})"
        finally:
            self._sock.close()
            self._sock = None


#: The longest answer line taken from the guest (answers are a few hundred bytes).
MAX_LINE = 64 << 10


def _read_line(sock: socket.socket, deadline: float, timeout: float) -> bytes:
    """One answer line from the agent: at most MAX_LINE bytes, all of it by ``deadline``
    (a peer sending a byte at a time gets no more time than one that sends nothing);
    GuestDataError past either, OSError when the connection fails."""
    from ..errors import GuestDataError

    data = bytearray()
    while True:
        end = data.find(b"\n")
        if end >= 0:
            return bytes(data[:end + 1])
        if len(data) > MAX_LINE:
            raise GuestDataError(f"the guest agent sent over {MAX_LINE} bytes without a line "
                                 "end (an answer is a few hundred)")
        left = deadline - time.monotonic()
        if left <= 0:
            raise GuestDataError(f"the guest agent's answer was not complete within "
                                 f"{timeout:g} s ({len(data)} bytes so far)")
        sock.settimeout(left)
        try:
            chunk = sock.recv(4096)
        except TimeoutError:
            continue  # the deadline says so above
        if not chunk:
            raise ConnectionError("the agent closed the connection")
        data += chunk


def decode(line: bytes) -> dict[str, object]:
    """An agent answer: one JSON object. GuestDataError for anything else (not UTF-8, not
    JSON, nested too deep to read, not an object)."""
    from ..errors import GuestDataError

    try:
        answer = json.loads(line.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise GuestDataError(f"the guest agent's answer is not JSON "
                             f"({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(answer, dict):
        raise GuestDataError(f"the guest agent's answer is not a JSON object but a "
                             f"{type(answer).__name__}")
    return answer
