"""Faults inside the guest never hang a test and never pass for success (real guests)."""

from __future__ import annotations

import os
import random
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import sandbox
from sandbox.errors import ChannelError, CommandTimeout, GuestPanic
from sandbox.golden import find_golden
from sandbox.host import resolve_accel
from sandbox.image import get_image

from .conftest import IMAGE, golden_file_digests


def test_a_guest_panic_is_raised_within_seconds_with_the_console(
        built_image: dict[str, Any]) -> None:
    with sandbox.launch(IMAGE) as vm:
        started = time.monotonic()
        with pytest.raises(GuestPanic) as info:
            vm.run("echo c > /proc/sysrq-trigger", timeout=120)
        assert time.monotonic() - started < 30
        assert "Kernel panic" in info.value.console_tail, info.value.console_tail
        with pytest.raises(GuestPanic):  # and so is every later call
            vm.run("true", timeout=30)
        assert vm.qmp("query-status")["status"] == "guest-panicked"


def test_a_dead_ssh_server_raises_and_the_next_call_reconnects(
        built_image: dict[str, Any]) -> None:
    """Killing every SSH server process in a clone: the command's session goes silent (its
    virtio-serial port never shows end-of-file); the unanswered keepalive ends the wait,
    and the next command reaches the restarted server over TCP."""
    with sandbox.launch(IMAGE) as vm:
        started = time.monotonic()
        with pytest.raises(ChannelError, match="stopped answering|connection to the guest"):
            vm.run("pkill -9 dropbear; sleep 100", timeout=90)
        assert time.monotonic() - started < 45
        assert vm.succeed("echo alive", timeout=60) == "alive\n"


