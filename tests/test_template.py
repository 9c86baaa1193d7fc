"""Prepared-state templates: saved from running machines, cloned per test (real guests)."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import sandbox
from sandbox.base.paths import cache_dir
from sandbox.errors import SandboxWarning, TemplateError
from sandbox.imaging.image import get_image
from sandbox.machine.prepare import ensure_template
from sandbox.vm.accel import resolve_accel
from sandbox.vm.golden import discard_golden, find_golden
from sandbox.vm.template import find_template, templates

from .conftest import (
    IMAGE,
    backing_chain,
    copy_entries,
    golden_file_digests,
    host_path_mentions,
    move_to_a_copy,
    sandbox_cli,
)

#: Set up in the template: a file, and a process that keeps running.
SETUP = ("echo prepared > /root/prepared && "
         "nohup sh -c 'while sleep 1; do :; done' >/dev/null 2>&1 & echo $! > /root/loop.pid")
CHECK = "cat /root/prepared; kill -0 $(cat /root/loop.pid) && echo loop-alive"


def unique(stem: str) -> str:
    """A template name of this test process (xdist workers share the cache)."""
    return f"{stem}-{os.getpid()}"


@pytest.fixture(scope="module")
def prepared(built_image: dict[str, Any]) -> Iterator[sandbox.Template]:
    name = unique("prepared")
    with sandbox.launch(IMAGE) as vm:
        vm.succeed(SETUP)
        template = vm.save_template(name, key="v1")
        # the machine it was saved from runs on, with its SSH session
        assert vm.succeed("echo after-save > /root/after; cat /root/after") == "after-save\n"
    yield template
    sandbox.remove_template(name)


def test_a_clone_starts_with_the_files_and_processes_of_the_template(
        prepared: sandbox.Template) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", SandboxWarning)  # identity refreshed, no fallback
        with sandbox.launch(template=prepared.name) as clone:
            assert clone.succeed(CHECK) == "prepared\nloop-alive\n"
            clone.fail("test -e /root/after")  # written after the save
            assert clone.source is not None and clone.source.path == prepared.path


def test_clones_are_pristine_and_have_their_own_identity(prepared: sandbox.Template) -> None:
    with sandbox.launch(template=prepared) as first:
        first.succeed("echo dirty > /root/prepared; rm /root/loop.pid")
        one = first.succeed("head -c 16 /dev/urandom | od -An -tx1; date +%s")
    with sandbox.launch(template=prepared.id) as second:
        assert second.succeed(CHECK) == "prepared\nloop-alive\n"
        two = second.succeed("head -c 16 /dev/urandom | od -An -tx1; date +%s")
    assert one.splitlines()[0] != two.splitlines()[0]
    assert abs(int(two.splitlines()[1]) - int(one.splitlines()[1])) < 120


def test_a_template_clones_where_no_boot_disk_can_be_made(prepared: sandbox.Template,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    """A template saved where clones carry a boot disk (sandbox.vm.bootdisk) clones on a host
    without the tools to make one: there the clone boots with -kernel, and an empty disk
    holds the boot disk's slot, so the saved device list still loads."""
    from sandbox.vm import bootdisk

    monkeypatch.setattr(bootdisk, "missing_tools", lambda: ["syslinux"])
    with sandbox.launch(template=prepared) as clone:
        assert clone.qemu is not None and clone.qemu.plan is not None
        command = clone.qemu.plan.command()
        assert clone.qemu.plan.boot_disk is None and "-kernel" in command
        assert any(argument.startswith("driver=null-co") for argument in command)
        assert clone.succeed(CHECK) == "prepared\nloop-alive\n"


def test_template_files_unchanged_after_clones_wrote_disk_and_memory(
        prepared: sandbox.Template) -> None:
    before = golden_file_digests(prepared.path)
    for _ in range(5):
        with sandbox.launch(template=prepared) as clone:
            clone.succeed("dd if=/dev/urandom of=/root/noise bs=1M count=16 && "
                          "python3 -c 'b = bytearray(64 << 20); b[::4096] = b\"x\" * (16384)'")
    assert golden_file_digests(prepared.path) == before
    assert oct(prepared.path.stat().st_mode & 0o777) == "0o555"


