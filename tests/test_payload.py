"""Big put/get/push through the machine's payload disk (sandbox.machine.payload), on real
guests: content and modes arrive intact, the bounds hold, the disk is emptied after each
transfer, a corrupted transfer is refused, and a machine without the fast path falls back
to SSH with one warning."""

from __future__ import annotations

import hashlib
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import sandbox
from sandbox.errors import ChannelError, GuestDataError, SandboxWarning
from sandbox.machine import payload


def _random_file(path: Path, size: int, mode: int = 0o640) -> Path:
    path.write_bytes(os.urandom(size))
    path.chmod(mode)
    return path


def _served(monkeypatch: pytest.MonkeyPatch, name: str) -> list[bool]:
    """Record whether the payload disk served each ``name`` transfer (else: SSH)."""
    served: list[bool] = []
    original = getattr(payload, name)

    def recording(*args: object) -> bool:
        served.append(original(*args))
        return served[-1]

    monkeypatch.setattr(payload, name, recording)
    return served


def _disk_blocks(vm: sandbox.Machine) -> int:
    assert vm.files is not None
    return vm.files.data_disk.stat().st_blocks


def test_a_big_put_arrives_intact_through_the_payload_disk(
        shared_vm: sandbox.Machine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Past 8 MiB: two pieces, each hashed by a vCPU of its own.
    local = _random_file(tmp_path / "big.bin", (9 << 20) + 123, 0o751)
    assert len(range(0, payload._padded(local.stat().st_size),
                     payload.piece_size(payload._padded(local.stat().st_size)))) == 2
    used = _served(monkeypatch, "put")
    shared_vm.put(local, "/root/big.bin")
    assert used == [True], "the payload disk did not serve it"
    answer = shared_vm.succeed("sha256sum /root/big.bin | cut -c1-64; stat -c '%a %s' "
                               "/root/big.bin; ls -a /root | grep -c sandbox-put || true")
    digest, mode_size, leftovers = answer.split("\n")[:3]
    assert digest == hashlib.sha256(local.read_bytes()).hexdigest()
    assert mode_size == f"751 {local.stat().st_size}"
    assert leftovers == "0"
    assert _disk_blocks(shared_vm) == 0, "the payload disk still holds the payload"


def test_a_big_get_comes_back_intact_and_bounded(
        shared_vm: sandbox.Machine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shared_vm.succeed("head -c 9000000 /dev/urandom > /root/out.bin")  # two pieces
    target = tmp_path / "out.bin"
    used = _served(monkeypatch, "get")
    shared_vm.get("/root/out.bin", target)
    assert used == [True]
    assert hashlib.sha256(target.read_bytes()).hexdigest() == \
        shared_vm.succeed("sha256sum /root/out.bin").split()[0]
    assert _disk_blocks(shared_vm) == 0
    small = tmp_path / "small"
    with pytest.raises(GuestDataError, match="larger than get's limit"):
        shared_vm.get("/root/out.bin", small, max_size=2 << 20)
    assert not small.exists() and not list(tmp_path.glob(".*.part"))
    # Small files, /proc files and directories keep the SSH path and its errors.
    shared_vm.get("/proc/cpuinfo", tmp_path / "cpuinfo")
    assert b"processor" in (tmp_path / "cpuinfo").read_bytes()
    with pytest.raises(ChannelError, match="is a directory in the guest"):
        shared_vm.get("/root", tmp_path / "dir")


def test_a_big_push_carries_a_tree_with_its_modes(
        shared_vm: sandbox.Machine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    used = _served(monkeypatch, "push")
    tree = tmp_path / "tree"
    (tree / "bin").mkdir(parents=True)
    _random_file(tree / "bin" / "tool", 2 << 20, 0o755)
    _random_file(tree / "data.bin", 3 << 20, 0o600)
    (tree / "link").symlink_to("data.bin")
    shared_vm.push(tree, "/opt/pushed")
    assert used == [True]
    listing = shared_vm.succeed("cd /opt/pushed && stat -c '%n %a' bin/tool data.bin && "
                                "readlink link && sha256sum bin/tool data.bin")
    lines = listing.splitlines()
    assert lines[:3] == ["bin/tool 755", "data.bin 600", "data.bin"], listing
    assert lines[3].split()[0] == hashlib.sha256((tree / "bin" / "tool").read_bytes()).hexdigest()
    assert lines[4].split()[0] == hashlib.sha256((tree / "data.bin").read_bytes()).hexdigest()
    assert _disk_blocks(shared_vm) == 0


def test_payloads_are_refused_when_what_arrived_differs(
        shared_vm: sandbox.Machine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The guest checks the content's sha256 against the host's before anything is renamed
    into place: a digest that does not match (here the host's, made wrong on purpose) leaves
    the old file as it was."""
    shared_vm.succeed("echo old > /root/guarded")
    pad = payload._Hashing.pad

    def wrong_pad(self: payload._Hashing) -> None:
        pad(self)
        self.digests[-1] = hashlib.sha256(b"not what was written").hexdigest()

    monkeypatch.setattr(payload._Hashing, "pad", wrong_pad)
    local = _random_file(tmp_path / "p.bin", 2 << 20)
    with pytest.raises(ChannelError, match="another sha256"):
        shared_vm.put(local, "/root/guarded")
    assert shared_vm.succeed("cat /root/guarded") == "old\n"
    assert shared_vm.succeed("ls -a /root | grep -c sandbox-put || true").strip() == "0"


def test_concurrent_transfers_take_turns(shared_vm: sandbox.Machine, tmp_path: Path) -> None:
    files = [_random_file(tmp_path / f"c{i}", (2 << 20) + i) for i in range(3)]
    with ThreadPoolExecutor(3) as pool:  # a failed put raises here
        list(pool.map(lambda i: shared_vm.put(files[i], f"/root/c{i}"), range(3)))
    sums = shared_vm.succeed("sha256sum /root/c0 /root/c1 /root/c2").split()[::2]
    assert sums == [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]


def test_without_a_payload_disk_transfers_use_ssh_and_say_so_once(
        built_image: object, tmp_path: Path) -> None:
    with sandbox.launch() as vm:
        assert vm.files is not None
        vm.files.data_disk.unlink()  # as a machine started by an earlier version
        local = _random_file(tmp_path / "x.bin", 2 << 20)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            vm.put(local, "/root/x.bin")
            vm.get("/root/x.bin", tmp_path / "back.bin")
        assert (tmp_path / "back.bin").read_bytes() == local.read_bytes()
        said = [w for w in caught if issubclass(w.category, SandboxWarning)]
        assert len(said) == 1 and "go over SSH" in str(said[0].message), said


def test_a_payload_the_host_has_no_room_for_goes_over_ssh(
        shared_vm: sandbox.Machine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The payload disk lives in the runtime directory (often a small tmpfs): what does not
    fit there takes the SSH path, quietly."""
    monkeypatch.setattr(payload, "_room", lambda machine: 0)
    used = _served(monkeypatch, "put")
    local = _random_file(tmp_path / "roomless.bin", 2 << 20)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SandboxWarning)
        shared_vm.put(local, "/root/roomless.bin")
        shared_vm.get("/root/roomless.bin", tmp_path / "back.bin")
    assert used == [False]
    assert (tmp_path / "back.bin").read_bytes() == local.read_bytes()
