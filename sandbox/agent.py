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
        """One request and its answer, synchronously; SandboxError when it fails."""
        from .errors import SandboxError

        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(self.timeout)
                sock.connect(str(self.path))
                sock.sendall(json.dumps({"op": op, **fields}).encode() + b"\n")
                data = _read_line(sock)
        except OSError as exc:
            raise SandboxError(f"guest agent request {op!r} failed: {exc}") from exc
        answer: dict[str, object] = json.loads(data)
        if not answer.get("ok"):
            raise SandboxError(f"guest agent request {op!r} failed: {answer.get('error')}")
        return answer

    def send_identity(self, **fields: object) -> None:
        """Connect and send the request (with ``fields``); the guest answers once it runs."""
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            sock.connect(str(self.path))
            request = {"op": "identity", "time": time.time(), "seed": os.urandom(64).hex(),
                       **fields}
            sock.sendall(json.dumps(request).encode() + b"\n")
            self._sock = sock
        except OSError as exc:
            self.error = f"could not reach the agent socket: {exc}"

    def finish(self) -> None:
        """Wait for the answer (run in a thread, beside the SSH handshake)."""
        if self._sock is None:
            return
        try:
            data = _read_line(self._sock)
            self.answer = json.loads(data)
            if not self.answer.get("ok"):
                self.error = str(self.answer.get("error"))
        except (OSError, ValueError) as exc:
            self.error = f"no answer from the guest agent within {self.timeout:g} s ({exc})"
        finally:
            self._sock.close()
            self._sock = None


#: The longest answer line taken from the guest (answers are a few hundred bytes).
MAX_LINE = 64 << 10


def _read_line(sock: socket.socket) -> bytes:
    """One answer line from the agent, at most MAX_LINE bytes."""
    data = b""
    while not data.endswith(b"\n"):
        if len(data) > MAX_LINE:
            raise ConnectionError(f"the agent sent over {MAX_LINE} bytes without a line end")
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("the agent closed the connection")
        data += chunk
    return data
