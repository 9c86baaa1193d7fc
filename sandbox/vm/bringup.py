"""Bringing a booted guest up: for an imported image, cloud-init watched on the console and
waited for; the first SSH connection; then, on a machine resumed from a saved state, the
host's clock, and in an imported image the guest agent, started in memory only.
"""

from __future__ import annotations

import re
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import BootError, ChannelError, ImageError, SandboxError, SandboxWarning, guest_text
from ..guest.agent import Agent
from ..guest.channel import connect
from ..guest.commands import as_root
from ..guest.files import GUEST_AGENT
from ..guest.sockets import tcp
from . import console

if TYPE_CHECKING:
    from ..guest.channel import Channel
    from ..imaging.image import Image
    from .files import MachineFiles
    from .qemu import QemuProcess


#: What a booted guest waits for before its state is saved: systemd's boot jobs, then udev's
#: event queue (a golden snapshot saved while udev workers still ran had every clone finish
#: their work again: about a CPU-second each under TCG), then the exit of udev's idle workers
#: (udevd ends them 3 s after its last event; saved alive, ten of them ended in every clone
#: a second or two after it resumed: measured under TCG, a clone's first 3 s cost 0.25
#: CPU-s instead of 0.12, and 61 MiB of memory (PSS) instead of 52), at most 10 s; then 2 s
#: more (saved at once, every clone's udevd woke about 2 s after it resumed and ran 27-32 ms
#: of guest CPU under TCG, its code translated afresh; saved after the pause, none of it);
#: then the disks.
SETTLE_COMMAND = ("systemctl is-system-running --wait >/dev/null 2>&1; "
                  "udevadm settle --timeout=60 >/dev/null 2>&1; "
                  "for _ in $(seq 100); do "
                  "grep -qsx '(udev-worker)' /proc/[0-9]*/comm || break; sleep 0.1; done; "
                  "sleep 2; sync")

#: cloud-init's first line on the console, and the line naming its default user's keys.
_CLOUD_INIT = re.compile(rb"Cloud-init v\. \S+ running")
_KEYS_FOR = re.compile(rb"Authorized keys from \S+ for user ([a-z_][a-z0-9_-]*)")


class BootWatch:
    """Reads a firmware-booted guest's console while it boots: cloud-init's presence, and
    the name of its default user (the account a recipe without ``user`` logs in as)."""

    def __init__(self, image: Image, console_log: Path) -> None:
        self.image = image
        self.console_log = console_log
        self.offset = 0
        self.seen = b""
        self.user = image.user or None

    def look(self) -> None:
        """Read what the console printed since; ImageError when the guest came up without
        cloud-init (a login prompt and no cloud-init line before it)."""
        chunk, self.offset = console.read_since(self.console_log, self.offset, 1 << 20)
        self.seen = (self.seen + chunk)[-(4 << 20):]
        if self.user is None and (found := _KEYS_FOR.search(self.seen)):
            self.user = found.group(1).decode()
        if b" login: " in self.seen and not _CLOUD_INIT.search(self.seen):
            raise ImageError(f"image {self.image.name} booted to a login prompt without "
                             "cloud-init: the sandbox gives an imported image its key and "
                             "settings through cloud-init's NoCloud seed; install cloud-init "
                             "in the image (apt-get install cloud-init)")

    def wait(self, deadline: float, alive: Callable[[], None]) -> str:
        """Once cloud-init runs (its first console line), the login account: the recipe's,
        or cloud-init's default user once cloud-init reports it."""
        while True:
            alive()
            self.look()
            if self.user is not None and _CLOUD_INIT.search(self.seen):
                return self.user
            if time.monotonic() > deadline:
                if not _CLOUD_INIT.search(self.seen):
                    raise ImageError(f"image {self.image.name}: no cloud-init line on the "
                                     "console within the boot timeout (does the image boot, "
                                     "with cloud-init and console=ttyS0?)")
                raise ImageError(f"image {self.image.name}: cloud-init did not report its "
                                 "default user on the console (the line 'Authorized keys from "
                                 "... for user NAME'); set user = \"NAME\" in its recipe")
            time.sleep(0.25)


def connect_booted(image: Image, process: QemuProcess, files: MachineFiles, ssh_port: int,
                   timeout: float) -> tuple[Channel, str, list[str]]:
    """SSH to a guest that has just booted, within ``timeout`` seconds: the channel, the
    account it is logged in as, and the errors cloud-init reported (an imported image is
    ready once cloud-init has finished; see :func:`settle`)."""
    deadline = time.monotonic() + timeout
    user = image.user or "root"

    def alive() -> None:
        process.check_alive("QEMU exited while the guest was booting")

    try:
        if image.kind == "disk":
            user = BootWatch(image, files.console_log).wait(deadline, alive)
        port = tcp(("127.0.0.1", ssh_port))
        channel = connect(port, image.client_key().load(),
                          image.host_key, timeout=max(0.0, deadline - time.monotonic()),
                          alive=alive, user=user, more=port)
    except ChannelError as exc:
        raise BootError(f"{image.name} did not come up: {exc}",
                        console_tail=files.console_tail()) from exc
    errors: list[str] = []
    if image.kind == "disk":
        errors = settle(channel, image, max(30.0, deadline - time.monotonic()))
    return channel, user, errors


