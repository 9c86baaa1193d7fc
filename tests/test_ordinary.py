"""Where users are: an ordinary account, and the plugin pip-installed from a wheel into a
project of their own, far from this checkout (real builds and real guests)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import IMAGE, file_sha256
from .ordinary import (
    ROOT,
    Account,
    shared_tmp,
)

needs_root = pytest.mark.skipif(os.geteuid() != 0,
                                reason="needs a second account, which only root can make")

THREE_TESTS = '''
import pytest

def test_guest_runs_as_root(vm):
    assert vm.succeed("id -u") == "0\\n"

def test_changes_stay_in_this_vm(vm):
    assert vm.fail("test -e /root/marker") is not None
    vm.succeed("touch /root/marker")

@pytest.mark.vm(memory="1G")
def test_two_independent_vms(vm_factory):
    a, b = vm_factory(), vm_factory()
    a.succeed("touch /root/only-a")
    b.fail("test -e /root/only-a")
'''

TEMPLATE_TESTS = '''
import pytest

@pytest.fixture(scope="session")
def prepared(vm_template):
    return vm_template("acct-tpl", "echo prepared > /root/prepared && "
                       "systemd-run --unit idler sleep 1d", key="k")

def test_two_machines_on_a_private_network(vm_factory, vm_network):
    net = vm_network()
    a, b = vm_factory(name="a", networks=[net]), vm_factory(name="b", networks=[net])
    assert b.succeed("getent hosts a").split() == [a.address(net), "a"]

@pytest.mark.parametrize("n", range(3))
def test_a_clone_of_the_template(vm_factory, prepared, n):
    vm = vm_factory(template=prepared)
    assert vm.succeed("cat /root/prepared; systemctl is-active idler") == "prepared\\nactive\\n"
    vm.succeed("rm /root/prepared")
'''

ONE_TEST = '''
def test_kernel(vm):
    assert vm.succeed("uname -s") == "Linux\\n"
'''


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A fresh sticky, world-writable directory like /tmp, as TMPDIR for the account."""
    path = Path(tempfile.mkdtemp(prefix="sandbox-tmp-", dir="/tmp"))
    path.chmod(0o1777)
    try:
        yield path
    finally:
        subprocess.run(["rm", "-rf", str(path)], check=False)