def test_templates_stack_and_list(prepared: sandbox.Template) -> None:
    name = unique("stacked")
    with sandbox.launch(template=prepared) as vm:
        vm.succeed("echo second-layer > /root/second")
        stacked = vm.save_template(name)
    try:
        assert stacked.base == f"template:{prepared.id}"
        with sandbox.launch(template=name) as clone:
            assert clone.succeed("cat /root/prepared /root/second") == \
                "prepared\nsecond-layer\n"
        listed = {t.id: t for t in templates()}
        assert prepared.id in listed and stacked.id in listed
        assert listed[stacked.id].key is None and listed[prepared.id].key == "v1"
        assert not listed[stacked.id].stale
        # RAM on disk: the pages the guest used, not the whole of its memory
        assert stacked.manifest["ram_bytes_used"] < stacked.manifest["memory_mib"] << 20
    finally:
        sandbox.remove_template(name)
    with pytest.raises(TemplateError, match="no template named"):
        sandbox.launch(template=name)


def test_a_changed_key_makes_another_template_and_the_same_key_replaces(
        built_image: dict[str, Any]) -> None:
    name = unique("keyed")
    try:
        with sandbox.launch(IMAGE) as vm:
            first = vm.save_template(name, key="a")
            again = vm.save_template(name, key="a")
            other = vm.save_template(name, key="b")
        assert first.id == again.id != other.id
        assert sorted(t.key for t in templates() if t.name == name) == ["a", "b"]
        assert find_template(name).key == "b"  # the newest
    finally:
        assert len(sandbox.remove_template(name)) == 2


def test_bad_requests_are_named(prepared: sandbox.Template,
                                built_image: dict[str, Any]) -> None:
    with pytest.raises(TemplateError, match=r"another machine shape: memory_mib=2048"):
        sandbox.launch(template=prepared, memory="2G")
    with pytest.raises(TemplateError, match="template name 'two words'"), \
            sandbox.launch(IMAGE) as vm:
        vm.save_template("two words")
    with pytest.raises(sandbox.SandboxError, match="name or a sandbox.Template"):
        sandbox.launch(template=42)


def test_a_failed_setup_names_its_step_and_saves_nothing(built_image: dict[str, Any]) -> None:
    name = unique("broken")
    with pytest.raises(TemplateError, match=r"failed at step 2 of 3 \('exit 7'\)"):
        ensure_template(name, ["true", "exit 7", "true"], key="k")
    assert not [t for t in templates() if t.name == name]


def test_a_damaged_template_fails_at_once_and_its_maker_heals_it(
        built_image: dict[str, Any]) -> None:
    name = unique("healed")
    made = ensure_template(name, "echo healed-setup > /root/setup", key="k")
    try:
        assert ensure_template(name, "false", key="k").id == made.id  # cached: no setup run
        ram = made.path / "ram"
        made.path.chmod(0o755)
        os.truncate(ram, 4096)
        made.path.chmod(0o555)
        with pytest.raises(TemplateError, match=r"is damaged \(its ram file has 4096 bytes"):
            sandbox.launch(template=name)
        with pytest.warns(SandboxWarning, match="is damaged"):
            healed = ensure_template(name, "echo healed-setup > /root/setup", key="k")
        with sandbox.launch(template=healed) as clone:
            assert clone.succeed("cat /root/setup") == "healed-setup\n"
    finally:
        sandbox.remove_template(name)