#: ``cloud-init status --long``: its status, and the lines of its error report (cloud-init
#: 23's ``errors:``, or 22's ``detail:``), up to the next field or the shell's ``exit=`` line.
_STATUS = re.compile(r"^status: *(\S+)", re.MULTILINE)
_STATUS_DETAIL = re.compile(r"^(detail|errors):\s*(.*?)(?=^\S+:|^exit=|\Z)",
                            re.MULTILINE | re.DOTALL)


def cloud_init_report(text: str) -> tuple[str, list[str]]:
    """The status in ``cloud-init status --long`` output, and the lines of its error report
    when the status is ``error`` ("done" has a detail too: the datasource it used)."""
    found = _STATUS.search(text)
    status = found.group(1) if found else "unknown"
    if status != "error":
        return status, []
    sections = {match.group(1): match.group(2) for match in _STATUS_DETAIL.finditer(text)}
    report = sections.get("errors", sections.get("detail", ""))
    errors = [line.strip() for line in report.splitlines()
              if line.strip() and line.strip() not in ("[]", "{}", "-")]
    return status, errors or [text[-500:]]


def settle(channel: Channel, image: Image, timeout: float) -> list[str]:
    """Wait for cloud-init to finish (and boot jobs with it); what it reported as errors.

    SSH already lets the user in, so a module that failed (a locale that was never
    generated, a package mirror out of reach) is a SandboxWarning carrying cloud-init's
    detail, not a refusal; a recipe with ``cloud_init_errors = "fail"`` makes it a BootError.
    cloud-init not finishing at all is always a BootError."""
    result = channel.run("cloud-init status --wait --long 2>&1; echo \"exit=$?\"",
                         timeout=timeout)
    text = guest_text(result.stdout).strip()
    status, errors = cloud_init_report(text)
    if status not in ("done", "error"):
        raise BootError(f"cloud-init did not finish in image {image.name} (status: {status}):\n"
                        f"{text[-1500:]}")
    if errors:
        refuse_cloud_init_errors(image, errors)
        warnings.warn(f"cloud-init reported errors in image {image.name}; the machine is used "
                      "anyway, since SSH lets its user in (set cloud_init_errors = \"fail\" in "
                      f"the recipe to refuse it):\n  {_detail(errors)}", SandboxWarning,
                      stacklevel=5)
    channel.run(SETTLE_COMMAND, timeout=timeout)
    return errors


def refuse_cloud_init_errors(image: Image, errors: list[str], golden: str | None = None) -> None:
    """BootError when cloud-init reported ``errors`` (at this boot; or, with ``golden``, when
    that golden snapshot was made) and the image's recipe says ``cloud_init_errors = "fail"``.
    The setting is not part of the image's key: a recipe changed to "fail" refuses clones of
    a snapshot made under "warn" without a boot, and one changed back clones it again."""
    if not errors or image.cloud_init_errors != "fail":
        return
    when = f"; recorded when golden snapshot {golden} was made" if golden else ""
    raise BootError(f"cloud-init reported errors in image {image.name} "
                    f"(cloud_init_errors = \"fail\" in its recipe{when}):\n  {_detail(errors)}")


def _detail(errors: list[str]) -> str:
    return "\n  ".join(errors)[-1500:]


def set_clock(channel: Channel, user: str) -> str | None:
    """Give a restored guest the host's time (it resumes at the time it was saved); why
    that failed, if it did."""
    result = channel.run(as_root(f"date -u -s @{time.time():.3f} >/dev/null", user), timeout=30)
    return (None if result.exit_status == 0 else
            f"date -s failed: {guest_text(result.stderr.strip()[-300:])}")


def start_agent(channel: Channel, user: str, agent_socket: Path) -> bool:
    """Start the sandbox's guest agent in a booted imported image, in memory only (a
    transient unit running a copy in /run, a tmpfs: nothing is written to its disk), so
    that the golden snapshot saved next holds it waiting and every clone gets its own clock
    and randomness from it, as clones of recipe images do. False when it could not start
    (no python3, no sudo without a password): clones then get the clock over SSH."""
    result = channel.run(as_root("tee /run/sandbox-agent >/dev/null && systemd-run --quiet "
                                 "--unit=sandbox-agent python3 /run/sandbox-agent", user),
                         input=GUEST_AGENT.read_bytes(), timeout=60)
    why = guest_text(result.stderr.strip()[-300:]) if result.exit_status != 0 else None
    if why is None:
        try:
            Agent(agent_socket, timeout=30).request("ping")
            return True
        except SandboxError as exc:
            why = str(exc)
    warnings.warn(f"the sandbox's agent could not start in this image ({why}): its clones get "
                  "the host's clock over SSH, and fresh randomness only where the guest kernel "
                  "has the vmgenid driver", SandboxWarning, stacklevel=4)
    return False
