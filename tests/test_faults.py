"""Faults inside the guest never hang a test and never pass for success (real guests)."""

from __future__ import annotations

import time
from typing import Any

import pytest

import sandbox
from sandbox.errors import ChannelError, GuestPanic

from .conftest import IMAGE


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
