"""A failed test's machine saved whole and resumed elsewhere (``--sandbox-save-failed``,
``sandbox debug``, ``sandbox save``): real guests, a real registry (tests/registry.py), the
ordinary account with an empty cache of its own on the resuming side."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox.errors import SnapshotError
from sandbox.imaging.image import cached_image
from sandbox.imaging.recipe import find_recipe
from sandbox.machine.replay import _SAVED_REF, chain_entries, chain_of
from sandbox.share.oci import Registry
from sandbox.share.store import send
from sandbox.vm.golden import Golden
from sandbox.vm.replay import (
    SAVED_VERSION,
    ReplayError,
    apply_delta,
    bases_of,
    check_format,
    write_delta,
)

from .conftest import IMAGE, env_with, qemu_processes, sandbox_cli
from .ordinary import Account
from .registry import RegistryServer, docker_config

# -- the RAM delta and the manifest (no VM) ---------------------------------------------------


def _ram(path: Path, size: int, pages: dict[int, bytes]) -> Path:
    with path.open("wb") as out:
        out.truncate(size)
        for index, data in pages.items():
            os.pwrite(out.fileno(), data, index * 4096)
    return path


def test_a_ram_delta_holds_only_changed_pages_and_rebuilds_them_exactly(tmp_path: Path) -> None:
    size = 8 << 20
    base = _ram(tmp_path / "base", size, {3: b"a" * 4096, 10: b"b" * 4096, 2047: b"z" * 4096})
    # Changed: page 3 rewritten, page 10 zeroed, pages 500-502 new; page 2047 the same.
    ram = _ram(tmp_path / "ram", size, {3: b"c" * 4096, 10: bytes(4096), 500: b"x" * 12288,
                                        2047: b"z" * 4096})
    pages, changed = write_delta(ram, base, tmp_path / "delta")
    assert (pages, changed) == (2048, 5)
    assert (tmp_path / "delta").stat().st_size < 6 * 4096 + 4096
    apply_delta(tmp_path / "delta", base, tmp_path / "out", size)
    assert (tmp_path / "out").read_bytes() == ram.read_bytes()
    out = tmp_path / "out"
    assert out.stat().st_blocks * 512 < 1 << 20, "the rebuilt RAM is not sparse"
    # Without a base: against zeros.
    write_delta(ram, None, tmp_path / "delta0")
    apply_delta(tmp_path / "delta0", None, tmp_path / "out0", size)
    assert (tmp_path / "out0").read_bytes() == ram.read_bytes()


def test_a_damaged_ram_delta_is_refused(tmp_path: Path) -> None:
    size = 1 << 20
    base = _ram(tmp_path / "base", size, {})
    ram = _ram(tmp_path / "ram", size, {1: b"q" * 4096, 7: b"r" * 4096})
    write_delta(ram, base, tmp_path / "delta")
    data = (tmp_path / "delta").read_bytes()
    (tmp_path / "cut").write_bytes(data[:-100])
    with pytest.raises(ReplayError, match="truncated or damaged"):
        apply_delta(tmp_path / "cut", base, tmp_path / "out", size)
    with pytest.raises(ReplayError, match="does not fit a machine of 2 MiB"):
        apply_delta(tmp_path / "delta", None, tmp_path / "out", 2 << 20)
    flipped = bytearray(data)
    flipped[32] ^= 0x10  # a bitmap bit the page count does not cover
    (tmp_path / "flipped").write_bytes(bytes(flipped))
    with pytest.raises(ReplayError, match="disagree|truncated"):
        apply_delta(tmp_path / "flipped", base, tmp_path / "out", size)


def _manifest(**changes: Any) -> dict[str, Any]:
    from sandbox.host.tools import qemu_version

    manifest = {"kind": "saved", "key": "a" * 64, "saved_version": SAVED_VERSION,
                "qemu_version": qemu_version(), "memory_mib": 1024, "state_bytes": 1,
                "shape": ["qemu"], "spec": {}, "accel": "tcg", "image_entry": "debian-12-x",
                "bases": [{"kind": "image", "entry": "debian-12-x", "key": "b" * 64},
                          {"kind": "golden", "entry": "debian-12-y", "key": "c" * 64}]}
    manifest.update(changes)
    return manifest


def test_a_saved_manifest_is_checked_before_anything_large_is_fetched() -> None:
    check_format(_manifest(), "a" * 64)
    with pytest.raises(ReplayError, match=r"saved under QEMU 99\.0\.0.*this host has QEMU"):
        check_format(_manifest(qemu_version="99.0.0"), "a" * 64)
    with pytest.raises(ReplayError, match="another version of pytest-qemu-sandbox"):
        check_format(_manifest(saved_version="0"), "a" * 64)
    with pytest.raises(ReplayError, match="not a saved machine"):
        check_format(_manifest(kind="template"), "a" * 64)
    with pytest.raises(ReplayError, match="another processor|other than this host"):
        check_format(_manifest(shape=["qemu", "#host-cpu=OtherVendor-1-2-3"]), "a" * 64)
    with pytest.raises(ReplayError, match="lacks a valid 'memory_mib'"):
        check_format(_manifest(memory_mib="1G"), "a" * 64)
    for bad in ([{"kind": "golden", "entry": "x", "key": "c" * 64}],
                [{"kind": "image", "entry": "../../etc", "key": "b" * 64}],
                [{"kind": "image", "entry": "x", "key": "short"}], "image", []):
        with pytest.raises(ReplayError):
            bases_of(_manifest(bases=bad))
    assert [b.tag for b in bases_of(_manifest())] == ["image-" + "b" * 64, "golden-" + "c" * 64]
    assert issubclass(ReplayError, SnapshotError)


def test_saved_machine_references_are_parsed_strictly() -> None:
    ref = _SAVED_REF.match(f"127.0.0.1:5000/vms:saved-{'d' * 64}")
    assert ref is not None and ref.group("registry") == "127.0.0.1:5000/vms"
    bare = _SAVED_REF.match(f"saved-{'d' * 64}")
    assert bare is not None and bare.group("registry") is None
    for bad in (f"ghcr.io/x:golden-{'d' * 64}", "saved-xyz", f"saved-{'d' * 64}; rm -rf /"):
        assert _SAVED_REF.match(bad) is None


# -- real guests ------------------------------------------------------------------------------

SUITE = r'''
import pytest

SERVER = """
import os, socket
value = os.urandom(8).hex()  # in this process's memory only
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.1", 7777))
server.listen()
open("/run/value-server.pid", "w").write(str(os.getpid()))
while True:
    client, _ = server.accept()
    client.sendall(value.encode())
    client.close()