def test_huge_output_is_kept_bounded_with_a_marker(
        built_image: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    import sandbox.commands as commands

    # The real bounds are 64 MiB and 1 MiB: the same code, with figures a test can afford.
    monkeypatch.setattr(commands, "OUTPUT_LIMIT", 1 << 20)
    monkeypatch.setattr(commands, "TAIL_BYTES", 64 << 10)
    with sandbox.launch(IMAGE) as vm:
        result = vm.run("head -c 3000000 /dev/zero | tr '\\0' a; echo; echo END")
    data = result.stdout_bytes
    assert result.exit_status == 0
    assert data.startswith(b"a" * (1 << 20))
    assert data.endswith(b"a\nEND\n")
    assert f"[... {3000000 + 5 - (1 << 20) - (64 << 10)} bytes of output cut ...]".encode() \
        in data
    assert len(data) < (1 << 20) + (64 << 10) + 100


def test_file_transfers_give_up_on_a_paused_guest(
        built_image: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import sandbox.channel as channel

    monkeypatch.setattr(channel, "SFTP_IDLE_TIMEOUT", 3.0)  # 60 s in use: the same code
    payload = tmp_path / "payload"
    payload.write_bytes(os.urandom(4 << 20))
    with sandbox.launch(IMAGE) as vm:
        vm.put(payload, "/root/warm")  # the SFTP session is open before the guest stops
        vm.qmp("stop")
        started = time.monotonic()
        with pytest.raises(ChannelError, match="could not copy"):
            vm.put(payload, "/root/payload")
        assert time.monotonic() - started < 30
        vm.qmp("cont")


def test_a_golden_snapshot_rebuilt_meanwhile_is_not_discarded(
        built_image: dict[str, Any]) -> None:
    """A clone that failed on an old copy must not remove the copy another process has
    rebuilt since: discarding checks, under the lock, that the entry is unchanged."""
    from sandbox.golden import Golden, discard_golden

    sandbox.launch(IMAGE).close()
    current = find_golden(get_image(IMAGE), sandbox.MachineSpec(image=IMAGE),
                          resolve_accel("auto"))
    assert current is not None
    stale = Golden(current.path, dict(current.manifest, created_at="2000-01-01T00:00:00+0000"))
    discard_golden(stale)
    assert (current.path / "manifest.json").exists()
    current.check()


# -- soak: clones with a random fault each, then nothing left ---------------------------------

#: Clones in the soak: SANDBOX_SOAK (the note's figure was taken with 100 under -n 2); CI
#: runs the default, 12, so that the suite stays short.
SOAK = int(os.environ.get("SANDBOX_SOAK", "12"))
FAULTS = ("qemu-killed", "ssh-killed", "panic", "timeout", "disk-full", "none")
_soak_log: list[tuple[str, str]] = []


@pytest.fixture(scope="module")
def golden_digests_kept(built_image: dict[str, Any]) -> Iterator[None]:
    """The golden files' sha256 before the soak; compared when this worker's soak ends."""
    sandbox.launch(IMAGE).close()
    golden = find_golden(get_image(IMAGE), sandbox.MachineSpec(image=IMAGE),
                         resolve_accel("auto"))
    assert golden is not None
    before = golden_file_digests(golden.path)
    yield
    after = golden_file_digests(golden.path)
    errors = Counter(kind for _, kind in _soak_log)
    summary = (f"soak ({os.environ.get('PYTEST_XDIST_WORKER', 'main')}): {len(_soak_log)} "
               f"clones, faults {dict(Counter(f for f, _ in _soak_log))}, raised "
               f"{dict(errors)}, golden unchanged: {after == before}")
    print(f"\n{summary}")
    if os.environ.get("SANDBOX_SOAK_LOG"):  # xdist workers' prints are not shown
        with open(os.environ["SANDBOX_SOAK_LOG"], "a") as log:
            log.write(summary + "\n")
    assert after == before


def _inject(vm: sandbox.Machine, fault: str) -> str:
    """Inject ``fault``; the type of what was raised ("-" when nothing had to be)."""
    if fault == "none":
        assert vm.succeed("echo ok") == "ok\n"
        return "-"
    if fault == "timeout":
        with pytest.raises(CommandTimeout):
            vm.run("sleep 100", timeout=2)
        assert vm.succeed("echo after") == "after\n"
        return "CommandTimeout"
    if fault == "disk-full":
        vm.succeed("mkdir -p /mnt/small && mount -t tmpfs -o size=4m tmpfs /mnt/small")
        assert "No space left" in vm.fail("dd if=/dev/zero of=/mnt/small/fill bs=1M count=8")
        assert vm.succeed("echo after") == "after\n"
        return "-"
    if fault == "ssh-killed":
        with pytest.raises(ChannelError) as info:
            vm.run("pkill -9 dropbear; sleep 100", timeout=60)
        assert vm.succeed("echo after", timeout=60) == "after\n"
        return type(info.value).__name__
    if fault == "panic":
        with pytest.raises(GuestPanic):
            vm.run("echo c > /proc/sysrq-trigger", timeout=60)
        return "GuestPanic"
    assert fault == "qemu-killed" and vm.pid is not None
    threading.Timer(0.5, os.kill, (vm.pid, signal.SIGKILL)).start()
    with pytest.raises(ChannelError) as lost:
        vm.run("sleep 100", timeout=60)
    return type(lost.value).__name__


@pytest.mark.parametrize("index", range(SOAK))
def test_soak_clone_with_a_random_fault_leaves_nothing(
        golden_digests_kept: None, index: int) -> None:
    fault = FAULTS[index % len(FAULTS)] if index < len(FAULTS) else \
        random.Random(index).choice(FAULTS)
    started = time.monotonic()
    with sandbox.launch(IMAGE) as vm:
        pid, files, port = vm.pid, vm.files, vm.ssh_port
        raised = _inject(vm, fault)
    _soak_log.append((fault, raised))
    assert time.monotonic() - started < 120
    assert pid is not None and files is not None
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)  # a SIGKILLed QEMU may take a moment to be reaped
    assert not Path(f"/proc/{pid}").exists(), "QEMU left running"
    assert not files.dir.exists(), "machine directory left"
    with socket.socket() as probe:  # the forwarded SSH port is closed with QEMU
        assert probe.connect_ex(("127.0.0.1", port)) != 0, "forwarded port left open"