def qemu_of(uid: int, marker: str = "") -> list[str]:
    """Command lines of running QEMU processes of ``uid`` (holding ``marker``)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            owner = proc.stat().st_uid
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if owner == uid and "qemu-system" in cmdline and marker in cmdline:
            found.append(cmdline)
    return found


def leaked_runs(runtime: Path) -> list[str]:
    """Run directories whose owner process is gone (others may be live runs of the same
    account, a suite running beside this one)."""
    from sandbox.base.processes import process_alive

    leaked = []
    for run in sorted(runtime.glob("run-*")) if runtime.is_dir() else []:
        try:
            owner = json.loads((run / "owner.json").read_text())
        except (OSError, ValueError):
            leaked.append(str(run))
            continue
        if not process_alive(owner["pid"], owner.get("start_ticks")):
            leaked.append(str(run))
    return leaked


def golden_digests(cache: Path) -> dict[str, str]:
    return {f"{p.parent.name}/{p.name}": file_sha256(p)
            for p in sorted(cache.glob("golden/*/*"))
            if p.name in ("ram", "state", "disk.qcow2")}


def test_an_ordinary_account_builds_clones_tests_and_keeps_named_machines(
        account: Account, account_bin: Path) -> None:
    """The whole product as an ordinary account, from an empty cache of its own, with the
    package installed from a wheel and nothing of this checkout in reach."""
    work = account.make_workdir()
    bin_dir = account_bin
    try:
        cache, project = work / "cache", work / "project"
        account.run(["mkdir", str(cache), str(project)], check=True)
        extra: dict[str, str] = {"PATH": str(bin_dir), "SANDBOX_CACHE_DIR": str(cache)}
        if account.is_me:  # a private runtime directory, so that other tests' VMs differ
            extra["SANDBOX_RUNTIME_DIR"] = str(work / "run")
        env = account.env(**extra)

        def sandbox(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
            return account.run([str(bin_dir / "sandbox"), *args], env=env, cwd=project,
                               timeout=timeout)

        where = account.run([str(bin_dir / "python"), "-c",
                             "import sandbox; print(sandbox.__file__)"], env=env, cwd=project)
        assert where.stdout.startswith(str(bin_dir.parent)), where

        doctor = sandbox("doctor")
        assert doctor.returncode == 0, doctor.stdout + doctor.stderr
        assert re.search(r"image builds\s+ready\s+as .* in a user namespace", doctor.stdout), \
            doctor.stdout
        assert re.search(r"runtime\s+private", doctor.stdout), doctor.stdout
        if Path("/dev/kvm").exists():
            assert re.search(r"kvm access\s+(yes|no)", doctor.stdout), doctor.stdout

        built = sandbox("image", "build", IMAGE)
        assert built.returncode == 0, built.stderr
        assert "built in" in built.stderr and "genext2fs" in built.stderr, built.stderr
        manifest = json.loads(sandbox("image", "inspect", IMAGE).stdout)
        assert manifest["builder"].startswith("mmdebstrap --mode=unshare")

        ran = sandbox("run", "--", "id", "-u")
        assert (ran.returncode, ran.stdout) == (0, "0\n"), ran.stderr
        # Owners and modes survived the unprivileged build into the guest.
        modes = sandbox("run", "--", "stat", "-c", "%a %u %g %n", "/usr/bin/passwd",
                        "/etc/shadow", "/root/.ssh/authorized_keys")
        assert modes.stdout.splitlines() == ["4755 0 0 /usr/bin/passwd",
                                             "640 0 42 /etc/shadow",
                                             "600 0 0 /root/.ssh/authorized_keys"], modes
        golden_before = golden_digests(cache)
        assert golden_before, "no golden snapshot was made"

        account.write(project / "test_three.py", THREE_TESTS)
        suite = account.run([str(bin_dir / "pytest"), "-n", "2", "-p", "no:cacheprovider",
                             "test_three.py"], env=env, cwd=project)
        assert "3 passed" in suite.stdout, suite.stdout + suite.stderr
        account.write(project / "test_template.py", TEMPLATE_TESTS)
        suite = account.run([str(bin_dir / "pytest"), "-n", "2", "-p", "no:cacheprovider",
                             "test_template.py"], env=env, cwd=project)
        assert "4 passed" in suite.stdout, suite.stdout + suite.stderr
        assert len(list(cache.glob("templates/acct-tpl-*"))) == 1

        # This suite's own check that clones never change a golden snapshot (50 clones
        # write disk and memory; sha256 of ram, state and disk.qcow2 before and after),
        # run by the account against its golden snapshot.
        account.run(["mkdir", str(project / "tests")], check=True)
        for name in ("__init__.py", "conftest.py", "ordinary.py", "registry.py",
                     "test_golden.py"):
            account.write(project / "tests" / name, (ROOT / "tests" / name).read_text())
        golden_check = account.run(
            [str(bin_dir / "pytest"), "-p", "no:cacheprovider",
             "tests/test_golden.py::test_golden_files_unchanged_after_50_clones_wrote_disk_and_"
             "memory"], env=env, cwd=project)
        assert "1 passed" in golden_check.stdout, golden_check.stdout + golden_check.stderr

        # The users' own tools, as the account: testinfra, a playbook against two clones
        # and an HTML report of a failure.
        account.write(project / "test_tools.py", TOOLS_TESTS)
        suite = account.run([str(bin_dir / "pytest"), "-p", "no:cacheprovider",
                             "--html=report.html", "test_tools.py"],
                            env=dict(env, LC_ALL="C.UTF-8"), cwd=project)
        assert "1 failed, 2 passed" in suite.stdout, suite.stdout[-4000:] + suite.stderr
        assert html_extra_titles(project / "report.html") == ["console tail", "guest commands"]

        up = sandbox("up", "acct-dev")
        assert up.returncode == 0, up.stderr
        inventory = sandbox("inventory", "acct-dev", "--format", "json")
        hosts = json.loads(inventory.stdout)["all"]["hosts"]
        assert hosts["acct-dev"]["ansible_user"] == "root", inventory.stderr
        executed = sandbox("exec", "acct-dev", "--", "id", "-un")
        assert (executed.returncode, executed.stdout) == (0, "root\n"), executed.stderr
        assert "acct-dev" in sandbox("ls").stdout
        down = sandbox("down", "acct-dev")
        assert down.returncode == 0, down.stderr

        after = golden_digests(cache)  # the networked machines added one of their own
        assert {key: after.get(key) for key in golden_before} == golden_before  # 60 clones on
        for golden in [*cache.glob("golden/[!.]*/"), *cache.glob("templates/[!.]*/")]:
            for entry in golden.iterdir():
                writable = entry.stat().st_mode & 0o222
                assert (writable == 0o200) if entry.name == "ram" else not writable, entry
        strangers = [str(p) for p in [cache, *cache.rglob("*")]
                     if p.lstat().st_uid != account.uid]
        assert strangers == [], f"cache files not owned by {account.name}: {strangers[:5]}"
        # Every QEMU of this test has its cache in its command line (kernel, disks).
        assert qemu_of(account.uid, str(cache)) == []
        runtime = Path(extra.get("SANDBOX_RUNTIME_DIR", f"/tmp/sandbox-{account.uid}"))
        assert leaked_runs(runtime) == []
    finally:
        account.remove(work)


TOOLS_TESTS = '''
import os, subprocess, sys
from pathlib import Path

import sandbox

def test_testinfra(vm):
    host = vm.testinfra()
    assert host.service("sandbox-sshd").is_running
    assert host.file("/etc/hostname").content_string == "sandbox\\n"
    assert host.package("dropbear-bin").is_installed
    assert host.socket("tcp://0.0.0.0:22").is_listening

def test_playbook(vm_factory, tmp_path):
    web, db = vm_factory(name="web"), vm_factory(name="db")
    inventory = sandbox.ansible_inventory([web, db], tmp_path / "hosts.yml")
    (tmp_path / "site.yml").write_text(
        "- hosts: all\\n  tasks:\\n    - ansible.builtin.copy:\\n"
        "        content: 'hello from {{ inventory_hostname }}'\\n"
        "        dest: /etc/sandbox-hello\\n")
    subprocess.run([str(Path(sys.executable).parent / "ansible-playbook"), "-i",
                    str(inventory), "site.yml"], cwd=tmp_path, check=True,
                   env=dict(os.environ, ANSIBLE_HOME=str(tmp_path / "ansible")))
    assert web.succeed("cat /etc/sandbox-hello") == "hello from web"
    assert db.succeed("cat /etc/sandbox-hello") == "hello from db"

def test_reported(vm):
    vm.run("echo '<i>escaped</i>'")
    assert vm.succeed("hostname") == "elsewhere"
'''


def html_extra_titles(report: Path) -> list[str]:
    """The titles of the sandbox blocks among a pytest-html report's extras, suffix only."""
    import html
    import re as regex

    blob = regex.search(r'data-jsonblob="([^"]*)"', report.read_text())
    assert blob, "no data in the HTML report"
    rows = [r for rows in json.loads(html.unescape(blob.group(1)))["tests"].values()
            for r in rows]
    titles = [regex.search(r"<summary>(.*?)</summary>", extra["content"]).group(1)  # type: ignore[union-attr]
              for row in rows for extra in row.get("extras", [])
              if 'class="sandbox"' in extra.get("content", "")]
    return sorted(title.split(": ", 1)[1] for title in titles)


