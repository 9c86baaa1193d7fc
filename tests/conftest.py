from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import sandbox
from sandbox.imaging.image import Image, cached_image, get_image
from sandbox.imaging.recipe import find_recipe
from sandbox.vm.accel import resolve_accel
from sandbox.vm.golden import Golden, find_golden

from .ordinary import (
    Account,
    build_wheelhouse,
    install_from_wheelhouse,
    ordinary_account,
    shared_tmp,
)
from .registry import registry, tls_registry, token_registry  # noqa: F401  (session fixtures)

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "debian-12"


def sandbox_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 600,
                input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run the ``sandbox`` console script as a user would."""
    return subprocess.run([sys.executable, "-m", "sandbox.cli", *args], capture_output=True,
                          text=True, env=env, timeout=timeout, input=input, cwd=ROOT,
                          check=False)


@pytest.fixture(scope="session")
def built_image() -> dict[str, Any]:
    """The default image, built for the session if the cache lacks it.

    A missing image is built by four concurrent ``sandbox image build`` processes, as four
    test workers would: the outcome is kept so a test can check that exactly one built.
    """
    if cached_image(find_recipe(IMAGE)) is not None:
        return {"concurrent": None}
    started = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: sandbox_cli("image", "build", IMAGE, timeout=900),
                                range(4)))
    elapsed = time.monotonic() - started
    for result in results:
        assert result.returncode == 0, result.stderr
    return {"concurrent": results, "seconds": elapsed}


@pytest.fixture(scope="module")
def shared_vm(built_image: dict[str, Any]) -> Iterator[sandbox.Machine]:
    """One machine shared by the tests of a module that only read or add files."""
    with sandbox.launch(IMAGE) as machine:
        yield machine


def qemu_processes(tag: str) -> list[int]:
    """Pids of QEMU processes whose command line carries ``tag``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu-system" in cmdline and tag.encode() in cmdline:
            found.append(int(proc.name))
    return found


def kill_and_expect_no_qemu(process: subprocess.Popen[Any], tag: str, what: str) -> None:
    """SIGKILL ``process``; within 5 s no QEMU whose command line carries ``tag`` is left
    (``what`` says what would have leaked)."""
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + 5
    while qemu_processes(tag) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert qemu_processes(tag) == [], what


def clean_up_run(process: subprocess.Popen[Any], runtime: Path) -> None:
    """After a test that kills ``process``: it, and any QEMU of the runtime directory
    ``runtime`` (all started by that test), gone; the directory removed."""
    if process.poll() is None:
        process.kill()
    for pid in qemu_processes(str(runtime)):
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(runtime, ignore_errors=True)


def env_with(**overrides: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(overrides)
    return env


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def golden_file_digests(directory: Path) -> dict[str, str]:
    """sha256 of a golden snapshot's ram, state and disk."""
    return {name: file_sha256(directory / name) for name in ("ram", "state", "disk.qcow2")}


def copy_entries(target: Path, *entries: Path) -> Path:
    """A second cache at ``target`` holding copies of cache ``entries`` (each under its own
    kind's folder: images, golden, templates), made as another host would receive them:
    file by file, sparse files kept sparse, no keys of the first cache. Returns ``target``."""
    target.mkdir(mode=0o700, parents=True, exist_ok=True)
    for entry in entries:
        folder = target / entry.parent.name
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cp", "-a", "--sparse=always", str(entry), str(folder / entry.name)],
                       check=True, timeout=300)
    return target


def move_to_a_copy(second_cache: Path, monkeypatch: pytest.MonkeyPatch,
                   *more: Path) -> tuple[Image, Golden]:
    """The default image and its golden snapshot (made first if missing), copied with
    ``more`` entries into ``second_cache`` by :func:`copy_entries`, and ``SANDBOX_CACHE_DIR``
    pointed there: a test may then damage, rebuild or remake them without disturbing other
    tests' clones. Returns the first cache's image and golden snapshot."""
    sandbox.launch(IMAGE).close()
    image = get_image(IMAGE)
    golden = find_golden(image, sandbox.MachineSpec(image=IMAGE), resolve_accel("auto"))
    assert golden is not None, "no golden snapshot was made"
    copy_entries(second_cache, image.path, golden.path, *more)
    monkeypatch.setenv("SANDBOX_CACHE_DIR", str(second_cache))
    return image, golden


@pytest.fixture
def second_cache(tmp_path: Path) -> Iterator[Path]:
    """Where a test may make a second cache (another host's, as it were); removed after the
    test, sealed entries and all. ``SANDBOX_CACHE_DIR`` is the test's to point at it."""
    path = tmp_path / "second-cache"
    yield path
    if path.exists():
        subprocess.run(["chmod", "-R", "u+w", str(path)], check=False)
        shutil.rmtree(path, ignore_errors=True)


def host_path_mentions(entry: Path, host_path: str) -> list[str]:
    """The parts of cache entry ``entry`` that name ``host_path``: its files but the guest's
    RAM, kernel and initrd and the private key (the manifest, the device state, the console,
    the seed...), the first MiB of its qcow2 disk (the header: the backing file), and the
    backing file ``qemu-img info`` reads there."""
    found = []
    needle = host_path.encode()
    for file in sorted(entry.iterdir()):
        if file.name in ("ram", "vmlinuz", "initrd.img", "client_key"):
            continue
        with file.open("rb") as handle:
            data = handle.read(1 << 20) if file.suffix == ".qcow2" else handle.read()
        if needle in data:
            found.append(file.name)
    disk = entry / "disk.qcow2"
    info = subprocess.run(["qemu-img", "info", "--output=json", "-U", str(disk)],
                          capture_output=True, text=True, check=True, cwd="/")
    backing = json.loads(info.stdout).get("backing-filename", "")
    if host_path in backing:
        found.append(f"disk.qcow2 backing file {backing}")
    return found


def backing_chain(disk: Path) -> list[str]:
    """The files ``qemu-img info --backing-chain`` opens for ``disk``, in order."""
    info = subprocess.run(["qemu-img", "info", "--backing-chain", "--output=json", "-U",
                           str(disk)], capture_output=True, text=True, check=True, cwd="/")
    return [os.path.normpath(layer["filename"]) for layer in json.loads(info.stdout)]


# -- the ordinary account (tests/ordinary.py), for the tests that run as it -------------


@pytest.fixture(scope="session")
def wheelhouse() -> Iterator[Path]:
    directory = shared_tmp()
    try:
        build_wheelhouse(directory)
        yield directory
    finally:
        subprocess.run(["rm", "-rf", str(directory)], check=False)


@pytest.fixture(scope="session")
def account() -> Account:
    return ordinary_account()


@pytest.fixture(scope="session")
def account_home(account: Account) -> Iterator[Path]:
    """A working directory of the account's own, removed after the session."""
    work = account.make_workdir()
    try:
        yield work
    finally:
        account.remove(work)


@pytest.fixture(scope="session")
def account_bin(account: Account, account_home: Path, wheelhouse: Path) -> Path:
    """The bin directory of a virtualenv of the account's, with the package installed from
    the wheel: what the account runs, with nothing of this checkout in reach."""
    return install_from_wheelhouse(account, wheelhouse, account_home / "venv")