"""
ASK = ("python3 -c \"import socket; print(socket.create_connection(('127.0.0.1', 7777))"
       ".recv(64).decode())\"")


def test_checkout(vm):
    vm.succeed("echo written-before-failure > /root/evidence")
    vm.succeed("cat > /root/server.py", input=SERVER)
    vm.succeed("systemd-run --unit=value-server python3 /root/server.py")
    vm.succeed("for i in $(seq 100); do [ -s /run/value-server.pid ] && break; sleep 0.1; done")
    value = vm.succeed(ASK).strip()
    pid = vm.succeed("cat /run/value-server.pid").strip()
    assert value == "never", f"value={value} pid={pid}"


def test_passes(vm):
    vm.succeed("echo fine")
'''

ASK = ("python3 -c \"import socket; print(socket.create_connection(('127.0.0.1', 7777))"
       ".recv(64).decode())\"")


def run_suite(suite: Path, *args: str, env: dict[str, str] | None = None
              ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
                           "-p", "no:randomly", "-q", *args, str(suite / "test_app.py")],
                          cwd=suite, env=env or env_with(), capture_output=True, text=True,
                          timeout=900, check=False)


def failure_of(output: str) -> tuple[str, str]:
    """The value and pid the failing test reported."""
    found = re.search(r"value=([0-9a-f]{16}) pid=(\d+)", output)
    assert found, output[-3000:]
    return found.group(1), found.group(2)


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory, built_image: dict[str, Any]) -> Path:
    path = tmp_path_factory.mktemp("replay-suite")
    (path / "test_app.py").write_text(SUITE)
    return path


@pytest.fixture(scope="module")
def saved(suite: Path) -> dict[str, Any]:
    """The suite run with --sandbox-save-failed=DIR: one file, of the failing test's VM."""
    out = suite / "vms"
    started = time.monotonic()
    result = run_suite(suite, f"--sandbox-save-failed={out}")
    value, pid = failure_of(result.stdout)
    return {"dir": out, "result": result, "value": value, "pid": pid,
            "seconds": time.monotonic() - started}


