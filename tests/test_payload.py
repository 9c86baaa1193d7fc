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
    # Past 8 MiB, not a whole number of blocks; then onto tmpfs, where O_DIRECT is refused
    # and the guest copies through its page cache.
    local = _random_file(tmp_path / "big.bin", (9 << 20) + 123, 0o751)
    used = _served(monkeypatch, "put")
    shared_vm.put(local, "/root/big.bin")
    shared_vm.put(local, "/dev/shm/big.bin")
    assert used == [True, True], "the payload disk did not serve them"
    for remote, parent in (("/root/big.bin", "/root"), ("/dev/shm/big.bin", "/dev/shm")):
        answer = shared_vm.succeed(f"sha256sum {remote} | cut -c1-64; stat -c '%a %s' {remote}; "
                                   f"ls -a {parent} | grep -c sandbox-put || true")
        digest, mode_size, leftovers = answer.split("\n")[:3]
        assert digest == hashlib.sha256(local.read_bytes()).hexdigest(), remote
        assert mode_size == f"751 {local.stat().st_size}", remote
        assert leftovers == "0", remote
    shared_vm.succeed("rm /dev/shm/big.bin")
    assert _disk_blocks(shared_vm) == 0, "the payload disk still holds the payload"


def test_a_big_get_comes_back_intact_and_bounded(
        shared_vm: sandbox.Machine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shared_vm.succeed("head -c 9000000 /dev/urandom > /root/out.bin; "
                      "cp /root/out.bin /dev/shm/out.bin")  # tmpfs: read through its cache
    target = tmp_path / "out.bin"
    used = _served(monkeypatch, "get")
    shared_vm.get("/root/out.bin", target)
    shared_vm.get("/dev/shm/out.bin", tmp_path / "shm.bin")
    shared_vm.succeed("rm /dev/shm/out.bin")
    assert used == [True, True]
    assert hashlib.sha256(target.read_bytes()).hexdigest() == \
        shared_vm.succeed("sha256sum /root/out.bin").split()[0]
    assert (tmp_path / "shm.bin").read_bytes() == target.read_bytes()
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


def _tree(root: Path) -> Path:
    """A tree with what push must carry: nested and read-only directories, modes, a file
    larger than the guest's 4 MiB buffer, files that are not whole blocks, an empty file, a
    link, and times."""
    (root / "bin").mkdir(parents=True)
    _random_file(root / "bin" / "tool", 2 << 20, 0o755)
    _random_file(root / "data.bin", (9 << 20) + 5, 0o600)
    _random_file(root / "bin" / "odd", 4097, 0o640)
    (root / "empty").write_bytes(b"")
    (root / "link").symlink_to("data.bin")
    (root / "ro" / "deep").mkdir(parents=True)
    _random_file(root / "ro" / "deep" / "inside", 3000, 0o444)
    os.utime(root / "data.bin", ns=(1_500_000_000_123_456_789,) * 2)
    (root / "ro").chmod(0o555)
    return root


def _listing(vm: sandbox.Machine, where: str) -> list[str]:
    return vm.succeed(f"cd {where} && find . -mindepth 1 -printf '%P %y %m %s %U\\n' | sort; "
                      "stat -c %.9Y data.bin; readlink link; "
                      "sha256sum bin/tool data.bin bin/odd ro/deep/inside").splitlines()


def _expected(root: Path) -> list[str]:
    found = []
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        kind = "l" if path.is_symlink() else "d" if path.is_dir() else "f"
        size = info.st_size if kind == "f" else None
        found.append((str(path.relative_to(root)), kind, f"{info.st_mode & 0o7777:o}", size))
    return sorted(f"{name} {kind} {mode} " for name, kind, mode, _ in found)


def _check_tree(vm: sandbox.Machine, where: str, root: Path) -> None:
    lines = _listing(vm, where)
    entries = lines[:len(_expected(root))]
    assert [" ".join(e.split()[:3]) + " " for e in entries] == _expected(root), lines
    assert all(e.split()[4] == "0" for e in entries), f"not owned by root: {entries}"
    sizes = {e.split()[0]: int(e.split()[3]) for e in entries if e.split()[1] == "f"}
    assert sizes == {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*")
                     if p.is_file() and not p.is_symlink()}
    mtime, link, *sums = lines[len(entries):]
    # To the µs (tar's precision) where the guest's filesystem keeps fractions (an image
    # built without root may be ext2 with small inodes: whole seconds only).
    seconds, fraction = mtime.split(".")
    assert seconds == "1500000000" and fraction[:6] in ("123456", "000000"), mtime
    assert link == "data.bin"
    for line, name in zip(sums, ("bin/tool", "data.bin", "bin/odd", "ro/deep/inside"), strict=True):
        assert line.split()[0] == hashlib.sha256((root / name).read_bytes()).hexdigest(), name


def test_a_big_push_carries_a_tree_with_its_modes_times_and_links(
        shared_vm: sandbox.Machine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    used = _served(monkeypatch, "push")
    tree = _tree(tmp_path / "tree")
    shared_vm.succeed("mkdir -p /opt/pushed && echo stale > /opt/pushed/data.bin")
    shared_vm.push(tree, "/opt/pushed")  # over what is there
    shared_vm.push(tree, "/dev/shm/pushed")  # tmpfs: written through the page cache
    assert used == [True, True]
    _check_tree(shared_vm, "/opt/pushed", tree)
    _check_tree(shared_vm, "/dev/shm/pushed", tree)
    shared_vm.succeed("chmod -R u+w /dev/shm/pushed && rm -r /dev/shm/pushed")
    assert _disk_blocks(shared_vm) == 0


def test_a_push_without_the_agents_runner_or_without_python_takes_another_way(
        built_image: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The guest agent's runner unpacks a push; without it, a python3 of the push's own;
    without Python at all, one tar archive (known from then on)."""
    tree = _tree(tmp_path / "tree")
    used = _served(monkeypatch, "_push_tar")
    with sandbox.launch() as vm:
        runner = vm.succeed(f"[ -S {payload.RUNNER} ] && stat -c '%U %a' {payload.RUNNER}")
        assert runner == "root 700\n"  # root's alone
        vm.succeed(f"rm {payload.RUNNER}")
        vm.push(tree, "/opt/own-python")
        assert used == []
        vm.succeed("rm /usr/bin/python3")
        vm.push(tree, "/opt/pushed")
        vm.push(tree, "/opt/again")
        assert used == [True, True]  # the second knew at once
        for where in ("/opt/own-python", "/opt/pushed", "/opt/again"):
            _check_tree(vm, where, tree)


def test_payloads_are_refused_when_what_arrived_differs(
        shared_vm: sandbox.Machine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The host checks the sha256 of what the guest read back before a put is renamed into
    place: a digest that does not match (here the host's, made wrong on purpose) leaves the
    old file as it was."""
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


def test_a_get_or_push_whose_second_reading_differs_is_refused(
        shared_vm: sandbox.Machine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the guest read a second time (get) or read back (push) is checked by sha256 on
    the host: made to differ here, nothing is written on the host and the push fails."""
    monkeypatch.setattr(payload, "_digest_of", lambda *args: "0" * 64)
    shared_vm.succeed("head -c 2000000 /dev/urandom > /root/twice.bin")
    with pytest.raises(ChannelError, match="two reads of it had different sha256"):
        shared_vm.get("/root/twice.bin", tmp_path / "twice.bin")
    assert not list(tmp_path.iterdir())
    tree = tmp_path / "tree"
    tree.mkdir()
    _random_file(tree / "x.bin", 2 << 20)
    with pytest.raises(ChannelError, match="read them back have another sha256"):
        shared_vm.push(tree, "/root/twice")


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


def test_a_push_whose_files_change_while_laid_out_stops_the_guest_side(
        shared_vm: sandbox.Machine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The guest's side starts while the host lays the files out, and waits for its word: a
    file that shrank meanwhile (here: the manifest says it is larger) stops both, promptly."""
    tree = tmp_path / "tree"
    tree.mkdir()
    _random_file(tree / "shrinks.bin", 2 << 20)
    manifest = payload._manifest

    def grown(local_dir: Path) -> object:
        entries = manifest(local_dir)
        assert entries is not None
        kind, mode, mtime, size, offset, name, link, path = entries[0]
        return [(kind, mode, mtime, size + 4096, offset, name, link, path)]

    monkeypatch.setattr(payload, "_manifest", grown)
    with pytest.raises(ChannelError, match="shrinks.bin changed while it was read"):
        shared_vm.push(tree, "/root/stopped")
    assert shared_vm.succeed("ls /root/stopped 2>/dev/null | wc -l").strip() == "0"
    assert _disk_blocks(shared_vm) == 0