APPLIANCE_TEST = '''
import pytest

@pytest.mark.vm(image="appliance")
def test_on_the_appliance(vm):
    assert vm.succeed("cat /etc/hostname; id -un") == "appliance\\ndebian\\n"
'''


def test_an_ordinary_account_imports_a_disk_image_and_runs_it(
        account: Account, account_bin: Path) -> None:
    """Bring your own image as an ordinary account, package from the wheel: a raw disk made
    elsewhere (the suite's foreign cloud image) imported, booted by firmware, cloned."""
    from .foreign import foreign_disk

    shared = shared_tmp()
    work = account.make_workdir()
    try:
        disk = shared / "appliance.raw"
        subprocess.run(["cp", "--sparse=always", str(foreign_disk()), str(disk)], check=True)
        disk.chmod(0o644)
        cache, project = work / "cache", work / "project"
        account.run(["mkdir", str(cache), str(project)], check=True)
        extra = {"PATH": str(account_bin), "SANDBOX_CACHE_DIR": str(cache)}
        if account.is_me:
            extra["SANDBOX_RUNTIME_DIR"] = str(work / "run")
        env = account.env(**extra)

        def sandbox(*args: str) -> subprocess.CompletedProcess[str]:
            return account.run([str(account_bin / "sandbox"), *args], env=env, cwd=project)

        imported = sandbox("image", "import", str(disk), "--name", "appliance")
        assert imported.returncode == 0, imported.stderr
        assert "imported from raw" in imported.stderr
        ran = sandbox("run", "--image", "appliance", "--", "sh", "-c",
                      "cat /etc/hostname; id -un; sudo -n id -u")
        assert (ran.returncode, ran.stdout) == (0, "appliance\ndebian\n0\n"), ran.stderr
        account.write(project / "test_appliance.py", APPLIANCE_TEST)
        suite = account.run([str(account_bin / "pytest"), "-p", "no:cacheprovider",
                             "test_appliance.py"], env=env, cwd=project)
        assert "1 passed" in suite.stdout, suite.stdout + suite.stderr
        seeds = list(cache.glob("images/appliance-*/seed.iso"))
        assert len(seeds) == 1 and seeds[0].stat().st_uid == account.uid
        assert oct(seeds[0].stat().st_mode)[-3:] == "400"  # it holds the pinned host key
        assert qemu_of(account.uid, str(cache)) == []
    finally:
        account.remove(work)
        subprocess.run(["rm", "-rf", str(shared)], check=False)


