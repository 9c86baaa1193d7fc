"""Machine state that moves between hosts: images, golden snapshots and templates pushed to a
real registry (Debian's docker-registry, tests/registry.py) from one cache and used from
another (another path, another account), with no build and no golden boot there."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import sandbox
from sandbox.imaging.image import Image, cached_image
from sandbox.imaging.recipe import find_recipe
from sandbox.share.artifact import Entry
from sandbox.share.oci import Registry
from sandbox.share.store import send
from sandbox.vm.accel import resolve_accel
from sandbox.vm.golden import locate
from sandbox.vm.spec import MachineSpec

from .conftest import IMAGE, ROOT, env_with, golden_file_digests, sandbox_cli
from .ordinary import Account
from .registry import PASSWORD, USER, RegistryServer, docker_config

TEMPLATE = f"dist-webapp-{os.getpid()}"  # one per xdist worker: each has its own registry


def registry_env(server: RegistryServer, config_dir: Path, repository: str,
                 **extra: str) -> dict[str, str]:
    config = docker_config(config_dir, server.host)
    return env_with(SANDBOX_REGISTRY=server.reference(repository),
                    DOCKER_CONFIG=str(config.parent), **extra)


def default_golden(image: Image) -> Path:
    """The golden snapshot clones of ``image`` with the default shape use here."""
    path = locate(image, MachineSpec.from_kwargs(image=IMAGE), resolve_accel("auto"))
    assert (path / "manifest.json").exists(), path
    return path


@pytest.fixture(scope="module")
def pushed(registry: RegistryServer, built_image: dict[str, Any],
           tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """debian-12 (image and golden snapshot) and a template pushed from the session's cache
    to repository ``dist`` of the test registry, with ``sandbox push``."""
    config_dir = tmp_path_factory.mktemp("docker")
    env = registry_env(registry, config_dir, "dist")
    with sandbox.launch(IMAGE) as vm:
        vm.succeed("echo pushed-state > /root/marker; systemd-run --unit=ticker sleep 100000")
        template = vm.save_template(TEMPLATE, key=str(time.time()))
    image = cached_image(find_recipe(IMAGE))
    assert image is not None
    golden = default_golden(image)
    pushed_image = sandbox_cli("push", IMAGE, env=env, timeout=900)
    assert pushed_image.returncode == 0, pushed_image.stderr
    pushed_template = sandbox_cli("push", "--template", TEMPLATE, env=env, timeout=900)
    assert pushed_template.returncode == 0, pushed_template.stderr
    return {"env": env, "config_dir": config_dir, "image": image, "golden": golden,
            "template": template, "push_output": pushed_image.stdout + pushed_template.stdout}


def test_a_second_push_sends_nothing(pushed: dict[str, Any]) -> None:
    again = sandbox_cli("push", IMAGE, "--template", TEMPLATE, env=pushed["env"])
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("already in") >= 3, again.stdout
    # The listings say what is local and what the registry holds.
    images = sandbox_cli("image", "list", "--format", "json", env=pushed["env"])
    row = next(r for r in json.loads(images.stdout) if r["path"] == str(pushed["image"].path))
    assert 0 < row["remote_size"] < row["size"], row
    table = sandbox_cli("template", "ls", env=pushed["env"]).stdout
    assert "REGISTRY" in table.splitlines()[0], table
    line = next(line for line in table.splitlines() if pushed["template"].id in line)
    assert "not pushed" not in line and re.search(r"\d+(\.\d+)?[KMG]", line), table


def test_an_ordinary_account_clones_pulled_entries_with_no_build_and_no_golden_boot(
        pushed: dict[str, Any], registry: RegistryServer, account: Account,
        account_bin: Path) -> None:
    """An empty cache of the ordinary account, at another path: the image, its golden
    snapshot and the template are pulled (byte for byte what was pushed), then cloned."""
    work = account.make_workdir()
    try:
        cache, project, docker = work / "cache", work / "project", work / "docker"
        account.run(["mkdir", str(cache), str(project), str(docker)], check=True)
        config = docker_config(Path(pushed["config_dir"]) / "account", registry.host)
        account.run(["/usr/bin/python3", "-c", f"open({str(docker / 'config.json')!r}, 'w')"
                     f".write({config.read_text()!r})"], check=True)
        extra = {"PATH": str(account_bin), "SANDBOX_CACHE_DIR": str(cache),
                 "SANDBOX_REGISTRY": registry.reference("dist"), "DOCKER_CONFIG": str(docker)}
        if account.is_me:
            extra["SANDBOX_RUNTIME_DIR"] = str(work / "run")
        env = account.env(**extra)

        def sandbox_as_account(*args: str) -> subprocess.CompletedProcess[str]:
            return account.run([str(account_bin / "sandbox"), *args], env=env, cwd=project,
                               timeout=600)

        doctor = sandbox_as_account("doctor")
        assert re.search(r"registry\s+answers\s+" + re.escape(registry.reference("dist")),
                         doctor.stdout), doctor.stdout + doctor.stderr

        ran = sandbox_as_account("run", "--", "cat", "/etc/os-release")
        assert ran.returncode == 0, ran.stderr
        assert "bookworm" in ran.stdout
        # Pulled, not built: no image build, no golden boot.
        assert "pulling" in ran.stderr, ran.stderr
        assert "golden snapshot (boot once" not in ran.stderr, ran.stderr
        assert "mmdebstrap" not in ran.stderr and "building" not in ran.stderr.lower(), \
            ran.stderr
        image: Path = pushed["image"].path
        theirs = cache / "images" / image.name
        assert json.loads((theirs / "manifest.json").read_text())["built_at"] == \
            pushed["image"].manifest["built_at"]
        golden: Path = pushed["golden"]
        assert golden_file_digests(cache / "golden" / golden.name) == \
            golden_file_digests(golden)
        ram = cache / "golden" / golden.name / "ram"
        assert ram.stat().st_blocks * 512 < ram.stat().st_size // 2, "the RAM file is not sparse"
        for path in (cache / "golden" / golden.name, theirs):
            assert path.stat().st_uid == account.uid

        # The template, by name: pulled with what it stands on, cloned with its state.
        cloned = sandbox_as_account("run", "--template", TEMPLATE, "--",
                                    "sh", "-c", "cat /root/marker; systemctl is-active ticker")
        assert cloned.returncode == 0, cloned.stderr
        assert cloned.stdout.split() == ["pushed-state", "active"], cloned.stdout
        listed = sandbox_as_account("template", "ls", "--format", "json")
        assert [t["name"] for t in json.loads(listed.stdout)] == [TEMPLATE], listed.stdout
        # Nothing of the pushing host's cache path is in the entries that landed.
        here = str(Path(os.environ.get("SANDBOX_CACHE_DIR", "/nonexistent")))
        for manifest in cache.glob("*/*/manifest.json"):
            assert here not in manifest.read_text(), manifest
    finally:
        account.remove(work)


def test_registry_failures_name_the_cause(pushed: dict[str, Any], registry: RegistryServer,
                                          tmp_path: Path) -> None:
    base = dict(pushed["env"], SANDBOX_CACHE_DIR=str(tmp_path / "cache"))
    wrong = dict(base, DOCKER_CONFIG=str(docker_config(
        tmp_path / "wrong", registry.host, USER, PASSWORD + "x").parent))
    refused = sandbox_cli("pull", IMAGE, env=wrong)
    assert refused.returncode == 2
    assert re.search(r"credentials|denied|unauthorized", refused.stderr, re.I), refused.stderr
    assert "docker login" in refused.stderr, refused.stderr

    missing = sandbox_cli("pull", "--template", "no-such-template", env=base)
    assert missing.returncode == 2
    assert "no template-latest-no-such-template" in missing.stderr, missing.stderr

    started = time.monotonic()
    down = sandbox_cli("pull", IMAGE, env=dict(base, SANDBOX_REGISTRY="127.0.0.1:9/x"))
    assert down.returncode == 2 and "did not answer" in down.stderr, down.stderr
    assert time.monotonic() - started < 60
    assert not (tmp_path / "cache" / "images").exists() or \
        not any((tmp_path / "cache" / "images").iterdir())


def test_a_corrupted_blob_is_refused_with_its_digest(pushed: dict[str, Any], tmp_path: Path,
                                                      request: pytest.FixtureRequest) -> None:
    """A blob changed in the registry's storage: the pull names the digest it should have
    had, and nothing of the entry is left. (A registry of its own: blobs are stored once
    for all repositories, and the other tests' copy must stay whole.)"""
    (tmp_path / "registry").mkdir()
    registry = RegistryServer(tmp_path / "registry", users={USER: PASSWORD}).start()
    request.addfinalizer(registry.stop)
    client = Registry(registry.reference("corrupt"), auth_file=docker_config(
        tmp_path / "docker", registry.host))
    golden = Entry("golden", pushed["golden"], json.loads(
        (pushed["golden"] / "manifest.json").read_text())["key"])
    send(client, [golden])
    manifest, _ = client.manifest(golden.tag) or ({}, "")
    state = next(layer for layer in manifest["layers"]
                 if layer["annotations"]["org.opencontainers.image.title"] == "state")
    blob = registry.blob_file(state["digest"])
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))
    cache = tmp_path / "cache"
    env = dict(registry_env(registry, tmp_path / "docker", "corrupt"),
               SANDBOX_CACHE_DIR=str(cache))
    script = textwrap.dedent(f"""
        from sandbox.share.store import receive, registry
        receive(registry(), {golden.tag!r}, "test")
    """)
    pulled = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, cwd=ROOT, timeout=300, check=False)
    assert pulled.returncode != 0
    assert f"should have digest {state['digest']}" in pulled.stderr, pulled.stderr[-2000:]
    assert not (cache / "golden" / pushed["golden"].name).exists()
    assert not list((cache / "downloads").glob("*.part"))