def test_a_template_whose_base_was_made_again_is_stale(
        built_image: dict[str, Any], second_cache: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Its disk is an overlay on the golden snapshot it came from: once that is made again,
    clones would read a different base. Listed as stale, never cloned; its maker remakes it.
    (In a cache of the test's own holding copies of the image and its golden snapshot, so
    that other tests' clones keep theirs.)"""
    move_to_a_copy(second_cache, monkeypatch)
    spec = sandbox.MachineSpec(image=IMAGE)
    name = unique("stale")
    made = ensure_template(name, "echo one > /root/one", key="k")
    try:
        golden = find_golden(get_image(IMAGE), spec, resolve_accel("auto"))
        assert golden is not None and golden.path.parent == second_cache / "golden"
        discard_golden(golden)
        sandbox.launch(IMAGE).close()  # the golden snapshot, made again
        assert find_template(made.id).stale_reason() == \
            f"its base golden {golden.path.name} was made again since"
        with pytest.raises(TemplateError, match="is stale"):
            sandbox.launch(template=name)
        remade = ensure_template(name, "echo one > /root/one", key="k")
        assert remade.id != made.id and not remade.stale
        with sandbox.launch(template=name) as clone:
            assert clone.succeed("cat /root/one") == "one\n"
    finally:
        sandbox.remove_template(name)


def test_a_template_copied_to_another_cache_is_found_and_cloned_there(
        built_image: dict[str, Any], second_cache: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Image, golden snapshot and template entries, copied file by file into a cache at
    another path with another cache key: the template's maker computes the same id there and
    reuses it (no setup), its clones run, and a template saved from one stacks on it."""
    name = unique("portable")
    made = ensure_template(name, SETUP, key="k")
    try:
        image = get_image(IMAGE)
        golden = find_golden(image, sandbox.MachineSpec(image=IMAGE), resolve_accel("auto"))
        assert golden is not None
        original = str(cache_dir())
        copy_entries(second_cache, image.path, golden.path, made.path)
        assert len(made.manifest["key"]) == 64
        assert made.id == f"{name}-{made.manifest['key'][:16]}"
        assert made.manifest["base"] == {"kind": "golden", "entry": golden.path.name,
                                         "created_at": golden.manifest["created_at"]}
        with monkeypatch.context() as patch:
            patch.setenv("SANDBOX_CACHE_DIR", str(second_cache))

            def not_again(vm: sandbox.Machine) -> None:
                raise AssertionError("the setup ran again: the copied template was not found")

            found = ensure_template(name, not_again, key="k")
            assert found.id == made.id and found.path == second_cache / "templates" / made.id
            assert found.manifest["created_at"] == made.manifest["created_at"]
            with sandbox.launch(template=name) as clone:
                assert clone.succeed(CHECK) == "prepared\nloop-alive\n"
                assert clone.key_path == second_cache / "images" / image.path.name / "client_key"
                clone.succeed("echo stacked > /root/stacked")
                stacked = clone.save_template(f"{name}-on", key="k")
            assert stacked.manifest["base"]["entry"] == made.id
            with sandbox.launch(template=stacked) as clone:
                assert clone.succeed("cat /root/prepared /root/stacked") == "prepared\nstacked\n"
            assert backing_chain(stacked.path / "disk.qcow2") == [
                str(stacked.path / "disk.qcow2"), str(found.path / "disk.qcow2"),
                str(second_cache / "golden" / golden.path.name / "disk.qcow2"),
                str(second_cache / "images" / image.path.name / "disk.qcow2")]
            entries = [p for kind in ("images", "golden", "templates")
                       for p in sorted((second_cache / kind).iterdir())
                       if not p.name.startswith(".")]
            assert len(entries) == 4  # nothing was made again
            for entry in entries:
                assert host_path_mentions(entry, original) == [], entry.name
                assert host_path_mentions(entry, str(second_cache)) == [], entry.name
    finally:
        sandbox.remove_template(name)


def test_content_key_follows_content(tmp_path: Path) -> None:
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "install.sh").write_text("echo 1\n")
    key = sandbox.content_key(tmp_path / "app", "make install")
    assert key == sandbox.content_key(str(tmp_path / "app"), "make install")
    assert key != sandbox.content_key(tmp_path / "app", "make install2")
    (tmp_path / "app" / "install.sh").write_text("echo 2\n")
    assert key != sandbox.content_key(tmp_path / "app", "make install")
    with pytest.raises(TemplateError, match="does not exist"):
        sandbox.content_key(tmp_path / "missing")


def test_cli_saves_a_named_machine_and_clones_it(built_image: dict[str, Any]) -> None:
    name, machine = unique("cli-tpl"), f"tplsrc-{os.getpid()}"
    assert sandbox_cli("up", machine).returncode == 0
    try:
        assert sandbox_cli("exec", machine, "--", "sh", "-c",
                           "echo from-cli > /root/cli").returncode == 0
        saved = sandbox_cli("template", "save", machine, name, "--key", "k1")
        assert saved.returncode == 0, saved.stderr
        assert "saved template" in saved.stdout
        # the source machine runs on
        assert sandbox_cli("exec", machine, "--", "true").returncode == 0
    finally:
        sandbox_cli("down", machine)
    try:
        listed = json.loads(sandbox_cli("template", "ls", "--format", "json").stdout)
        mine = [t for t in listed if t["name"] == name]
        assert len(mine) == 1 and mine[0]["key"] == "k1" and mine[0]["stale"] is False
        run = sandbox_cli("run", "--template", name, "--", "cat", "/root/cli")
        assert (run.returncode, run.stdout) == (0, "from-cli\n"), run.stderr
        up = sandbox_cli("up", machine, "--template", name)
        assert up.returncode == 0, up.stderr
        try:
            assert sandbox_cli("exec", machine, "--", "cat", "/root/cli").stdout == "from-cli\n"
        finally:
            sandbox_cli("down", machine)
    finally:
        removed = sandbox_cli("template", "rm", name)
        assert removed.returncode == 0 and "removed template" in removed.stdout
    missing = sandbox_cli("run", "--template", name, "--", "true")
    assert missing.returncode == 2 and "no template named" in missing.stderr