@pytest.fixture(scope="module")
def saved_with_base(suite: Path) -> dict[str, Any]:
    out = suite / "vms-with-base"
    result = run_suite(suite, "-k", "checkout", f"--sandbox-save-failed={out}",
                       "--sandbox-save-failed-base")
    value, pid = failure_of(result.stdout)
    files = list(out.glob("*.sandbox"))
    assert len(files) == 1, result.stdout[-3000:]
    return {"file": files[0], "value": value, "pid": pid}


@pytest.fixture(scope="module")
def base_in_registry(registry: RegistryServer, built_image: dict[str, Any],
                     tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The golden snapshot the suite's machines clone, with its image, pushed to repository
    ``replay`` of the test registry."""
    from sandbox.vm.accel import resolve_accel
    from sandbox.vm.golden import locate
    from sandbox.vm.spec import MachineSpec

    image = cached_image(find_recipe(IMAGE))
    assert image is not None
    golden = Golden.load(locate(image, MachineSpec.from_kwargs(image=IMAGE),
                                resolve_accel("auto")))
    config = docker_config(tmp_path_factory.mktemp("replay-docker"), registry.host)
    send(Registry(registry.reference("replay"), auth_file=config),
         chain_entries(chain_of(golden)))
    return {"config": config, "reference": registry.reference("replay"), "golden": golden}


def test_a_failed_test_leaves_one_file_per_machine_and_a_passing_test_none(
        saved: dict[str, Any]) -> None:
    result = saved["result"]
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-2000:]
    assert "1 failed, 1 passed" in result.stdout, result.stdout[-2000:]
    files = sorted(p.name for p in saved["dir"].iterdir() if not p.name.startswith("."))
    assert files == ["test_app.py-test_checkout-vm1.sandbox"], files
    path = saved["dir"] / files[0]
    assert re.search(rf"sandbox: saved VM 'vm1' of test_app\.py::test_checkout \([\d.]+[KMG]?, "
                     rf"[\d.]+ s\) -> {re.escape(str(path))}", result.stdout), result.stdout
    assert f"replay:  sandbox debug {path}" in result.stdout
    # Only what the base cannot give: a few MiB, not the guest's 1 GiB of RAM.
    assert path.stat().st_size < 64 << 20, path.stat().st_size


def _give(account: Account, source: Path, target: Path) -> None:
    """Copy ``source`` to ``target``, owned by ``account``."""
    if account.is_me:
        shutil.copyfile(source, target)
        return
    with source.open("rb") as data:
        subprocess.run(["runuser", "-u", account.name, "--", "sh", "-c", 'cat > "$1"', "sh",
                        str(target)], stdin=data, check=True)


class AccountSandbox:
    """``sandbox`` as the ordinary account, with an empty cache and a runtime directory of
    its own (named machines live there: nothing another test or an earlier, killed run left
    under a name can collide with this one's)."""

    def __init__(self, account: Account, account_bin: Path, work: Path, **extra: str) -> None:
        self.account, self.bin, self.work = account, account_bin, work
        self.cache, self.runtime = work / "cache", work / "run"
        account.run(["mkdir", "-p", "-m", "700", str(self.cache), str(self.runtime)],
                    check=True)
        settings = {"PATH": str(account_bin), "SANDBOX_CACHE_DIR": str(self.cache),
                    "SANDBOX_RUNTIME_DIR": str(self.runtime), **extra}
        self.env = account.env(**settings)

    def __call__(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return self.account.run([str(self.bin / "sandbox"), *args], env=self.env,
                                cwd=self.work, timeout=timeout)

    def down_all(self) -> None:
        """``sandbox down`` every named machine still here (a failed test's)."""
        machines = self.runtime / "machines"
        listed = self.account.run(["ls", str(machines)]).stdout.split()
        for name in listed:
            self("down", name, timeout=120)


def _check_resumed(run: AccountSandbox, name: str, value: str, pid: str) -> None:
    """The machine is back: the file, the process with its pid, the value in its memory;
    exec, cp and down work on it; nothing is left after down."""
    evidence = run("exec", name, "--", "cat", "/root/evidence")
    assert evidence.stdout.strip() == "written-before-failure", evidence.stderr
    same = run("exec", name, "--", "sh", "-c", f"cat /run/value-server.pid; echo; {ASK}; "
                                                "systemctl is-active value-server")
    assert same.stdout.split() == [pid, value, "active"], same.stdout + same.stderr
    clock = run("exec", name, "--", "date", "+%s")
    assert abs(int(clock.stdout.strip()) - time.time()) < 60, clock.stdout
    local = run.work / "from-host.txt"
    run.account.write(local, "pushed in\n")
    copied_in = run("cp", str(local), f"{name}:/root/from-host.txt")
    assert copied_in.returncode == 0, copied_in.stderr
    copied_out = run("cp", f"{name}:/root/evidence", str(run.work / "evidence"))
    assert copied_out.returncode == 0, copied_out.stderr
    both = run("exec", name, "--", "cat", "/root/from-host.txt")
    assert both.stdout == "pushed in\n"
    listed = run("ls", "--format", "json")
    machine = next(m for m in json.loads(listed.stdout) if m["name"] == name)
    assert machine["status"] == "running"
    down = run("down", name)
    assert down.returncode == 0, down.stderr
    assert not qemu_processes(f"sandbox-named-{name},") or not _alive(machine["pid"])
    assert name not in run("ls").stdout


def _resume(run: AccountSandbox, file: Path, name: str, came_from: str,
            saved: dict[str, Any]) -> None:
    """``sandbox debug FILE --name NAME``: the base came from ``came_from``; then
    :func:`_check_resumed`."""
    resumed = run("debug", str(file), "--no-shell", "--name", name)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert came_from in resumed.stdout, resumed.stdout
    _check_resumed(run, name, saved["value"], saved["pid"])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_the_ordinary_account_resumes_it_with_its_base_pulled_from_the_registry(
        saved: dict[str, Any], base_in_registry: dict[str, Any], account: Account,
        account_bin: Path) -> None:
    work = account.make_workdir()
    docker = work / "docker"
    run = AccountSandbox(account, account_bin, work, DOCKER_CONFIG=str(docker),
                         SANDBOX_REGISTRY=base_in_registry["reference"])
    try:
        account.run(["mkdir", str(docker)], check=True)
        account.write(docker / "config.json", base_in_registry["config"].read_text())
        file = work / "failed.sandbox"
        _give(account, next(saved["dir"].glob("*.sandbox")), file)
        started = time.monotonic()
        resumed = run("debug", str(file), "--no-shell")
        seconds = time.monotonic() - started
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        golden = base_in_registry["golden"].path.name
        assert "sandbox: test_app.py::test_checkout, vm1, failed " in resumed.stdout
        assert "AssertionError: value=" in resumed.stdout, resumed.stdout
        assert "resumed as 'test_checkout-vm1'" in resumed.stdout, resumed.stdout
        assert f"base golden {golden} from registry {base_in_registry['reference']}" in \
            resumed.stdout, resumed.stdout
        assert "$ cat /run/value-server.pid" in resumed.stdout  # the transcript's tail
        # The base came from the registry (nothing built, no golden boot).
        assert (run.cache / "golden" / golden / "manifest.json").exists()
        assert "golden snapshot (boot once" not in resumed.stderr
        print(f"sandbox debug, base pulled: {seconds:.1f} s")
        _check_resumed(run, "test_checkout-vm1", saved["value"], saved["pid"])

        # Again from the now warm cache, under another name.
        _resume(run, file, "again", f"base golden {golden} from the cache", saved)
    finally:
        run.down_all()
        account.remove(work)


def test_a_file_made_with_its_base_needs_no_registry(
        saved_with_base: dict[str, Any], account: Account, account_bin: Path) -> None:
    work = account.make_workdir()
    run = AccountSandbox(account, account_bin, work, SANDBOX_REGISTRY="")
    try:
        file = work / "with-base.sandbox"
        _give(account, saved_with_base["file"], file)
        _resume(run, file, "from-file", f"from the file {file}", saved_with_base)
    finally:
        run.down_all()
        account.remove(work)


def test_files_that_cannot_be_resumed_name_the_fix(saved: dict[str, Any],
                                                   tmp_path: Path) -> None:
    file = next(saved["dir"].glob("*.sandbox"))
    env = env_with(SANDBOX_CACHE_DIR=str(tmp_path / "empty-cache"), SANDBOX_REGISTRY="",
                   SANDBOX_RUNTIME_DIR=tempfile.mkdtemp(prefix="rp-", dir="/tmp"))
    # Its base is in neither this cache, the file nor a registry.
    no_base = sandbox_cli("debug", str(file), "--no-shell", env=env)
    assert no_base.returncode == 2, no_base.stdout + no_base.stderr
    assert "is in none of: this host's cache" in no_base.stderr, no_base.stderr
    assert "--sandbox-save-failed-base" in no_base.stderr
    # A truncated file.
    cut = tmp_path / "cut.sandbox"
    cut.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    truncated = sandbox_cli("debug", str(cut), "--no-shell", env=env)
    assert truncated.returncode == 2
    assert "damaged or truncated" in truncated.stderr, truncated.stderr
    # A host whose QEMU is another version.
    fake = tmp_path / "bin" / "qemu-system-x86_64"
    fake.parent.mkdir()
    real = shutil.which("qemu-system-x86_64")
    fake.write_text(f'#!/bin/sh\n[ "$1" = --version ] && {{ echo "QEMU emulator version '
                    f'99.1.0"; exit 0; }}\nexec {real} "$@"\n')
    fake.chmod(0o755)
    other = sandbox_cli("debug", str(file), "--no-shell", env=dict(env, SANDBOX_QEMU=str(fake)))
    assert other.returncode == 2
    assert "this host has QEMU 99.1.0" in other.stderr, other.stderr
    assert not list((Path(env["SANDBOX_RUNTIME_DIR"]) / "machines").glob("*")) if \
        (Path(env["SANDBOX_RUNTIME_DIR"]) / "machines").exists() else True
    shutil.rmtree(env["SANDBOX_RUNTIME_DIR"], ignore_errors=True)


def test_the_size_bound_is_honoured(suite: Path, tmp_path: Path) -> None:
    out = tmp_path / "bounded"
    result = run_suite(suite, "-k", "checkout", f"--sandbox-save-failed={out}",
                       "--sandbox-save-failed-max=1M")
    assert result.returncode == 1
    assert re.search(r"sandbox: VM 'vm1' of test_app\.py::test_checkout was not saved: it takes "
                     r"[\d.]+M, and 1(\.0)?M are left under the bound", result.stdout), \
        result.stdout[-3000:]
    assert not [p for p in out.iterdir() if not p.name.startswith(".")]


def test_saved_to_the_registry_and_resumed_from_its_reference(
        suite: Path, base_in_registry: dict[str, Any], tmp_path: Path) -> None:
    env = env_with(DOCKER_CONFIG=str(base_in_registry["config"].parent))
    result = run_suite(suite, "-k", "checkout", "--sandbox-save-failed=registry",
                       f"--sandbox-registry={base_in_registry['reference']}", env=env)
    value, pid = failure_of(result.stdout)
    found = re.search(r"replay:  sandbox debug (\S+:saved-[0-9a-f]{64})", result.stdout)
    assert found, result.stdout[-3000:]
    reference = found.group(1)
    assert reference.startswith(base_in_registry["reference"] + ":")
    runtime = tempfile.mkdtemp(prefix="rp-", dir="/tmp")
    debug_env = dict(env, SANDBOX_CACHE_DIR=str(tmp_path / "cache"), SANDBOX_REGISTRY="",
                     SANDBOX_RUNTIME_DIR=runtime)
    try:
        resumed = sandbox_cli("debug", reference, "--no-shell", "--name", "by-ref",
                              env=debug_env)
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        same = sandbox_cli("exec", "by-ref", "--", "sh", "-c",
                           f"cat /root/evidence /run/value-server.pid; echo; {ASK}",
                           env=debug_env)
        assert same.stdout.split() == ["written-before-failure", pid, value], same.stdout
    finally:
        sandbox_cli("down", "by-ref", env=debug_env)
        shutil.rmtree(runtime, ignore_errors=True)


@pytest.fixture
def named_env(tmp_path: Path, built_image: dict[str, Any]) -> Iterator[dict[str, str]]:
    runtime = tempfile.mkdtemp(prefix="rp-", dir="/tmp")
    env = env_with(SANDBOX_RUNTIME_DIR=runtime)
    yield env
    for name in ("dev", "dev-back", "dev-back-2", "kept-clock", "revived"):
        sandbox_cli("down", name, env=env)
    shutil.rmtree(runtime, ignore_errors=True)


def test_sandbox_save_writes_a_named_machine_and_debug_brings_it_back(
        named_env: dict[str, str], tmp_path: Path) -> None:
    up = sandbox_cli("up", "dev", env=named_env)
    assert up.returncode == 0, up.stderr
    sandbox_cli("exec", "dev", "--", "sh", "-c",
                "echo at-the-terminal > /root/note; systemd-run --unit=ticker sleep 100000",
                env=named_env)
    file = tmp_path / "dev.sandbox"
    saved = sandbox_cli("save", "dev", str(file), env=named_env)
    assert saved.returncode == 0, saved.stderr
    assert "dev: saved (" in saved.stdout and f"replay: sandbox debug {file}" in saved.stdout
    # The machine runs on after the save.
    assert sandbox_cli("exec", "dev", "--", "cat", "/root/note", env=named_env).stdout == \
        "at-the-terminal\n"
    resumed = sandbox_cli("debug", str(file), "--no-shell", "--name", "dev-back", env=named_env)
    assert resumed.returncode == 0, resumed.stderr
    assert "(no test: sandbox save), dev, saved " in resumed.stdout, resumed.stdout
    back = sandbox_cli("exec", "dev-back", "--", "sh", "-c",
                       "cat /root/note; systemctl is-active ticker", env=named_env)
    assert back.stdout.split() == ["at-the-terminal", "active"], back.stdout + back.stderr
    # A resumed machine saves again (its disk is one more layer on the base).
    sandbox_cli("exec", "dev-back", "--", "sh", "-c", "echo second > /root/second",
                env=named_env)
    again = sandbox_cli("save", "dev-back", str(tmp_path / "again.sandbox"), env=named_env)
    assert again.returncode == 0, again.stderr
    twice = sandbox_cli("debug", str(tmp_path / "again.sandbox"), "--no-shell",
                        env=named_env)
    assert "resumed as 'dev-back-2'" in twice.stdout, twice.stdout + twice.stderr
    both = sandbox_cli("exec", "dev-back-2", "--", "cat", "/root/note", "/root/second",
                       env=named_env)
    assert both.stdout == "at-the-terminal\nsecond\n", both.stdout + both.stderr
    # --keep-clock: the guest's clock stays where it was when saved.
    time.sleep(8)
    kept = sandbox_cli("debug", str(file), "--no-shell", "--keep-clock", "--name",
                       "kept-clock", env=named_env)
    assert kept.returncode == 0, kept.stderr
    clock = sandbox_cli("exec", "kept-clock", "--", "date", "+%s", env=named_env)
    assert int(clock.stdout) < time.time() - 5, (clock.stdout, time.time())
    # A name that is taken.
    taken = sandbox_cli("debug", str(file), "--no-shell", "--name", "dev", env=named_env)
    assert taken.returncode == 2 and "exists already" in taken.stderr, taken.stderr
    # Saved with its SSH server on port 22 stopped: debug arms one on the virtio-serial port
    # and starts port 22's again, so the CLI verbs work.
    sandbox_cli("exec", "dev", "--", "systemd-run", "--unit=stopper", "sh", "-c",
                "sleep 1; systemctl stop sandbox-sshd", env=named_env)
    time.sleep(5)
    no_sshd = tmp_path / "no-sshd.sandbox"
    assert sandbox_cli("save", "dev", str(no_sshd), env=named_env).returncode == 0
    revived = sandbox_cli("debug", str(no_sshd), "--no-shell", "--name", "revived",
                          env=named_env)
    assert revived.returncode == 0, revived.stderr
    active = sandbox_cli("exec", "revived", "--", "sh", "-c",
                         "systemctl is-active sandbox-sshd; cat /root/note", env=named_env)
    assert active.stdout.split() == ["active", "at-the-terminal"], active.stdout + active.stderr


def test_its_networks_come_back_as_networks_of_its_own(named_env: dict[str, str],
                                                       tmp_path: Path) -> None:
    network = f"replay-{os.getpid()}"
    for name in ("dev", "dev-back"):  # the peer of dev on the network
        up = sandbox_cli("up", name, "--network", network, env=named_env)
        assert up.returncode == 0, up.stderr
    listed = json.loads(sandbox_cli("ls", "--format", "json", env=named_env).stdout)
    address = next(m for m in listed if m["name"] == "dev")["networks"][network]
    file = tmp_path / "networked.sandbox"
    assert sandbox_cli("save", "dev", str(file), env=named_env).returncode == 0
    resumed = sandbox_cli("debug", str(file), "--no-shell", "--name", "revived", env=named_env)
    assert resumed.returncode == 0, resumed.stderr
    assert f"network 0 ({network}, address {address}): on a private network of its own; its " \
           "other members are not here" in resumed.stdout, resumed.stdout
    links = sandbox_cli("exec", "revived", "--", "ip", "-4", "-br", "addr", env=named_env)
    assert re.search(rf"^eth1\s+UP\s+{re.escape(address)}/", links.stdout, re.M), links.stdout
    # dev's peer is not on the resumed machine's network.
    alone = sandbox_cli("exec", "revived", "--", "python3", "-c",
                        "import socket; peer = socket.gethostbyname('dev-back'); "
                        "s = socket.socket(); s.settimeout(3); "
                        "print(peer, 'reached' if s.connect_ex((peer, 22)) == 0 else 'alone')",
                        env=named_env)
    assert re.fullmatch(r"192\.168\.\d+\.\d+ alone", alone.stdout.strip()), \
        alone.stdout + alone.stderr
