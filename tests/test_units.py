"""Pure logic: sizes, machine specs, the QEMU command line, the command wrapper, run ids."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import socket
import subprocess
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest

from sandbox.base.processes import kill_tagged, process_alive, process_start_ticks
from sandbox.base.sizes import format_size, parse_size
from sandbox.errors import SandboxError, SandboxWarning, SnapshotError
from sandbox.guest.commands import CommandResult, command_string, wrap
from sandbox.vm.files import MachineFiles
from sandbox.vm.plan import QemuPlan, lan_pci_address
from sandbox.vm.qemu import QemuProcess
from sandbox.vm.runs import orphaned_runs
from sandbox.vm.spec import MachineSpec


@pytest.mark.parametrize(("text", "expected"), [
    ("512M", 512 << 20), ("2G", 2 << 30), ("1.5GiB", 3 << 29), ("1024", 1024 << 20),
    (256, 256 << 20), ("4k", 4096),
])
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text, default_unit="M") == expected


def test_parse_size_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_size("two gigs")


def test_format_size() -> None:
    assert format_size(3 << 29) == "1.5G"
    assert format_size(512 << 20) == "512M"


def test_spec_rejects_unknown_option_by_name() -> None:
    with pytest.raises(SandboxError, match="unknown machine option.*'memroy'"):
        MachineSpec.from_kwargs(memroy="1G")


@pytest.mark.parametrize("kwargs", [{"network": "bridge"}, {"accel": "hvf"}, {"cpus": 0},
                                    {"memory": "16M"}, {"memory": "lots"}])
def test_spec_rejects_bad_values(kwargs: dict[str, object]) -> None:
    with pytest.raises(SandboxError):
        MachineSpec.from_kwargs(**kwargs)


def test_a_machine_is_on_at_most_eight_networks_each_at_its_own_pci_slot() -> None:
    eight = tuple(f"/run/net{i}" for i in range(8))
    assert MachineSpec(networks=eight).networks == eight
    with pytest.raises(SandboxError, match="at most 8 networks .* not 9"):
        MachineSpec(networks=(*eight, "/run/net8"))
    command = plan(lans=(None, None)).command()
    devices = [a for a in command if a.startswith("virtio-net-pci,netdev=lan")]
    assert devices == ["virtio-net-pci,netdev=lan0,id=lan0,bus=pcie.0,addr=0x10,guest_announce=off",
                       "virtio-net-pci,netdev=lan1,id=lan1,bus=pcie.0,addr=0x11,guest_announce=off"]
    assert [lan_pci_address(i) for i in (0, 7)] == ["0000:00:10.0", "0000:00:17.0"]


def plan(**kwargs: object) -> QemuPlan:
    base: dict[str, object] = dict(
        binary="qemu-system-x86_64", tag="sandbox-abc-vm1", accel="tcg", kvm_cpu="",
        memory_mib=1024, cpus=2, kernel=Path("/i/vmlinuz"), initrd=Path("/i/initrd.img"),
        cmdline="root=/dev/vda", disk=Path("/r/overlay.qcow2"), files=MachineFiles(Path("/r")),
        network="restricted")
    base.update(kwargs)
    return QemuPlan(**base)  # type: ignore[arg-type]


def test_command_line_restricted_network_and_free_port() -> None:
    command = plan().command()
    netdev = command[command.index("-netdev") + 1]
    assert "restrict=on" in netdev
    assert "hostfwd=tcp:127.0.0.1:0-:22" in netdev
    assert command[command.index("-name") + 1].startswith("sandbox-abc-vm1")
    assert command[command.index("-accel") + 1].startswith("tcg")
    assert "-nodefaults" in command and "-display" in command


def test_command_line_user_network_and_kvm() -> None:
    command = plan(network="user", accel="kvm", kvm_cpu="host").command()
    assert "restrict=on" not in command[command.index("-netdev") + 1]
    assert command[command.index("-accel") + 1] == "kvm"
    assert command[command.index("-cpu") + 1] == "host"


def test_command_line_places_machine_files_in_its_directory() -> None:
    command = " ".join(plan().command())
    for name in ("qmp.sock", "agent.sock", "ssh.sock", "console.log", "qemu.pid"):
        assert f"/r/{name}" in command


def test_shape_ignores_per_machine_paths_and_tag() -> None:
    one = plan(tag="sandbox-a-vm1", files=MachineFiles(Path("/a")), disk=Path("/a/o.qcow2"))
    two = plan(tag="sandbox-b-vm7", files=MachineFiles(Path("/b")), disk=Path("/b/o.qcow2"))
    assert one.shape() == two.shape()
    assert plan(memory_mib=2048).shape() != one.shape()


def test_tcg_threads_follow_the_cores_left(monkeypatch: pytest.MonkeyPatch) -> None:
    from sandbox.errors import HostError
    from sandbox.vm.plan import tcg_threads

    monkeypatch.delenv("SANDBOX_TCG_THREADS", raising=False)
    assert tcg_threads(2, running=0, cores=2) == "multi"     # alone: a thread per vCPU
    assert tcg_threads(2, running=1, cores=2) == "single"    # a core is taken
    assert tcg_threads(2, running=2, cores=4) == "multi"
    assert tcg_threads(4, running=1, cores=4) == "single"
    assert tcg_threads(1, running=8, cores=2) == "multi"     # one vCPU: one thread either way
    for setting in ("single", "multi"):
        monkeypatch.setenv("SANDBOX_TCG_THREADS", setting)
        assert tcg_threads(2, running=0, cores=2) == setting
        assert tcg_threads(2, running=5, cores=2) == setting
    monkeypatch.setenv("SANDBOX_TCG_THREADS", "Auto")
    assert tcg_threads(2, running=1, cores=2) == "single"
    monkeypatch.setenv("SANDBOX_TCG_THREADS", "two")
    with pytest.raises(HostError, match="SANDBOX_TCG_THREADS='two' is not one of auto"):
        tcg_threads(2, running=0, cores=2)


def test_the_tcg_thread_mode_is_on_the_command_line_and_not_in_the_shape() -> None:
    single, multi = plan(tcg_threads="single"), plan(tcg_threads="multi")
    assert single.command()[single.command().index("-accel") + 1] == "tcg,thread=single"
    assert multi.command()[multi.command().index("-accel") + 1] == "tcg,thread=multi"
    assert single.shape() == multi.shape()   # a golden snapshot loads under either
    kvm = plan(accel="kvm", kvm_cpu="host", tcg_threads="single").command()
    assert kvm[kvm.index("-accel") + 1] == "kvm"


def test_spec_normalises_memory_once() -> None:
    assert MachineSpec(memory="2G").memory_mib == 2048
    assert MachineSpec().memory_mib is None
    spec = MachineSpec(memory="1536M", qemu_args=("-device", "x"))
    assert MachineSpec.from_kwargs(**spec.to_kwargs()) == spec


def test_command_line_appends_extra_args() -> None:
    assert plan(extra=("-device", "virtio-balloon")).command()[-2:] == ["-device",
                                                                         "virtio-balloon"]


def test_wrapper_runs_command_in_sh_and_reports_pid() -> None:
    line = wrap("echo $FOO", {"FOO": "a b'c"})
    result = subprocess.run(["sh", "-c", line], capture_output=True, text=True, check=True)
    assert result.stdout == "a b'c\n"
    pid = result.stderr.splitlines()[0]
    assert pid.isdigit()


def test_wrapper_rejects_bad_env_names() -> None:
    with pytest.raises(ValueError, match="environment variable name"):
        wrap("true", {"A B": "x"})


def test_nul_bytes_in_commands_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="NUL byte"):
        command_string("echo a\0b")
    with pytest.raises(ValueError, match="NUL byte"):
        command_string(["printf", "a\0b"])
    with pytest.raises(ValueError, match="variable A holds a NUL byte"):
        wrap("true", {"A": "x\0y"})


def test_command_string_quotes_sequences() -> None:
    assert command_string(["sh", "-c", "exit 3"]) == "sh -c 'exit 3'"
    assert shlex.split(command_string(["a b", "c"])) == ["a b", "c"]


def test_command_result_fields() -> None:
    result = CommandResult("x", 3, b"out\xff", b"err", 0.5)
    assert result.failed and not result.succeeded
    assert result.stdout == "out\ufffd" and result.stderr == "err"


def test_orphaned_run_is_found_and_live_one_is_not(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDBOX_RUNTIME_DIR", str(tmp_path))
    dead = subprocess.Popen(["true"])
    dead.wait()
    for name, pid in (("run-dead", dead.pid), ("run-live", os.getpid())):
        (tmp_path / name).mkdir()
        (tmp_path / name / "owner.json").write_text(json.dumps(
            {"pid": pid, "start_ticks": process_start_ticks(os.getpid())}))
    assert orphaned_runs() == [tmp_path / "run-dead"]


def test_reused_pid_counts_as_dead() -> None:
    ticks = process_start_ticks(os.getpid())
    assert ticks is not None
    assert process_alive(os.getpid(), ticks)
    assert not process_alive(os.getpid(), ticks + 1)


def test_kill_tagged_spares_a_process_without_the_tag(tmp_path: Path) -> None:
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        deadline = time.monotonic() + 10  # until the child has exec'd (cmdline says sleep)
        while b"sleep" not in Path(f"/proc/{sleeper.pid}/cmdline").read_bytes():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        pidfile = tmp_path / "qemu.pid"
        pidfile.write_text(str(sleeper.pid))
        assert not kill_tagged(pidfile, "sandbox-nope-")
        assert sleeper.poll() is None
        assert kill_tagged(pidfile, "sleep")
        assert sleeper.wait(timeout=5) != 0
    finally:
        sleeper.kill()


def test_a_rebuilt_image_meets_no_old_golden_snapshot(tmp_path: Path) -> None:
    from sandbox.imaging.image import Image
    from sandbox.vm.golden import golden_key

    manifest = {"name": "x", "digest": "d" * 64, "built_at": "2026-01-01T00:00:00+0000"}
    first = Image(tmp_path, manifest)
    rebuilt = Image(tmp_path, dict(manifest, built_at="2026-01-02T00:00:00+0000"))
    shape = plan()
    assert golden_key(first, shape) == golden_key(Image(tmp_path, dict(manifest)), shape)
    assert golden_key(first, shape) != golden_key(rebuilt, shape)


class _ExitedDuringLoad(QemuProcess):
    """A QEMU that exited (as 7.2 does when an incoming migration fails) while its monitor
    still reported the migration as active."""

    def qmp(self, command: str, **arguments: object) -> dict[str, object]:
        assert command == "query-migrate"
        return {"status": "active"}


def test_a_migration_that_ends_with_qemu_exiting_fails_like_a_failed_one(
        tmp_path: Path) -> None:
    files = MachineFiles(tmp_path)
    files.qemu_log.write_text("qemu-system-x86_64: Not a migration stream\n")
    files.console_log.write_text("sandbox login: \n")
    process = _ExitedDuringLoad(None, files)
    process.process = subprocess.Popen(["sh", "-c", "exit 1"])
    process.process.wait()
    with pytest.raises(SnapshotError) as raised:
        process._wait_migration("loading the golden snapshot", timeout=5)
    assert str(raised.value) == ("loading the golden snapshot failed: QEMU exited with "
                                 "status 1\nQEMU said:\nqemu-system-x86_64: Not a migration "
                                 "stream")


def _qemu_option_fields(text: str) -> list[str]:
    """How QEMU's option parser splits an option string: at single commas, ",," is one."""
    fields, current, index = [], "", 0
    while index < len(text):
        if text[index] == ",":
            if text[index + 1:index + 2] == ",":
                current, index = current + ",", index + 2
                continue
            fields.append(current)
            current, index = "", index + 1
            continue
        current, index = current + text[index], index + 1
    return [*fields, current]


