"""pytest-xdist remote workers: ``pytest -d --tx ssh=...`` from this process (root) to the
ordinary account on 127.0.0.1, through an OpenSSH server of the test's own (unpacked into
``.tools/openssh-server`` by install.sh, never installed as a service). The workers run a
small suite of ``vm`` tests from the account's virtualenv with an empty cache of the
account's: they pull debian-12 and its golden snapshot from the test registry, build
nothing, and pass."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox.base.processes import spawn
from sandbox.imaging.image import cached_image
from sandbox.imaging.recipe import find_recipe

from .conftest import IMAGE, ROOT, sandbox_cli
from .ordinary import Account
from .registry import RegistryServer, docker_config, free_port
from .test_distribution import default_golden, registry_env

SSHD_TREE = ROOT / ".tools" / "openssh-server"
SSHD = SSHD_TREE / "usr" / "sbin" / "sshd"
REPOSITORY = "remote-workers"
WORKERS = 2
START_SECONDS = 15.0

#: The suite the remote workers run; ``{uid}``, ``{venv}`` and ``{cache}`` are filled in.
SUITE = '''
import os
import sys


def test_the_worker_runs_as_the_account_with_the_environment_of_the_spec(vm):
    assert os.environ["PYTEST_XDIST_WORKER"].startswith("gw")
    assert os.getuid() == {uid}
    assert sys.prefix == {venv!r}
    assert os.environ["SANDBOX_CACHE_DIR"] == {cache!r}
    assert "bookworm" in vm.succeed("cat /etc/os-release")


def test_a_file_written_in_the_guest(vm):
    vm.succeed("echo remote > /root/marker")
    assert vm.succeed("cat /root/marker").strip() == "remote"


def test_each_test_has_a_fresh_machine(vm):
    vm.fail("test -e /root/marker")
'''


def _prepare_host(account: Account) -> None:
    """What sshd (run as root) needs of the host and is not there without openssh-server:
    its privilege separation account and directory, as the package's postinst makes them;
    and a test account that is not *locked*: useradd leaves the password ``!``, which sshd
    without PAM refuses even for key logins, so it gets ``*`` (no password, not locked)."""
    if subprocess.run(["getent", "passwd", "sshd"], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir", "/run/sshd",
                        "--shell", "/usr/sbin/nologin", "sshd"], check=True)
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    for line in Path("/etc/shadow").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name == account.name and rest.startswith("!"):
            subprocess.run(["usermod", "--password", "*", account.name], check=True)


def _sshd_env() -> list[str]:
    """``env`` arguments that let the unpacked sshd find libwrap, unpacked beside it."""
    libraries = ":".join(str(p.parent) for p in SSHD_TREE.glob("usr/lib/*/libwrap.so.0"))
    return ["env", f"LD_LIBRARY_PATH={libraries}"]


def _wait_for_banner(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"sshd exited with status {process.returncode}: "
                               f"{log.read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as connection:
                if connection.recv(64).startswith(b"SSH-"):
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"sshd did not answer on port {port}: {log.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def sshd(account: Account, tmp_path_factory: pytest.TempPathFactory,
         ) -> Iterator[dict[str, Any]]:
    """An sshd on 127.0.0.1 that lets in the account only, with a key made here; the
    ssh_config that reaches it (its host key pinned in a known_hosts file)."""
    if os.geteuid() != 0:
        pytest.skip("sshd needs root for privilege separation (and to log in as another "
                    "account); run the suite as root, as CI does")
    if not SSHD.exists():
        pytest.fail(f"{SSHD} is missing: run ./install.sh", pytrace=False)
    _prepare_host(account)
    directory = tmp_path_factory.mktemp("sshd")
    host_key, client_key = directory / "host_ed25519", directory / "client_ed25519"
    for key in (host_key, client_key):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "sandbox-test",
                        "-f", str(key)], check=True)
    # sshd reads authorized keys as the account: they are the account's, in its home.
    keys_dir = account.make_workdir()
    authorized = keys_dir / "authorized_keys"
    account.write(authorized, client_key.with_suffix(".pub").read_text())
    port = free_port()
    config = directory / "sshd_config"
    config.write_text(textwrap.dedent(f"""\
        ListenAddress 127.0.0.1
        Port {port}
        HostKey {host_key}
        PidFile {directory / "sshd.pid"}
        AuthorizedKeysFile {authorized}
        AllowUsers {account.name}
        UsePAM no
        PubkeyAuthentication yes
        PasswordAuthentication no
        KbdInteractiveAuthentication no
        PermitRootLogin no
        X11Forwarding no
        AllowTcpForwarding no
        """))
    checked = subprocess.run([*_sshd_env(), str(SSHD), "-t", "-f", str(config)],
                             capture_output=True, text=True, check=False)
    assert checked.returncode == 0, checked.stderr
    log = directory / "sshd.log"
    with log.open("wb") as out:
        # sshd re-executes itself for each connection: it needs its absolute path.
        process = spawn([*_sshd_env(), str(SSHD), "-D", "-e", "-f", str(config)],
                        die_with_parent=True, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_for_banner(port, process, log)
        known_hosts = directory / "known_hosts"
        known_hosts.write_text(f"[127.0.0.1]:{port} "
                               f"{host_key.with_suffix('.pub').read_text()}")
        ssh_config = directory / "ssh_config"
        ssh_config.write_text(textwrap.dedent(f"""\
            Host 127.0.0.1
                Port {port}
                User {account.name}
                IdentityFile {client_key}
                IdentitiesOnly yes
                UserKnownHostsFile {known_hosts}
                StrictHostKeyChecking yes
                BatchMode yes
                LogLevel ERROR
            """))
        yield {"ssh_config": ssh_config, "log": log, "port": port}
    finally:
        process.terminate()  # by the pid it started
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        account.remove(keys_dir)


@pytest.fixture(scope="module")
def pushed_image(registry: RegistryServer, built_image: dict[str, Any],
                 tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """debian-12, image and golden snapshot, pushed from the session's cache to repository
    ``remote-workers`` of the test registry with ``sandbox push``."""
    env = registry_env(registry, tmp_path_factory.mktemp("docker"), REPOSITORY)
    image = cached_image(find_recipe(IMAGE))
    assert image is not None
    try:
        golden = default_golden(image)
    except AssertionError:  # the session has not booted this image yet
        import sandbox

        with sandbox.launch(IMAGE):
            pass
        golden = default_golden(image)
    pushed = sandbox_cli("push", IMAGE, env=env, timeout=900)
    assert pushed.returncode == 0, pushed.stderr
    return {"image": image, "golden": golden}


def test_remote_xdist_workers_over_ssh_pull_from_the_registry_and_build_nothing(
        sshd: dict[str, Any], pushed_image: dict[str, Any], registry: RegistryServer,
        account: Account, account_bin: Path, tmp_path: Path) -> None:
    work = account.make_workdir()
    try:
        # The cache does not exist yet: the first worker makes it (private), then pulls.
        suite, cache, docker = work / "suite", work / "cache", work / "docker"
        account.run(["mkdir", str(suite), str(docker)], check=True)
        account.write(suite / "pytest.ini", "[pytest]\n")
        account.write(suite / "test_in_remote_vms.py", SUITE.format(
            uid=account.uid, venv=str(account_bin.parent), cache=str(cache)))
        config = docker_config(tmp_path / "docker", registry.host)
        account.write(docker / "config.json", config.read_text())
        # The account's venv has pytest-xdist (from the wheelhouse), as a remote worker needs.
        spec = "//".join([
            f"ssh_config={sshd['ssh_config']}", f"ssh={account.name}@127.0.0.1",
            f"python={account_bin / 'python'}", f"chdir={suite}",
            f"env:SANDBOX_REGISTRY={registry.reference(REPOSITORY)}",
            f"env:DOCKER_CONFIG={docker}", f"env:SANDBOX_CACHE_DIR={cache}"])
        env = {name: value for name, value in os.environ.items()
               if not name.startswith(("PYTEST_", "SANDBOX_"))}
        # The controller (this process's pytest and xdist) collects nothing itself: the
        # workers collect the suite in chdir, which the account can read (no --rsyncdir: it
        # is deprecated). xdist still copies its own pytest and _pytest there (it always does
        # for a remote worker), which come first on the worker's sys.path. No cache provider:
        # the controller is root in a directory of the account's.
        started = time.monotonic()
        ran = subprocess.run(
            [sys.executable, "-m", "pytest", "-d", "--tx", f"{WORKERS}*{spec}",
             "-p", "no:cacheprovider", "-p", "no:randomly", "-v"],
            cwd=suite, env=env, capture_output=True, text=True, timeout=600, check=False)
        elapsed = time.monotonic() - started
        output = ran.stdout + ran.stderr
        assert ran.returncode == 0, output[-6000:] + sshd["log"].read_text()[-2000:]
        assert "3 passed" in ran.stdout, output[-4000:]
        for worker in range(WORKERS):  # each gateway came up in the suite directory
            assert re.search(rf"^\[gw{worker}\] linux Python 3\.\S+ cwd: {re.escape(str(suite))}$",
                             ran.stdout, re.M), ran.stdout[-4000:]

        # Pulled, not built: the account's cache holds exactly the pushed image (its
        # built_at) and golden snapshot (its key), the account's own.
        image, golden = pushed_image["image"], pushed_image["golden"]
        images = [p.name for p in (cache / "images").iterdir() if not p.name.startswith(".")]
        assert images == [image.path.name], images
        theirs = json.loads((cache / "images" / image.path.name / "manifest.json").read_text())
        assert theirs["built_at"] == image.manifest["built_at"], theirs
        goldens = [p.name for p in (cache / "golden").iterdir() if not p.name.startswith(".")]
        assert goldens == [golden.name], goldens
        assert json.loads((cache / "golden" / golden.name / "manifest.json").read_text())["key"] \
            == json.loads((golden / "manifest.json").read_text())["key"]
        for entry in (cache / "images" / image.path.name, cache / "golden" / golden.name):
            assert entry.stat().st_uid == account.uid
        print(f"{WORKERS} remote workers ran the suite in {elapsed:.1f} s")
    finally:
        account.remove(work)
