"""The owner's side of a switch process (:mod:`sandbox.net.switch`): started, pinged until it
answers, and stopped, here and only here, for private and named networks alike."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from ..base.paths import module_process
from ..base.processes import process_start_ticks
from ..base.waits import wait_until
from . import switch
from .segment import NetworkError

#: How long a switch may take to answer its first ping.
START_TIMEOUT = 30.0


def answers(directory: Path) -> bool:
    """Whether the switch of the network at ``directory`` answers a ping."""
    try:
        switch.request(directory, "ping", timeout=1)
        return True
    except (OSError, ValueError):
        return False


class SwitchProcess:
    """A switch this process started for the network at ``directory`` (named ``name``)."""

    def __init__(self, directory: Path, name: str, process: subprocess.Popen[bytes]) -> None:
        self.directory = directory
        self.name = name
        self.process = process

    @classmethod
    def start(cls, directory: Path, name: str, tag: str, *, owned: bool) -> SwitchProcess:
        """Start the switch and wait until it answers. ``owned``: it ends with this process
        (a private network; its errors are read from its stderr); else it outlives it and
        ends after its last member (a named network)."""
        owner = os.getpid() if owned else 0
        command, env = module_process(switch.__name__, str(directory), str(owner),
                                      str(process_start_ticks(owner) or "-") if owned else "-",
                                      tag)
        started = cls(directory, name, subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE if owned else subprocess.DEVNULL, start_new_session=True,
            cwd="/", env=env))
        try:
            wait_until(started._answering, timeout=START_TIMEOUT, interval=0.02,
                       error=NetworkError, what=f"the switch of network {name} did not start")
        except BaseException:
            started.stop()
            raise
        return started

    def _answering(self) -> bool:
        if self.process.poll() is not None:
            error = (self.process.stderr.read().decode(errors="replace")[-500:]
                     if self.process.stderr else "")
            raise NetworkError(f"the switch of network {self.name} exited (status "
                               f"{self.process.returncode})" + (f": {error}" if error else ""))
        return answers(self.directory)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 3 s; its pipe closed."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stderr:
            self.process.stderr.close()