def test_commas_in_names_and_paths_stay_inside_their_option_values() -> None:
    """A comma in the cache or runtime directory (or a tag) would end an option value and
    start a new option: every value in an option string has its commas doubled."""
    run = Path("/tmp/a,b-xyz/run-1/db,x=y")
    command = plan(tag="sandbox-1-db,x=y", files=MachineFiles(run), disk=run / "overlay.qcow2",
                   ram_file=Path("/c,1/golden/g/ram"), seed=Path("/c,1/images/i/seed.iso"),
                   lans=(Path("/tmp/a,b-xyz/networks/n/switch.sock"), None)).command()
    option_strings = ("-name", "-object", "-drive", "-chardev", "-netdev", "-qmp", "-device")
    values = [field for index, argument in enumerate(command[1:])
              if command[index] in option_strings
              for field in _qemu_option_fields(argument)]
    assert not [v for v in values if v.startswith("x=")], values  # no option was added
    for wanted in ("sandbox-1-db,x=y", "mem-path=/c,1/golden/g/ram",
                   f"file={run}/overlay.qcow2", "file=/c,1/images/i/seed.iso",
                   f"path={run}/agent.sock", f"path={run}/ssh.sock",
                   f"path={run}/console.log", f"unix:{run}/qmp.sock",
                   f"local.path={run}/lan0.sock",
                   "remote.path=/tmp/a,b-xyz/networks/n/switch.sock"):
        assert wanted in values, (wanted, values)
    # Plain arguments are taken as they are: no doubling there.
    assert command[command.index("-pidfile") + 1] == f"{run}/qemu.pid"
    direct = plan(kernel=Path("/c,1/vmlinuz"), initrd=Path("/c,1/initrd.img")).command()
    assert direct[direct.index("-kernel") + 1] == "/c,1/vmlinuz"
    assert direct[direct.index("-initrd") + 1] == "/c,1/initrd.img"