def test_a_pull_killed_half_way_leaves_nothing_and_the_next_one_completes_it(
        pushed: dict[str, Any], tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    env = dict(pushed["env"], SANDBOX_CACHE_DIR=str(cache))
    process = subprocess.Popen([sys.executable, "-m", "sandbox.cli", "pull", IMAGE], env=env,
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    parts: list[Path] = []
    while time.monotonic() < deadline and process.poll() is None:
        parts = [p for p in (cache / "downloads").glob("*.part") if p.stat().st_size > 4 << 20] \
            if (cache / "downloads").exists() else []
        if parts:
            break
        time.sleep(0.02)
    assert parts, "the pull finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    image: Path = pushed["image"].path
    assert not (cache / "images" / image.name).exists(), "a half-made image is visible"
    again = sandbox_cli("pull", IMAGE, env=env, timeout=600)
    assert again.returncode == 0, again.stderr
    assert (cache / "images" / image.name / "manifest.json").exists()
    assert not list((cache / "downloads").glob("*.part"))
    assert not list((cache / "images").glob(".tmp-*"))


def test_an_entry_from_another_qemu_version_is_a_miss_not_a_load(
        pushed: dict[str, Any], tmp_path: Path) -> None:
    """A host whose QEMU reports another version computes other keys: the registry's golden
    snapshot is not its, so it is not pulled (the first clone would make one)."""
    fake = tmp_path / "bin" / "qemu-system-x86_64"
    fake.parent.mkdir()
    real = subprocess.run(["sh", "-c", "command -v qemu-system-x86_64"], capture_output=True,
                          text=True, check=True).stdout.strip()
    fake.write_text(f'#!/bin/sh\n[ "$1" = --version ] && {{ echo "QEMU emulator version '
                    f'99.1.0"; exit 0; }}\nexec {real} "$@"\n')
    fake.chmod(0o755)
    env = dict(pushed["env"], SANDBOX_CACHE_DIR=str(tmp_path / "cache"), SANDBOX_QEMU=str(fake))
    pulled = sandbox_cli("pull", IMAGE, env=env, timeout=600)
    assert pulled.returncode == 0, pulled.stderr
    assert "has no golden snapshot of this host's default shape" in pulled.stdout, pulled.stdout
    assert not list((tmp_path / "cache" / "golden").glob("*/manifest.json"))


def test_export_and_import_carry_entries_as_one_file(pushed: dict[str, Any],
                                                     tmp_path: Path) -> None:
    out = tmp_path / "vm-cache.tar.zst"
    exported = sandbox_cli("export", IMAGE, "--template", TEMPLATE, "-o", str(out))
    assert exported.returncode == 0, exported.stderr
    env = env_with(SANDBOX_CACHE_DIR=str(tmp_path / "cache"))
    imported = sandbox_cli("import", str(out), env=env)
    assert imported.returncode == 0, imported.stderr
    golden: Path = pushed["golden"]
    assert golden_file_digests(tmp_path / "cache" / "golden" / golden.name) == \
        golden_file_digests(golden)
    assert (tmp_path / "cache" / "templates" / pushed["template"].id / "manifest.json").exists()


MATRIX_SUITE = '''
import pytest

@pytest.fixture(scope="session")
def prepared(vm_template):
    return vm_template("matrix-app", lambda vm: vm.succeed("echo ready > /srv/state"), key="m1")

@pytest.mark.parametrize("n", range(6))
def test_clone(vm_factory, prepared, n):
    vm = vm_factory(template=prepared)
    assert vm.succeed("cat /srv/state").strip() == "ready"
'''


def test_a_ci_matrix_of_three_runners_builds_each_entry_once(
        registry: RegistryServer, built_image: dict[str, Any], tmp_path: Path) -> None:
    """Three runners (own caches) start at once against one registry that has only the
    image, each running one pytest-split group: the golden snapshot and the template are
    each made by one runner and pulled by the others; every test runs once."""
    image = cached_image(find_recipe(IMAGE))
    assert image is not None
    env = registry_env(registry, tmp_path / "docker", "matrix", SANDBOX_PUSH="1")
    send(Registry(registry.reference("matrix"), auth_file=tmp_path / "docker" / "config.json"),
         [Entry("image", image.path, image.digest)])
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "test_matrix.py").write_text(MATRIX_SUITE)

    runtime = Path(tempfile.mkdtemp(prefix="matrix-", dir="/tmp"))  # short: socket paths

    def runner(group: int) -> subprocess.CompletedProcess[str]:
        runner_env = dict(env, SANDBOX_CACHE_DIR=str(tmp_path / f"cache{group}"),
                          SANDBOX_RUNTIME_DIR=str(runtime / str(group)))
        return subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:randomly",
             "--splits", "3", "--group", str(group), "-rA", "-q",
             f"--junitxml={tmp_path / f'junit{group}.xml'}", str(suite)],
            env=runner_env, cwd=suite, capture_output=True, text=True, timeout=900,
            check=False)

    try:
        with ThreadPoolExecutor(3) as pool:
            results = list(pool.map(runner, (1, 2, 3)))
    finally:
        shutil.rmtree(runtime, ignore_errors=True)
    for result in results:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ran = [line.split()[1] for result in results for line in result.stdout.splitlines()
           if line.startswith("PASSED ")]
    assert sorted(ran) == sorted(f"test_matrix.py::test_clone[{n}]" for n in range(6)), ran

    def made(kind: str) -> set[str]:
        """The distinct entries of ``kind`` in the three caches: a manifest (its creation
        time, boot and save timings, sizes) is the same only when one was pulled from the
        other's push."""
        return {m.read_text() for group in (1, 2, 3)
                for m in (tmp_path / f"cache{group}" / kind).glob("*/manifest.json")}

    goldens, templates = made("golden"), made("templates")
    assert len(goldens) == 1 and len(templates) == 1, (goldens, templates)
    for group in (1, 2, 3):
        assert len(list((tmp_path / f"cache{group}" / "golden").glob("*/manifest.json"))) == 1
        assert len(list((tmp_path / f"cache{group}" / "templates").glob("*/manifest.json"))) == 1


def test_a_registry_that_is_down_is_a_warning_and_a_local_build(
        built_image: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """With SANDBOX_REGISTRY pointing at nothing, a missing template is made here after a
    warning that names the registry, within a bound; the run does not fail."""
    from sandbox.errors import SandboxWarning
    from sandbox.machine.prepare import ensure_template

    dead = f"127.0.0.1:9/down-{os.getpid()}-{time.monotonic_ns()}"
    monkeypatch.setenv("SANDBOX_REGISTRY", dead)
    monkeypatch.setenv("SANDBOX_PUSH", "1")
    started = time.monotonic()
    with pytest.warns(SandboxWarning, match=rf"registry {re.escape(dead)} could not be used "
                                            r"\(.*did not answer.*\); .* is made here instead"):
        template = ensure_template(f"down-{os.getpid()}",
                                   lambda vm: vm.succeed("echo made-here > /srv/where"),
                                   key=str(time.time()))
    assert time.monotonic() - started < 120
    with sandbox.launch(template=template) as clone:
        assert clone.succeed("cat /srv/where") == "made-here\n"
