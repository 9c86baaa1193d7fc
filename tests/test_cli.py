"""The sandbox CLI as a user at a terminal or a CI script drives it (real guests)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import ROOT, qemu_processes, sandbox_cli


def test_run_propagates_the_exit_status(built_image: dict[str, Any]) -> None:
    result = sandbox_cli("run", "--", "sh", "-c", "echo to-stdout; echo to-stderr >&2; exit 3")
    assert result.returncode == 3
    assert result.stdout == "to-stdout\n"
    assert result.stderr.endswith("to-stderr\n")


def test_run_with_a_cpu_model_and_a_model_this_qemu_lacks(built_image: dict[str, Any]) -> None:
    result = sandbox_cli("run", "--cpu", "Nehalem", "--", "grep", "-m1", "model name",
                         "/proc/cpuinfo")
    assert result.returncode == 0, result.stderr
    assert "Nehalem" in result.stdout
    result = sandbox_cli("run", "--cpu", "Pentium9000", "--", "true")
    assert result.returncode != 0
    assert "CPU model 'Pentium9000' is unknown to" in result.stderr
    assert "x86-64-v3" in result.stderr and "-cpu help" in result.stderr


def test_run_timeout_kills_the_command_and_says_so(built_image: dict[str, Any]) -> None:
    started = time.monotonic()
    result = sandbox_cli("run", "--timeout", "3", "--", "sleep 60; echo never", timeout=120)
    assert result.returncode == 2, result.stderr
    assert "did not finish within 3 s and was killed" in result.stderr
    assert "never" not in result.stdout and time.monotonic() - started < 60


def test_run_prints_a_linux_banner_and_copies_files(built_image: dict[str, Any],
                                                    tmp_path: Path) -> None:
    result = sandbox_cli("run", "--", "uname", "-a")
    assert result.returncode == 0 and result.stdout.startswith("Linux sandbox ")
    payload = tmp_path / "payload"
    payload.mkdir()
    (payload / "hello.sh").write_text("#!/bin/sh\necho hello from the payload\n")
    (payload / "hello.sh").chmod(0o755)
    result = sandbox_cli("run", "--copy", f"{payload}:/opt/payload", "--",
                         "/opt/payload/hello.sh")
    assert (result.returncode, result.stdout) == (0, "hello from the payload\n")


def test_named_machine_lifecycle_with_snapshots(built_image: dict[str, Any]) -> None:
    name = "cli-a"
    up = sandbox_cli("up", name)
    assert up.returncode == 0, up.stderr
    try:
        again = sandbox_cli("up", name)
        assert again.returncode == 2 and "exists already" in again.stderr
        assert sandbox_cli("exec", name, "--", "sh", "-c",
                           "echo keep-me > /root/file").returncode == 0
        assert sandbox_cli("snapshot", "save", name, "t").returncode == 0
        assert "t" in sandbox_cli("snapshot", "list", name).stdout.split()
        assert sandbox_cli("exec", name, "--", "rm", "/root/file").returncode == 0
        assert sandbox_cli("exec", name, "--", "test", "-e", "/root/file").returncode == 1
        restored = sandbox_cli("snapshot", "restore", name, "t")
        assert restored.returncode == 0, restored.stderr
        shown = sandbox_cli("exec", name, "--", "cat", "/root/file")
        assert (shown.returncode, shown.stdout) == (0, "keep-me\n")
        listed = json.loads(sandbox_cli("ls", "--format", "json").stdout)
        assert [m["status"] for m in listed if m["name"] == name] == ["running"]
        assert "sandbox-guest: ready" in sandbox_cli("logs", name).stdout
        unknown = sandbox_cli("exec", "nope", "--", "true")
        assert unknown.returncode == 2 and "known machines: " in unknown.stderr
        assert name in unknown.stderr.split("known machines: ")[1]
    finally:
        down = sandbox_cli("down", name)
    assert down.returncode == 0, down.stderr
    assert name not in [m["name"] for m in json.loads(sandbox_cli("ls", "--format", "json").stdout)]
    assert qemu_processes(f"sandbox-named-{name},") == []


def test_down_stops_a_machine_whose_monitor_is_held_and_image_is_gone(
        built_image: dict[str, Any]) -> None:
    """QEMU's monitor serves one client: while something holds it (an open `sandbox ssh`,
    a script), exec still works and down still stops the VM, even with its image gone."""
    import socket

    from sandbox.machine.named import find_named

    name = "down-check"
    assert sandbox_cli("up", name).returncode == 0
    named = find_named(name)
    holder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        holder.connect(str(named.path / "qmp.sock"))
        assert b"QMP" in holder.recv(4096)  # the greeting: the monitor is this client's now
        executed = sandbox_cli("exec", name, "--", "echo", "hi", timeout=120)
        assert (executed.returncode, executed.stdout) == (0, "hi\n"), executed.stderr
        state = json.loads((named.path / "state.json").read_text())
        state["image_path"] = "/nonexistent/removed-image"
        (named.path / "state.json").write_text(json.dumps(state))
        started = time.monotonic()
        down = sandbox_cli("down", name, timeout=120)
        assert down.returncode == 0, down.stderr
        assert time.monotonic() - started < 60
        assert qemu_processes(f"sandbox-named-{name},") == []
        assert not named.path.exists()
    finally:
        holder.close()
        sandbox_cli("down", name)


def test_dead_machine_shows_as_dead_and_prune_clears_it(built_image: dict[str, Any]) -> None:
    assert sandbox_cli("up", "cli-dead").returncode == 0
    listed = json.loads(sandbox_cli("list", "--format", "json").stdout)
    pid = next(m["pid"] for m in listed if m["name"] == "cli-dead")
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    listed = json.loads(sandbox_cli("list", "--format", "json").stdout)
    assert [m["status"] for m in listed if m["name"] == "cli-dead"] == ["dead"]
    result = sandbox_cli("exec", "cli-dead", "--", "true")
    assert result.returncode == 2 and "is dead" in result.stderr
    pruned = sandbox_cli("prune")
    assert "removed dead machine cli-dead" in pruned.stdout
    listed = json.loads(sandbox_cli("list", "--format", "json").stdout)
    assert "cli-dead" not in [m["name"] for m in listed]


def test_shell_without_a_terminal_is_refused() -> None:
    result = sandbox_cli("shell", input="")
    assert result.returncode == 2
    assert "needs a terminal" in result.stderr


def read_until(fd: int, needle: bytes, timeout: float) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while needle not in seen:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"did not see {needle!r}; got {seen[-500:]!r}")
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    return seen


@contextlib.contextmanager
def cli_in_terminal(*args: str, rows: int = 24,
                    columns: int = 80) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """``sandbox ARGS`` on a pseudo-terminal of its own (its controlling terminal, of the
    size given): the process and the terminal's other end; both gone afterwards."""
    main_fd, child_fd = os.openpty()
    fcntl.ioctl(child_fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    process = subprocess.Popen([sys.executable, "-m", "sandbox.cli", *args], stdin=child_fd,
                               stdout=child_fd, stderr=child_fd, cwd=ROOT,
                               start_new_session=True,
                               preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
    os.close(child_fd)
    try:
        yield process, main_fd
    finally:
        if process.poll() is None:
            process.kill()
        os.close(main_fd)


def test_interactive_shell_through_a_pseudo_terminal(built_image: dict[str, Any]) -> None:
    with cli_in_terminal("shell", rows=33, columns=101) as (process, main_fd):
        read_until(main_fd, b"root@sandbox", 120)
        os.write(main_fd, b"echo $((6 * 7)); stty size\n")
        output = read_until(main_fd, b"33 101", 30)
        assert b"42" in output
        os.write(main_fd, b"sleep 300\n")
        time.sleep(1)
        os.write(main_fd, b"\x03")  # Ctrl-C reaches the guest's foreground job
        os.write(main_fd, b"echo after-interrupt\n")
        read_until(main_fd, b"after-interrupt\r\n", 30)
        os.write(main_fd, b"exit\n")
        assert process.wait(timeout=60) == 0


@pytest.mark.parametrize("args", [["cp", "a", "b"], ["cp", "x:/a", "y:/b"]])
def test_cp_needs_exactly_one_guest_side(args: list[str]) -> None:
    result = sandbox_cli(*args)
    assert result.returncode == 2 and "exactly one side" in result.stderr


def test_ssh_logs_in_as_the_named_machines_user(tmp_path: Path) -> None:
    """`sandbox ssh NAME` runs the host's ssh client (here a stand-in that records its
    arguments) as the account the machine logs in as, recorded in its state: an imported
    image's user, not root."""
    from sandbox.base.processes import process_start_ticks

    runtime, image, bin_dir = tmp_path / "runtime", tmp_path / "image", tmp_path / "bin"
    image.mkdir()
    (image / "manifest.json").write_text(json.dumps(
        {"name": "imported", "kind": "disk", "user": "", "host_key": "ssh-ed25519 AAAAkey"}))
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$SSH_ARGV"\nexit 7\n')
    (bin_dir / "ssh").chmod(0o755)
    qemu = subprocess.Popen(["sleep", "60"])  # stands in for the machine's live QEMU
    try:
        env = dict(os.environ, SANDBOX_RUNTIME_DIR=str(runtime), SSH_ARGV=str(tmp_path / "argv"),
                   PATH=f"{bin_dir}:{os.environ['PATH']}")
        assert sandbox_cli("list", env=env).returncode == 0  # makes the runtime directory
        home = runtime / "machines" / "imp"
        home.mkdir()
        (home / "state.json").write_text(json.dumps({
            "name": "imp", "image": "imported", "image_path": str(image), "pid": qemu.pid,
            "start_ticks": process_start_ticks(qemu.pid), "ssh_port": 2222, "user": "alice",
            "spec": {}}))
        main_fd, child_fd = os.openpty()
        try:
            process = subprocess.run([sys.executable, "-m", "sandbox.cli", "ssh", "imp"],
                                     stdin=child_fd, stdout=child_fd, stderr=subprocess.PIPE,
                                     env=env, cwd=ROOT, timeout=60, check=False)
        finally:
            os.close(child_fd)
            os.close(main_fd)
        assert process.returncode == 7, process.stderr
        argv = (tmp_path / "argv").read_text().splitlines()
        assert argv[-3:] == ["-l", "alice", "127.0.0.1"] and "-p" in argv and "2222" in argv
        assert not any(arg == "root" or arg.startswith("root@") for arg in argv), argv
        assert (home / "known_hosts").read_text() == "[127.0.0.1]:2222 ssh-ed25519 AAAAkey\n"
    finally:
        qemu.kill()
        qemu.wait()


def test_cp_from_a_guest_is_bounded_and_writes_whole_files_only(
        built_image: dict[str, Any], tmp_path: Path) -> None:
    name = "cli-guestdata"
    up = sandbox_cli("up", name)
    assert up.returncode == 0, up.stderr
    try:
        assert sandbox_cli("exec", name, "--", "head -c 2M /dev/zero > /root/two-mib && "
                           "ln -s /dev/zero /root/zero").returncode == 0
        refused = sandbox_cli("cp", "--max-size", "1M", f"{name}:/root/two-mib", str(tmp_path))
        assert refused.returncode == 2
        assert "larger than get's limit, max_size=1048576 bytes" in refused.stderr
        assert "sandbox cp --max-size" in refused.stderr
        zero = sandbox_cli("cp", f"{name}:/root/zero", str(tmp_path / "zero"))
        assert zero.returncode == 2 and "is a character device in the guest" in zero.stderr
        assert list(tmp_path.iterdir()) == []
        copied = sandbox_cli("cp", f"{name}:/root/two-mib", str(tmp_path))  # into the directory
        assert copied.returncode == 0, copied.stderr
        assert (tmp_path / "two-mib").read_bytes() == bytes(2 << 20)
    finally:
        down = sandbox_cli("down", name)
    assert down.returncode == 0, down.stderr