def test_a_resumed_machine_boots_from_its_boot_disk_not_from_a_kernel_held_by_qemu() -> None:
    resumed = plan(boot_disk=Path("/c,1/boot/i-k.img"), incoming=True)
    command = resumed.command()
    assert "-kernel" not in command and "-initrd" not in command and "-append" not in command
    assert "file=/c,,1/boot/i-k.img,format=raw,if=none,id=boot0,readonly=on" in command
    assert "virtio-blk-pci,drive=boot0,bus=pcie.0,addr=0x1e,bootindex=0" in command
    # Its shape is that of the machine whose state it loads (booted with -kernel).
    assert resumed.shape() == plan().shape()
    assert "-kernel" in resumed.shape() and "boot0" not in " ".join(resumed.shape())
    # Without a boot disk: -kernel, and an empty disk in its slot, so that the states saved
    # from resumed machines load wherever they are resumed.
    without = plan(incoming=True).command()
    assert "-kernel" in without
    assert "driver=null-co,size=1M,read-zeroes=on,if=none,id=boot0,readonly=on" in without
    assert "virtio-blk-pci,drive=boot0,bus=pcie.0,addr=0x1e" in without
    # A boot from scratch has none; an imported image boots by firmware from its own disk.
    assert "boot0" not in " ".join(plan().command())
    imported = plan(boot_disk=Path("/b.img"), seed=Path("/i/seed.iso"), incoming=True)
    assert "boot0" not in " ".join(imported.command())


