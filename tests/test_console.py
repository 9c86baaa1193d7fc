"""Console logs: bounded reads, trimming on disk, control sequences (pure logic on files)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from sandbox.errors import SandboxError
from sandbox.vm import console


def _allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def test_trim_frees_the_oldest_part_and_keeps_offsets(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_bytes(b"".join(f"line {n:07d}\n".encode() for n in range(200_000)))  # 2.6 MB
    size = log.stat().st_size
    assert console.trim(log, keep=256 << 10)
    assert log.stat().st_size == size  # offsets stay valid
    assert _allocated(log) <= (256 << 10) + 8192
    data, end = console.read_since(log, 0, 1 << 30)
    assert end == size
    cut = int(data.split(b" bytes")[0].rsplit(b" ", 1)[1])
    assert data.startswith(b"[sandbox: ") and cut >= size - (256 << 10) - 4096
    assert data.endswith(b"line 0199999\n") and b"\0" not in data
    assert not console.trim(log, keep=256 << 10)  # nothing more to free yet


def test_reads_are_bounded_and_incremental(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_bytes(b"a" * 100_000 + b"\nlast line\n")
    data, end = console.read_since(log, 0, 1000)
    assert data.startswith(f"[sandbox: {100_011 - 1000} bytes of console output cut]".encode())
    assert data.endswith(b"\nlast line\n") and end == 100_011
    with log.open("ab") as more:
        more.write(b"new\n")
    assert console.read_since(log, end) == (b"new\n", end + 4)
    assert console.read_since(tmp_path / "missing", 7) == (b"", 7)


def test_a_log_emptied_under_a_reader_is_read_from_its_start(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_bytes(b"x" * 5000)
    log.write_bytes(b"after\n")
    assert console.read_since(log, 5000) == (b"after\n", 6)


def test_without_hole_punching_the_log_is_emptied_and_says_so(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def unsupported(fd: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "not supported")

    monkeypatch.setattr(console, "_punch", unsupported)
    log = tmp_path / "console.log"
    log.write_bytes(b"y" * (1 << 20))
    assert console.trim(log, keep=64 << 10)
    assert log.read_bytes() == f"[sandbox: {1 << 20} bytes of console output cut]\n".encode()


def test_tail_reads_only_the_end_and_strips_control_sequences(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_bytes(b"z" * (1 << 20) + b"\n\x1b[31mred\x1b[0m\r\n\x1b]0;title\x07plain\n\n")
    assert console.tail(log, 2) == "red\nplain"
    assert console.tail(tmp_path / "missing") == ""


def test_printable_removes_csi_osc_and_c1_controls() -> None:
    text = "a\x1b[2Jb\x1b]8;;http://x\x1b\\link\x1b]8;;\x1b\\c\x9b31md\x07e\tf\r\ng"
    # sequences (the C1 CSI's too) removed whole; a lone BEL is shown escaped
    assert console.printable(text) == "ablinkcd\\x07e\tf\ng"


def test_keep_size_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SANDBOX_CONSOLE_KEEP", raising=False)
    assert console.keep_bytes() == console.DEFAULT_KEEP
    monkeypatch.setenv("SANDBOX_CONSOLE_KEEP", "2M")
    assert console.keep_bytes() == 2 << 20
    monkeypatch.setenv("SANDBOX_CONSOLE_KEEP", "1K")
    assert console.keep_bytes() == 64 << 10  # the floor
    monkeypatch.setenv("SANDBOX_CONSOLE_KEEP", "lots")
    with pytest.raises(SandboxError, match="SANDBOX_CONSOLE_KEEP='lots'"):
        console.keep_bytes()


def test_a_panic_tail_starts_where_the_crash_report_does(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    trace = "".join(f"[ 20.3] frame {n}\n" for n in range(70))
    log.write_text("boot line\n" * 50 + "[ 20.1] sysrq: Trigger a crash\n"
                   "[ 20.2] Kernel panic - not syncing: sysrq triggered crash\n" + trace)
    shown = console.panic_tail(log, 80).splitlines()
    assert shown[0] == "[ 20.1] sysrq: Trigger a crash" and len(shown) == 72
    assert "frame 0" in shown[2] and "frame 69" in shown[-1]
    assert console.panic_tail(log, 10).splitlines()[1].endswith("sysrq triggered crash")
    log.write_text("quiet\n" * 100)
    assert console.panic_tail(log, 3) == "quiet\nquiet\nquiet"
