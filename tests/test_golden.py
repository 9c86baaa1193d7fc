"""Golden snapshots and clones: identity, isolation, rebuild on damage (real guests)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

import sandbox
from sandbox.base.paths import cache_dir
from sandbox.errors import SandboxWarning
from sandbox.guest.keys import cache_key
from sandbox.imaging.image import get_image
from sandbox.vm.accel import resolve_accel
from sandbox.vm.golden import Golden, find_golden, golden_root, locate

from .conftest import (
    IMAGE,
    backing_chain,
    golden_file_digests,
    host_path_mentions,
    move_to_a_copy,
)


def located(**shape: Any) -> Path:
    """Where the golden snapshot that launch(**shape) clones from is."""
    return locate(get_image(IMAGE), sandbox.MachineSpec(image=IMAGE, **shape),
                  resolve_accel("auto"))


def golden_for(**shape: Any) -> Golden:
    golden = find_golden(get_image(IMAGE), sandbox.MachineSpec(image=IMAGE, **shape),
                         resolve_accel("auto"))
    assert golden is not None, "no golden snapshot was made"
    return golden


def digests(golden: Golden) -> dict[str, str]:
    return golden_file_digests(golden.path)


def test_clones_restore_with_their_own_identity(built_image: dict[str, Any]) -> None:
    with sandbox.launch(IMAGE) as a, sandbox.launch(IMAGE) as b:
        # Saved settled: no idle udev worker that every clone would end a moment later.
        assert a.succeed("grep -sx '(udev-worker)' /proc/[0-9]*/comm | wc -l").strip() == "0"
        assert a.restore_seconds is not None and b.restore_seconds is not None
        bytes_a = a.succeed("head -c 32 /dev/urandom | od -An -tx1")
        bytes_b = b.succeed("head -c 32 /dev/urandom | od -An -tx1")
        assert bytes_a != bytes_b
        for vm in (a, b):
            assert abs(float(vm.succeed("date +%s.%N")) - time.time()) < 2
            assert vm.succeed("uptime -s")  # the clone is a running system, not a fresh boot


#: The test of tests/test_ordinary.py that runs the test below as the ordinary account, from
#: a wheel, against that account's own golden snapshot.
ORDINARY = "test_ordinary.py::test_an_ordinary_account_builds_clones_tests_and_keeps_named_machines"


def test_golden_files_unchanged_after_50_clones_wrote_disk_and_memory(
        built_image: dict[str, Any], request: pytest.FixtureRequest) -> None:
    if any(item.nodeid.endswith(ORDINARY) for item in request.session.items):
        pytest.skip(f"run in this session by {ORDINARY} (50 clones take 2 minutes)")
    sandbox.launch(IMAGE).close()  # the golden snapshot exists
    golden = golden_for()
    before = digests(golden)
    # Sealed read-only, except ram for its owner: QEMU 7.2 opens it read-write (see golden.py).
    assert {n: (golden.path / n).stat().st_mode & 0o222 for n in before} == \
        {"ram": 0o200, "state": 0, "disk.qcow2": 0}
    for i in range(50):
        with sandbox.launch(IMAGE) as vm:
            vm.succeed(f"head -c 1M /dev/urandom > /root/junk{i} && "
                       "dd if=/dev/zero of=/dev/shm/fill bs=1M count=16 2>/dev/null && sync")
    assert digests(golden) == before
    assert golden.path.stat().st_mode & 0o222 == 0


def _damage(golden: Golden, part: str) -> None:
    golden.path.chmod(0o755)
    target = golden.path / part
    target.chmod(0o644)
    if part == "state":  # the same size, so that only loading it can tell
        target.write_bytes(b"x" * target.stat().st_size)
    elif part == "ram":  # a partial copy
        with target.open("r+b") as handle:
            handle.truncate(4096)
    else:
        target.write_text("{not json")


@pytest.mark.parametrize(("part", "warning"), [
    ("state", "did not load .*loading the golden snapshot failed"),
    ("ram", "did not load .*ram file has 4096 bytes"),
    ("manifest.json", "no readable manifest"),
])
def test_a_damaged_golden_snapshot_is_rebuilt_with_a_warning(
        built_image: dict[str, Any], part: str, warning: str, second_cache: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The image and its golden snapshot copied into a cache of the test's own, damaged
    # there: machines of other tests (xdist workers) are not disturbed, and the one boot
    # is the rebuild's.
    move_to_a_copy(second_cache, monkeypatch)
    golden = golden_for()
    assert golden.path.parent == second_cache / "golden"
    _damage(golden, part)
    with pytest.warns(SandboxWarning, match=warning), sandbox.launch(IMAGE) as vm:
        assert vm.succeed("echo alive") == "alive\n"
    rebuilt = golden_for()
    rebuilt.check()
    assert rebuilt.manifest["created_at"] != golden.manifest["created_at"]
    assert not [p for p in golden_root().glob(".tmp-*") if str(os.getpid()) in p.name]


def test_a_snapshot_with_nics_is_made_from_the_plain_one_without_a_boot(
        built_image: dict[str, Any], second_cache: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """In a cache holding only the plain golden snapshot, the first clone on networks gets
    one made from it: its guest rescanned its PCI bus for the NICs (and never met the boot
    disk's slot, which clones keep hidden), its SSH server armed again; its clones reach
    each other, and the plain snapshot is untouched."""
    _, plain = move_to_a_copy(second_cache, monkeypatch)
    before = digests(golden_for())
    with sandbox.Network() as net, sandbox.launch(IMAGE, name="a", networks=[net]) as a:
        assert a.source is not None and a.source.path.parent == second_cache / "golden"
        assert a.source.manifest["derived_from"] == plain.path.name
        assert "boot_seconds" not in a.source.manifest
        assert a.source.ssh_prelude is not None and a.agent_answered
        assert a.succeed("ls /sys/class/net").split() == ["eth0", "eth1", "lo"]
        assert a.succeed("ls /sys/block | grep ^vd").split() == ["vda", "vdb"]  # no vdc: boot disk
        with sandbox.launch(IMAGE, name="b", networks=[net]) as b:
            assert b.source is not None and b.source.path == a.source.path
            assert b.succeed("python3 -c \"import socket; print(socket.create_connection("
                             "('a', 22), 5).recv(7))\"") == "b'SSH-2.0'\n"
    assert digests(golden_for()) == before


def test_cold_boot_path_stays(built_image: dict[str, Any]) -> None:
    with sandbox.launch(IMAGE, cold=True) as vm:
        assert vm.restore_seconds is None
        assert float(vm.succeed("cut -d' ' -f1 /proc/uptime")) < 300
        assert vm.succeed("uname -s") == "Linux\n"


def test_golden_key_follows_the_machine_shape(built_image: dict[str, Any]) -> None:
    base = located()
    assert located(network="user") == base
    assert located(memory="2G") != base
    assert located(cpus=1) != base
    assert located(qemu_args=["-device", "virtio-balloon-pci"]) != base


def test_a_named_cpu_model_boots_from_a_golden_snapshot_of_its_own(
        built_image: dict[str, Any]) -> None:
    with sandbox.launch(IMAGE, cpu="Nehalem") as vm:
        assert vm.restore_seconds is not None
        model = vm.succeed("grep -m1 'model name' /proc/cpuinfo")
        assert "Nehalem" in model, model
        assert " sse4_2 " in vm.succeed("grep -m1 flags /proc/cpuinfo") + " "
        assert vm.succeed("echo alive") == "alive\n"
    nehalem = golden_for(cpu="Nehalem")
    assert nehalem.path == located(cpu="Nehalem") != located()
    assert "Nehalem" in nehalem.manifest["shape"]
    with sandbox.launch(IMAGE) as vm:
        assert "Nehalem" not in vm.succeed("grep -m1 'model name' /proc/cpuinfo")


def test_a_cache_copied_elsewhere_clones_with_no_rebuild_and_the_image_key(
        built_image: dict[str, Any], second_cache: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The image and golden snapshot entries, copied file by file into a cache at another
    path with another cache key (another host's, as it were), clone there as they are."""
    original = str(cache_dir())
    image, golden = move_to_a_copy(second_cache, monkeypatch)
    assert cache_key().public_line != image.manifest["client_key"]
    moved = second_cache / "golden" / golden.path.name
    with sandbox.launch(IMAGE) as vm:
        assert vm.succeed("echo moved") == "moved\n"
        assert vm.source is not None and vm.source.path == moved
        assert vm.image is not None and vm.image.path == second_cache / "images" / image.path.name
        assert vm.key_path == vm.image.path / "client_key"
        assert vm.image.manifest["built_at"] == image.manifest["built_at"]
        assert vm.source.manifest["created_at"] == golden.manifest["created_at"]
    assert sorted(p.name for p in (second_cache / "golden").iterdir()
                  if not p.name.startswith(".")) == [golden.path.name]
    assert sorted(p.name for p in (second_cache / "images").iterdir()
                  if not p.name.startswith(".")) == [image.path.name]
    assert backing_chain(moved / "disk.qcow2") == [
        str(moved / "disk.qcow2"), str(second_cache / "images" / image.path.name / "disk.qcow2")]
    assert golden.manifest["image_entry"] == image.path.name
    for entry in (moved, second_cache / "images" / image.path.name):
        assert host_path_mentions(entry, original) == []