def test_a_boot_disk_holds_the_kernel_initrd_and_command_line(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    from sandbox.vm import bootdisk

    if bootdisk.missing_tools():
        pytest.skip(f"needs {', '.join(bootdisk.missing_tools())} (install.sh installs them)")
    monkeypatch.setenv("SANDBOX_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "img").mkdir()
    kernel, initrd = tmp_path / "img" / "vmlinuz", tmp_path / "img" / "initrd.img"
    kernel.write_bytes(b"K" * 300_000)
    initrd.write_bytes(b"I" * 200_000)
    disk = bootdisk.boot_disk(kernel, initrd, "root=/dev/vda quiet")
    assert disk is not None and disk.parent == tmp_path / "cache" / "boot"
    assert bootdisk.boot_disk(kernel, initrd, "root=/dev/vda quiet") == disk  # made once
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    listing = subprocess.run(["mdir", "-a", "-b", "-i", str(disk), "::/"], capture_output=True,
                             text=True, check=True, env=env).stdout
    assert {"::/VMLINUZ", "::/INITRD.IMG", "::/SYSLINUX.CFG", "::/LDLINUX.SYS"} <= {
        line.strip().upper() for line in listing.splitlines()}
    config = subprocess.run(["mtype", "-i", str(disk), "::/syslinux.cfg"], capture_output=True,
                            text=True, check=True, env=env).stdout
    assert "APPEND root=/dev/vda quiet\n" in config
    copied = subprocess.run(["mtype", "-i", str(disk), "::/vmlinuz"], capture_output=True,
                            check=True, env=env).stdout
    assert copied == kernel.read_bytes()
    # Another command line is another disk; one that could add lines to the config is none.
    assert bootdisk.boot_disk(kernel, initrd, "root=/dev/vda") not in (None, disk)
    assert bootdisk.boot_disk(kernel, initrd, "root=/dev/vda\nDEFAULT x") is None
    assert len(bootdisk.remove_boot_disks("img")) == 2
    assert not list((tmp_path / "cache" / "boot").iterdir())


@pytest.mark.parametrize("name", ["db,x=y", "../x", "a/b", ".hidden", "-x", "a b", "x" * 64, "db\n",
                                  "é"])
def test_machine_names_are_checked_before_anything_starts(name: str) -> None:
    from sandbox.errors import MachineNameError
    from sandbox.machine.machine import Machine, launch
    from sandbox.machine.named import check_name

    rule = r"use 1 to 63 letters, digits, '\.', '_' or '-', starting with a letter or digit"
    for attempt in (lambda: Machine(name=name), lambda: launch(name=name),
                    lambda: check_name(name)):
        with pytest.raises(MachineNameError, match=rule):
            attempt()
    assert Machine(name="db-1.a_b").name == "db-1.a_b"


# -- guest text in messages, and guest data read with limits ----------------------------------

#: Every character a guest could use to steer a terminal or a reader: C0 controls but line
#: feed and tab, DEL, C1 controls, lone surrogates and the bidirectional controls.
_UNSAFE = {*map(chr, range(0x20)), *map(chr, range(0x7f, 0xa0)),
           *map(chr, range(0xd800, 0xe000)), "\u061c", "\u200e", "\u200f",
           *map(chr, range(0x202a, 0x202f)), *map(chr, range(0x2066, 0x206a))} - {"\n", "\t"}


def test_printable_leaves_no_control_character_and_is_idempotent() -> None:
    from sandbox.vm.console import printable

    hostile = ("\x1b]0;pwned\x07title \x1b[31mred\x1b[0m \x9b31mc1-csi \x9d8;;http://x\x9c "
               "\x1bP+q\x1b\\ \x1b(B \x1b7 \x90dcs\x9c \x1b]unterminated\nline2 \x1b\x1b[2J "
               "over\rwrite\r\n a\u202eevil\u2066 \udcff \x00\x08\x7f\x85\x9f \x1b")
    out = printable(hostile)
    assert not _UNSAFE & set(out), [c for c in out if c in _UNSAFE]
    assert printable(out) == out
    # sequences removed whole, everything else visible and escaped
    assert "pwned" not in out and "title red c1-csi" in out and "31m" not in out
    assert " unterminated\nline2 \\x1b over" in out  # an OSC without its end: text kept
    assert "a\\u202eevil\\u2066" in out and "\\udcff" in out and "\\x00\\x08\\x7f\\x85\\x9f" in out
    assert "overwrite\n" in out and "\t" in printable("a\tb")
    for char in sorted(_UNSAFE):
        assert not _UNSAFE & set(printable(f"x{char}y")), repr(char)


def test_errors_show_guest_output_escaped_and_keep_it_raw() -> None:
    from sandbox.errors import BootError, CommandFailed, CommandTimeout, GuestPanic, WaitTimeout

    guest = "\x1b]0;pwned\x07ok\x1b[2J\u009b31m\u202ex\x07\n"
    failed = CommandFailed("cmd", 1, guest, guest)
    timeout = CommandTimeout("cmd", 3, guest, guest)
    for error in (failed, timeout, BootError("boot", console_tail=guest),
                  GuestPanic("panic", console_tail=guest), WaitTimeout(f"saw {guest}")):
        text = str(error)
        assert not _UNSAFE & set(text), (type(error).__name__, text)
        assert "ok" in text and "\\u202ex" in text
    assert failed.stdout == guest and failed.stderr == guest and failed.output == guest * 2
    assert timeout.stdout == guest and timeout.stderr == guest
    with pytest.warns(SandboxWarning) as warned:  # warnings quote the guest too (the agent's)
        warnings.warn(f"agent said {guest}", SandboxWarning, stacklevel=1)
    assert str(warned[0].message) == "agent said ok\\u202ex\\x07\n"


def _agent_peer(tmp_path: Path, answer: Callable[[socket.socket], None]) -> Path:
    """A unix socket standing in for the guest agent: reads a request, then ``answer``s."""
    path = tmp_path / "agent.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(4)

    def serve() -> None:
        with server:
            conn, _ = server.accept()
            with conn:
                conn.recv(65536)
                with contextlib.suppress(OSError):
                    answer(conn)

    threading.Thread(target=serve, daemon=True).start()
    return path


def _drip(conn: socket.socket) -> None:
    """An answer that never ends, a byte at a time (for 10 s, then the peer hangs up)."""
    for _ in range(100):
        conn.sendall(b" ")
        time.sleep(0.1)


def test_an_agent_drip_feeding_its_answer_gets_its_timeout_in_all(tmp_path: Path) -> None:
    from sandbox.errors import GuestDataError
    from sandbox.guest.agent import Agent

    agent = Agent(_agent_peer(tmp_path, _drip), timeout=1.5)
    started = time.monotonic()
    with pytest.raises(GuestDataError, match="not complete within 1.5 s"):
        agent.request("ping")
    assert time.monotonic() - started < 4

    (tmp_path / "agent.sock").unlink()
    agent = Agent(_agent_peer(tmp_path, _drip), timeout=1.5)
    started = time.monotonic()
    agent.send_identity()
    agent.finish()  # what a clone's start waits for
    assert time.monotonic() - started < 4
    assert agent.error is not None and "not complete within 1.5 s" in agent.error


@pytest.mark.parametrize(("answer", "error"), [
    (b"[" * 60000 + b"\n", "not JSON .*RecursionError"),
    (b"\xff\xfe{}\n", "not JSON .*UnicodeDecodeError"),
    (b"{\"ok\": tru\n", "not JSON .*JSONDecodeError"),
    (b"[1, 2]\n", "not a JSON object but a list"),
    (b"x" * (200 << 10) + b"\n", "over 65536 bytes without a line end"),
])
def test_a_malformed_agent_answer_is_a_typed_error(tmp_path: Path, answer: bytes,
                                                    error: str) -> None:
    from sandbox.errors import GuestDataError
    from sandbox.guest.agent import Agent

    with pytest.raises(GuestDataError, match=error):
        Agent(_agent_peer(tmp_path, lambda conn: conn.sendall(answer)), timeout=5).request("x")
    (tmp_path / "agent.sock").unlink()
    agent = Agent(_agent_peer(tmp_path, lambda conn: conn.sendall(answer)), timeout=5)
    agent.send_identity()
    agent.finish()
    assert agent.error is not None and re.search(error, agent.error), agent.error


def test_an_agent_error_from_the_guest_is_shown_escaped(tmp_path: Path) -> None:
    from sandbox.guest.agent import Agent

    answer = b'{"ok": false, "error": "\\u001b]0;pwned\\u0007bad\\u009b2J"}\n'
    with pytest.raises(SandboxError) as raised:
        Agent(_agent_peer(tmp_path, lambda conn: conn.sendall(answer)), timeout=5).request("x")
    assert str(raised.value) == "guest agent request 'x' failed: bad"


def _prelude_peer(send: Callable[[socket.socket], None]) -> socket.socket:
    """The host end of a port whose other end ``send``s (in a thread)."""
    host, guest = socket.socketpair()

    def talk() -> None:
        with guest, contextlib.suppress(OSError):
            send(guest)

    threading.Thread(target=talk, daemon=True).start()
    return host


def test_the_ssh_prelude_read_is_bounded_in_size_and_time() -> None:
    from sandbox.errors import GuestDataError, SnapshotError
    from sandbox.guest.sockets import read_prelude

    def banner_then_silence(sock: socket.socket) -> None:
        sock.sendall(b"SSH-2.0-dropbear\r\n" + b"k" * 1000)
        time.sleep(5)

    with _prelude_peer(banner_then_silence) as host:
        assert read_prelude(host, quiet=0.3) == b"SSH-2.0-dropbear\r\n" + b"k" * 1000

    def chatty(sock: socket.socket) -> None:
        sock.sendall(b"SSH-2.0-x\r\n")
        for _ in range(100):
            sock.sendall(b"more")
            time.sleep(0.1)

    started = time.monotonic()
    with _prelude_peer(chatty) as host, \
            pytest.raises(GuestDataError, match="did not fall silent within 2 s"):
        read_prelude(host, timeout=2, quiet=0.5)
    assert time.monotonic() - started < 4

    with _prelude_peer(lambda sock: sock.sendall(b"SSH-2.0-x\r\n" + b"y" * (1 << 20))) as host, \
            pytest.raises(GuestDataError, match="sent over 65536 bytes"):
        read_prelude(host)

    def not_ssh(sock: socket.socket) -> None:
        sock.sendall(b"HTTP/1.0 200\r\n")
        time.sleep(2)

    with _prelude_peer(not_ssh) as host, \
            pytest.raises(SnapshotError, match="no banner"):
        read_prelude(host, quiet=0.3)


# -- the layers ----------------------------------------------------------------------------------

#: The package's layers, lowest first; a module may import its own layer and those before it.
#: Layers in one tuple are peers: neither imports the other. "fronts" is everything else
#: (the package's face, the plugin, its hookspecs, the CLI).
LAYERS: list[tuple[str, ...]] = [("errors",), ("base",), ("host", "guest"), ("share",),
                                 ("imaging",),
                                 ("vm",), ("net",), ("machine",), ("fronts",)]
PACKAGE = Path(__file__).resolve().parent.parent / "sandbox"


def module_names(package: Path) -> dict[str, Path]:
    """Every module under ``package``, by dotted name (a package by its own name)."""
    names = {}
    for path in sorted(package.rglob("*.py")):
        parts = [package.name, *path.relative_to(package).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports: anywhere in the file (in functions, under
    TYPE_CHECKING), relative or absolute; ``from X import name`` counts as X.name when that
    is a module, else as X."""
    import ast

    modules = module_names(package)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = ".".join(here.split(".")[:len(here.split(".")) - node.level + 1])
                    source = f"{base}.{node.module}" if node.module else base
                else:
                    source = node.module or ""
                targets.update(f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules
                               else source for alias in node.names)
        graph[name] = {target for target in targets if target in modules} - {name}
    return graph


def layer_of(module: str) -> str:
    part = (module.split(".") + [""])[1]
    return part if any(part in peers for peers in LAYERS[:-1]) else "fronts"


def rank(layer: str) -> int:
    return next(n for n, peers in enumerate(LAYERS) if layer in peers)


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{module} ({layer_of(module)}) imports {target} ({layer_of(target)})"
                  for module, targets in graph.items() for target in targets
                  if layer_of(target) != layer_of(module)
                  and rank(layer_of(target)) >= rank(layer_of(module)))


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in graph[module]:
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                circles.append(sorted(group))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return circles


def test_the_package_is_layered_without_circles() -> None:
    graph = import_graph(PACKAGE)
    assert "sandbox.vm.qemu" in graph and "sandbox.base.waits" in graph["sandbox.vm.qemu"]
    assert {layer_of(module) for module in graph} == {
        layer for peers in LAYERS for layer in peers}, "a layer without modules, or a new one"
    assert import_circles(graph) == []
    assert upward_imports(graph) == []


def test_the_layer_check_sees_upward_imports_and_circles(tmp_path: Path) -> None:
    package = tmp_path / "sandbox"
    for layer in ("base", "vm", "machine"):
        (package / layer).mkdir(parents=True)
        (package / layer / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "base" / "waits.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
        "    from ..machine.machine import Machine\n")
    (package / "vm" / "qemu.py").write_text("def f():\n    from . import plan\n")
    (package / "vm" / "plan.py").write_text("import sandbox.vm.qemu\n")
    (package / "machine" / "machine.py").write_text("from ..vm import plan\n")
    graph = import_graph(package)
    assert upward_imports(graph) == [
        "sandbox.base.waits (base) imports sandbox.machine.machine (machine)"]
    assert import_circles(graph) == [["sandbox.vm.plan", "sandbox.vm.qemu"]]


# -- the guest CPU model and the host CPU in keys ---------------------------------------------

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 85
model name\t: Intel(R) Xeon(R) Gold 6230
stepping\t: 7
flags\t\t: fpu vme avx2 avx512f

processor\t: 1
vendor_id\t: GenuineIntel
"""


def test_host_cpu_identity_names_the_processor_not_the_order_of_its_flags() -> None:
    from sandbox.host.cpu import host_cpu_identity

    one = host_cpu_identity(CPUINFO)
    assert one.startswith("GenuineIntel:6:85:7:")
    assert host_cpu_identity(CPUINFO.replace("fpu vme avx2", "avx2 fpu vme")) == one
    assert host_cpu_identity(CPUINFO.replace("stepping\t: 7", "stepping\t: 4")) != one
    assert host_cpu_identity(CPUINFO.replace(" avx512f", "")) != one
    assert host_cpu_identity() == host_cpu_identity()  # this host's, read once


@pytest.mark.parametrize("cpu", ["x86-64-v3", "Haswell", "host", "max", "Skylake-Server-v4"])
def test_spec_takes_a_cpu_model_name(cpu: str) -> None:
    spec = MachineSpec.from_kwargs(cpu=cpu)
    assert spec.cpu == cpu
    assert MachineSpec.from_kwargs(**spec.to_kwargs()) == spec


@pytest.mark.parametrize("cpu", ["", "Haswell,+avx2", "host,migratable=off", "a b", 3])
def test_spec_rejects_what_is_not_a_cpu_model_name(cpu: object) -> None:
    with pytest.raises(SandboxError, match=r"cpu: CPU model .* is not a model name"):
        MachineSpec.from_kwargs(cpu=cpu)


def test_command_line_uses_the_cpu_setting_under_both_accelerators() -> None:
    def cpu_of(p: QemuPlan) -> str:
        command = p.command()
        return command[command.index("-cpu") + 1]

    assert cpu_of(plan()) == "max"  # plan_for fills in sandbox.host.cpu.tcg_cpu's model
    assert cpu_of(plan(cpu="Haswell")) == "Haswell"
    assert cpu_of(plan(accel="kvm", kvm_cpu="host")) == "host"
    assert cpu_of(plan(accel="kvm", kvm_cpu="host", cpu="Haswell")) == "Haswell"
    # The host identity is part of the shape, never of the command line.
    assert not [a for a in plan(accel="kvm", host_cpu="X:6:85:7:f").command() if "X:6" in a]


CPU_HELP_10 = """Available CPUs:
x86 max                   Enables all features supported by the accelerator in the current host
x86 qemu64                QEMU Virtual CPU version 2.5+

Recognized CPUID flags:
  3dnow abm erms fma fsrc fsrm
  fsrs fzrm sse2
"""


@pytest.mark.parametrize(("help_text", "model"), [
    (CPU_HELP_10, "max,-erms,-fsrm,-fzrm,-fsrs,-fsrc"),  # QEMU 10: FSRM without ERMS hangs Linux
    (CPU_HELP_10.replace(" fsrc fsrm\n  fsrs fzrm", ""), "max,-erms"),  # 7.2 and older
    (CPU_HELP_10.split("Recognized")[0], "max"),  # cannot say which flags: nothing removed
    ("", "max"),  # no answer at all
])
def test_the_tcg_model_removes_erms_and_the_flags_built_on_it_that_qemu_knows(
        monkeypatch: pytest.MonkeyPatch, help_text: str, model: str) -> None:
    from sandbox.host import cpu

    monkeypatch.setattr(cpu, "_cpu_help", lambda binary: help_text)
    assert cpu.tcg_cpu("qemu") == model
    assert cpu.qemu_cpu_models("qemu") == (("max", "qemu64") if "x86 max" in help_text else ())


def test_abi_levels_map_to_named_models_on_a_qemu_that_lacks_them(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from sandbox.errors import HostError
    from sandbox.host import cpu

    qemu72 = ("Haswell", "Haswell-noTSX", "Nehalem", "qemu64", "Skylake-Server-noTSX-IBRS",
              "EPYC-v1", "host", "max")
    monkeypatch.setattr(cpu, "qemu_cpu_models", lambda binary: qemu72)
    assert cpu.qemu_cpu_model("x86-64-v3", "qemu") == "Haswell-noTSX"
    assert cpu.qemu_cpu_model("x86-64-v2", "qemu") == "Nehalem"
    assert cpu.qemu_cpu_model("Haswell", "qemu") == "Haswell"
    with pytest.raises(HostError, match=r"'haswell' is unknown to qemu \(did you mean "
                                        r"'Haswell'\?\); models it knows include host, max, "
                                        r"x86-64-v1.*Haswell"):
        cpu.qemu_cpu_model("haswell", "qemu")
    monkeypatch.setattr(cpu, "qemu_cpu_models", lambda binary: (*qemu72, "x86-64-v3"))
    assert cpu.qemu_cpu_model("x86-64-v3", "qemu") == "x86-64-v3"


def test_this_qemu_runs_every_abi_level() -> None:
    from sandbox.host.cpu import ABI_LEVEL_MODELS, qemu_cpu_model, qemu_cpu_models
    from sandbox.host.tools import qemu_binary

    binary = qemu_binary()
    assert "Haswell" in qemu_cpu_models(binary) and "max" in qemu_cpu_models(binary)
    for level in ABI_LEVEL_MODELS:
        assert qemu_cpu_model(level, binary) in qemu_cpu_models(binary)


class _Verdict:
    kvm_cpu = "host"


def _shape_on(monkeypatch: pytest.MonkeyPatch, identity: str, accel: str,
              **spec: object) -> list[str]:
    return _plan_on(monkeypatch, identity, accel, **spec).shape()


def _plan_on(monkeypatch: pytest.MonkeyPatch, identity: str, accel: str,
             **spec: object) -> QemuPlan:
    """The plan of a machine of ``spec`` under ``accel`` on a host whose CPU is ``identity``."""
    from sandbox.imaging.image import Image
    from sandbox.vm import plan as plan_module

    monkeypatch.setattr(plan_module, "host_cpu_identity", lambda: identity)
    monkeypatch.setattr(plan_module, "accel_verdict", lambda: _Verdict())
    image = Image(Path("/i"), {"name": "debian-12", "digest": "d", "memory": "1G", "cpus": 2,
                               "recipe": {"cpu": spec.pop("recipe_cpu")}
                               if "recipe_cpu" in spec else {}})
    return plan_module.plan_for(MachineSpec.from_kwargs(**spec), image, accel,
                                files=MachineFiles(Path("M")), tag="T", disk=Path("D"),
                                ram_file=Path("R"))


INTEL = "GenuineIntel:6:85:7:0123456789abcdef"
AMD = "AuthenticAMD:25:1:1:fedcba9876543210"


def test_tcg_shapes_are_the_same_whatever_the_host_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    for spec in ({}, {"cpu": "max"}, {"cpu": "Haswell"}, {"cpu": "x86-64-v3"}):
        assert _shape_on(monkeypatch, INTEL, "tcg", **spec) == \
            _shape_on(monkeypatch, AMD, "tcg", **spec)
        assert not [a for a in _shape_on(monkeypatch, INTEL, "tcg", **spec) if "host-cpu" in a]
    # the default under TCG is max without ERMS, not the model asked for by name
    assert _shape_on(monkeypatch, INTEL, "tcg") != _shape_on(monkeypatch, INTEL, "tcg", cpu="max")
    assert _shape_on(monkeypatch, INTEL, "tcg") != \
        _shape_on(monkeypatch, INTEL, "tcg", cpu="Haswell")


def test_kvm_with_the_host_cpu_puts_the_host_cpu_in_the_shape(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for spec in ({}, {"cpu": "host"}, {"cpu": "max"}, {"recipe_cpu": "host"}):
        intel = _shape_on(monkeypatch, INTEL, "kvm", **dict(spec))
        assert intel != _shape_on(monkeypatch, AMD, "kvm", **dict(spec))
        assert intel[-1] == f"#host-cpu={INTEL}"
        assert intel == _shape_on(monkeypatch, INTEL, "kvm", **dict(spec))


def test_kvm_with_a_named_model_moves_between_hosts(monkeypatch: pytest.MonkeyPatch) -> None:
    for spec in ({"cpu": "Haswell"}, {"cpu": "x86-64-v3"}, {"recipe_cpu": "Nehalem"}):
        intel = _shape_on(monkeypatch, INTEL, "kvm", **dict(spec))
        assert intel == _shape_on(monkeypatch, AMD, "kvm", **dict(spec))
        assert not [a for a in intel if "host-cpu" in a]
    # the machine's setting wins over the recipe's
    assert _shape_on(monkeypatch, INTEL, "kvm", cpu="Haswell", recipe_cpu="Nehalem") == \
        _shape_on(monkeypatch, INTEL, "kvm", cpu="Haswell")


def test_golden_key_and_template_id_follow_the_host_cpu_only_under_kvm_host(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from sandbox.imaging.image import Image
    from sandbox.vm.golden import golden_key
    from sandbox.vm.template import template_id

    image = Image(Path("/i"), {"name": "debian-12", "digest": "d", "built_at": "t"})

    def keys(identity: str, accel: str, **spec: object) -> tuple[str, str]:
        shaped = _plan_on(monkeypatch, identity, accel, **spec)
        return (golden_key(image, shaped),
                template_id("web", "v1", {"kind": "golden", "entry": "g", "created_at": "t"},
                            shaped.shape()))

    assert keys(INTEL, "tcg") == keys(AMD, "tcg")
    assert keys(INTEL, "kvm", cpu="x86-64-v3") == keys(AMD, "kvm", cpu="x86-64-v3")
    one, two = keys(INTEL, "kvm"), keys(AMD, "kvm")
    assert one[0] != two[0] and one[1] != two[1]


def test_cpu_host_needs_kvm(monkeypatch: pytest.MonkeyPatch) -> None:
    from sandbox.errors import HostError

    with pytest.raises(HostError, match="cpu='host' needs KVM.*use cpu='max'"):
        _shape_on(monkeypatch, INTEL, "tcg", cpu="host")


def test_payload_pieces_hash_like_hashlib(tmp_path: Path) -> None:
    """The host's piece digests (sandbox.machine.payload) are sha256 of consecutive slices
    of the padded content."""
    import hashlib

    from sandbox.machine import payload

    for size in (1 << 20, (8 << 20) - 1, 8 << 20, (9 << 20) + 123, 100 << 20):
        data = os.urandom(size)
        sink = payload._Hashing(io.BytesIO(), payload.piece_size(payload._padded(size)))
        for start in range(0, size, 3 << 20):  # writes that straddle the pieces
            sink.write(data[start:start + (3 << 20)])
        sink.pad()
        padded = data + bytes(payload._padded(size) - size)
        piece = payload.piece_size(len(padded))
        assert sink.digests == [hashlib.sha256(padded[o:o + piece]).hexdigest()
                                for o in range(0, len(padded), piece)]
        assert len(sink.digests) <= payload.PIECES_AIM


_PROGRAMS = [  # source, status, what the output holds
    ("print('out'); import sys; sys.stderr.write('err\\n')", 0, "err"),
    ("import sys; sys.exit(7)", 7, ""),
    ("import sys; sys.exit('said so')", 1, "said so"),
    ("raise ValueError('boom')", 1, "ValueError: boom"),
    ("import os, sys; print(os.read(0, 3), sys.argv[1:])", 0, "b'go\\n' ['a b', 'c']"),
]


@pytest.mark.parametrize(("source", "status", "said"), _PROGRAMS)
def test_the_agents_runner_and_its_stand_in_run_programs_alike(source: str, status: int,
                                                               said: str) -> None:
    """A push's program runs in the guest agent's runner (run_program in sandbox-agent) or,
    without it, under payload.BOOT: the two take the same input and end the same way (run
    here with the host's Python)."""
    import socket
    import sys

    from sandbox.guest.files import GUEST_AGENT
    from sandbox.machine import payload

    job = payload.program(source, "a b", "c") + b"go\n"
    boot = subprocess.run([sys.executable, "-I", "-S", "-c", payload.BOOT], input=job,
                          capture_output=True, timeout=60)
    ours, theirs = socket.socketpair()
    loader = ("import importlib.machinery, socket, sys; "
              f"agent = importlib.machinery.SourceFileLoader('agent', {str(GUEST_AGENT)!r})"
              ".load_module(); agent.run_program(socket.socket(fileno=int(sys.argv[1])))")
    runner = subprocess.Popen([sys.executable, "-I", "-c", loader, str(theirs.fileno())],
                              pass_fds=[theirs.fileno()])
    theirs.close()
    ours.sendall(job)
    ours.shutdown(socket.SHUT_WR)
    answer = b""
    while chunk := ours.recv(65536):
        answer += chunk
    ours.close()
    assert runner.wait(60) == 0
    for out, err, exit_status in ((boot.stdout.decode(), boot.stderr.decode(), boot.returncode),
                                  (answer.decode(), "", 0)):  # the runner's: one stream
        got, text = payload.program_status(out, exit_status)
        assert (got, said in text + err) == (status, True), out + err


def test_overlays_after_the_first_are_written_from_its_bytes_and_follow_the_backing_file(
        tmp_path: Path) -> None:
    """The first overlay on a disk comes from qemu-img; later ones are its bytes written
    again (no qemu-img run), each a sound qcow2 on that disk. A backing file that changed
    (here: grew) gets an overlay made anew, of its new size."""
    from sandbox.vm import plan

    def info(path: Path) -> dict[str, object]:
        out = subprocess.run(["qemu-img", "info", "--output=json", str(path)],
                             capture_output=True, text=True, check=True).stdout
        return dict(json.loads(out))

    backing = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(backing), "64M"], check=True)
    first = plan.create_overlay(backing, tmp_path / "one.qcow2")
    runs: list[list[str]] = []
    real_run = subprocess.run

    def counted(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        if command[-1].startswith(str(tmp_path)) and "create" in command:  # overlays only
            runs.append(command)
        return real_run(command, **kwargs)  # type: ignore[call-overload,no-any-return]

    plan.subprocess.run = counted  # type: ignore[assignment]
    try:
        second = plan.create_overlay(backing, tmp_path / "two.qcow2")
        assert runs == []
        assert second.read_bytes() == first.read_bytes()
        subprocess.run(["qemu-img", "check", "-q", str(second)], check=True)
        assert info(second)["backing-filename"] == str(backing)
        assert info(second)["virtual-size"] == 64 << 20
        subprocess.run(["qemu-img", "resize", "-q", str(backing), "128M"], check=True)
        third = plan.create_overlay(backing, tmp_path / "three.qcow2")
        assert [run[-1] for run in runs] == [str(tmp_path / "three.qcow2")]
        assert info(third)["virtual-size"] == 128 << 20
        subprocess.run(["qemu-img", "check", "-q", str(third)], check=True)
    finally:
        plan.subprocess.run = real_run  # type: ignore[assignment]