def test_the_wheel_in_a_fresh_virtualenv_runs_vms_from_any_directory(
        built_image: dict[str, Any], wheelhouse: Path, tmp_path: Path) -> None:
    """pip install of the wheel into another project's virtualenv: the recipes come with
    it, the CLI and the plugin work from a directory that has nothing of this checkout."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"),
                    "install", "-q", "--disable-pip-version-check", "--no-index",
                    "--find-links", str(wheelhouse), "pytest-qemu-sandbox"],
                   check=True, capture_output=True, timeout=600)
    project = tmp_path / "project"
    project.mkdir()
    (project / "test_one.py").write_text(ONE_TEST)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHON", "PYTEST", "VIRTUAL_ENV"))}
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '')}"

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(argv), cwd=project, env=env, capture_output=True,
                              text=True, timeout=600, check=False)

    where = run(str(venv / "bin" / "python"), "-c", "import sandbox; print(sandbox.__file__)")
    assert where.stdout.startswith(str(venv)), where
    assert str(ROOT) not in where.stdout
    images = run(str(venv / "bin" / "sandbox"), "image", "list", "--format", "json")
    assert images.returncode == 0, images.stderr
    recipe = next(e for e in json.loads(images.stdout) if e["name"] == IMAGE)
    assert recipe["recipe"].startswith(str(venv)), recipe
    ran = run(str(venv / "bin" / "sandbox"), "run", "--", "true")
    assert ran.returncode == 0, ran.stderr
    suite = run(str(venv / "bin" / "pytest"), "-p", "no:cacheprovider", "test_one.py")
    assert "1 passed" in suite.stdout, suite.stdout + suite.stderr


# -- the runtime directory and the reaper ------------------------------------------------------

@needs_root
def test_a_runtime_directory_another_account_made_is_refused(
        account: Account, account_bin: Path, open_tmp: Path) -> None:
    tmp = open_tmp
    planted = tmp / f"sandbox-{account.uid}"
    planted.mkdir(mode=0o777)  # made by root, before the account ever ran the sandbox
    result = account.run([str(account_bin / "sandbox"), "ls"], env=account.env(TMPDIR=str(tmp)))
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"the runtime directory {planted} belongs to root" in result.stderr
    assert "SANDBOX_RUNTIME_DIR" in result.stderr
    assert list(planted.iterdir()) == []


@needs_root
def test_a_runtime_directory_that_is_a_symlink_is_refused(
        account: Account, account_bin: Path, open_tmp: Path) -> None:
    tmp = open_tmp
    target = tmp / "elsewhere"
    target.mkdir(mode=0o700)
    os.chown(target, account.uid, -1)
    (tmp / f"sandbox-{account.uid}").symlink_to(target)
    result = account.run([str(account_bin / "sandbox"), "ls"], env=account.env(TMPDIR=str(tmp)))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "is a symbolic link" in result.stderr and "refusing to follow it" in result.stderr
    assert list(target.iterdir()) == []


@needs_root
def test_the_reaper_never_kills_another_accounts_process(
        account: Account, tmp_path: Path) -> None:
    from sandbox.base.processes import kill_tagged

    stranger = subprocess.Popen(["runuser", "-u", account.name, "--", "sleep", "60"])
    pid = None
    try:
        deadline = time.monotonic() + 10
        while pid is None and time.monotonic() < deadline:
            for proc in Path("/proc").iterdir():
                try:
                    if proc.name.isdigit() and proc.stat().st_uid == account.uid and \
                            (proc / "cmdline").read_bytes() == b"sleep\x0060\x00":
                        pid = int(proc.name)
                except OSError:
                    continue
            time.sleep(0.02)
        assert pid is not None
        pidfile = tmp_path / "qemu.pid"
        pidfile.write_text(f"{pid}\n")
        # The pid file names a process whose command line carries the tag, but the process
        # is another account's: it is left alone.
        assert not kill_tagged(pidfile, "sleep")
        assert Path(f"/proc/{pid}").exists()
    finally:
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
        stranger.wait(timeout=10)


@needs_root
def test_a_cache_of_another_account_fails_at_once_with_the_fix(
        account: Account, account_bin: Path, open_tmp: Path) -> None:
    roots = open_tmp / "roots-cache"
    roots.mkdir()
    started = time.monotonic()
    result = account.run([str(account_bin / "sandbox"), "run", "--", "true"],
                         env=account.env(SANDBOX_CACHE_DIR=str(roots)), timeout=60)
    assert time.monotonic() - started < 30
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"the cache directory {roots} belongs to root, not to you ({account.name})" \
        in result.stderr
    assert "chown -R" in result.stderr and list(roots.iterdir()) == []


@needs_root
def test_install_sh_without_sudo_says_what_to_ask_an_administrator_for(
        account: Account, account_home: Path) -> None:
    """install.sh as an account that may not use sudo, on a host that lacks a package (a
    stand-in dpkg-query says genext2fs is not installed): it stops before anything else and
    prints the exact commands for an administrator."""
    checkout = account_home / "install-check"
    fake = checkout / "fake-bin"
    account.run(["mkdir", "-p", str(fake)], check=True)
    account.write(checkout / "install.sh", (ROOT / "install.sh").read_text())
    account.write(fake / "dpkg-query", '#!/bin/sh\n'
             'for last; do :; done\n'
             '[ "$last" = genext2fs ] && exit 1\n'
             'echo "install ok installed"\n')
    account.run(["chmod", "+x", str(checkout / "install.sh"), str(fake / "dpkg-query")],
                check=True)
    result = account.run(["bash", str(checkout / "install.sh")],
                         env=account.env(PATH=str(fake)), cwd=checkout, timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Ask an administrator to run:" in result.stderr
    assert re.search(r"apt-get install .*--no-install-recommends genext2fs\n", result.stderr)
    assert not (checkout / ".venv").exists()


def test_unprivileged_build_errors_name_the_cause_and_leave_nothing(
        account: Account, account_bin: Path, account_home: Path) -> None:
    """The unprivileged pipeline's own failure paths: a missing package (mmdebstrap fails,
    genext2fs sees a cut stream) and a disk too small for the tree (genext2fs runs out)."""
    cache, recipes = account_home / "errors-cache", account_home / "errors-recipes"
    account.run(["mkdir", "-p", str(cache), str(recipes)], check=True)
    account.write(recipes / "bad-package.toml",
             'packages = ["linux-image-cloud-amd64", "no-such-package-zz9"]\n')
    account.write(recipes / "tiny-disk.toml",
             'packages = ["linux-image-cloud-amd64"]\ndisk_size = "100M"\n')
    env = account.env(PATH=str(account_bin), SANDBOX_CACHE_DIR=str(cache))
    bad = account.run([str(account_bin / "sandbox"), "image", "build",
                       str(recipes / "bad-package.toml")], env=env)
    assert bad.returncode == 2, bad.stderr
    assert "not found in the archive: no-such-package-zz9" in bad.stderr
    tiny = account.run([str(account_bin / "sandbox"), "image", "build",
                        str(recipes / "tiny-disk.toml")], env=env)
    assert tiny.returncode == 2, tiny.stderr
    assert re.search(r"disk_size 100M is too small for the tree \(\d+(\.\d+)?M\); set "
                     r"disk_size to at least", tiny.stderr), tiny.stderr
    assert [p.name for p in (cache / "images").iterdir() if not p.name.startswith(".locks")] \
        == []
