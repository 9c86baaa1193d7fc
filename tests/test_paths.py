"""The places the sandbox keeps things, host tools and host readiness checks (pure logic and
the local file system; no guests)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from sandbox.base.paths import RUNTIME_LEAF, cache_dir, find_tool, runtime_dir, tool_env
from sandbox.errors import HostError
from sandbox.host.access import kvm_access_problem, subordinate_range, unprivileged_build_problems
from sandbox.imaging.recipe import builtin_recipes, known_recipes


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name in ("SANDBOX_RUNTIME_DIR", "XDG_RUNTIME_DIR"):
        monkeypatch.delenv(name, raising=False)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    return tmp


def test_runtime_dir_is_made_private_under_tmp(clean_env: Path) -> None:
    path = runtime_dir()
    assert path == clean_env / f"sandbox-{os.getuid()}"
    info = path.lstat()
    assert stat.S_ISDIR(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o700
    assert info.st_uid == os.getuid()
    assert runtime_dir() == path  # and accepted again


def test_runtime_dir_prefers_a_private_session_directory(
        clean_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    session = tmp_path / "run-user"
    session.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(session))
    assert runtime_dir() == session / RUNTIME_LEAF
    # One that is not private to this account (su keeps another user's) is passed over.
    session.chmod(0o755)
    assert runtime_dir() == clean_env / f"sandbox-{os.getuid()}"


def test_runtime_dir_open_to_others_is_refused(clean_env: Path) -> None:
    loose = clean_env / f"sandbox-{os.getuid()}"
    loose.mkdir()
    loose.chmod(0o755)
    with pytest.raises(HostError, match=r"is open to other accounts \(mode 0755\).*chmod 700"):
        runtime_dir()


def test_runtime_dir_symlink_is_refused(clean_env: Path, tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.mkdir(mode=0o700)
    (clean_env / f"sandbox-{os.getuid()}").symlink_to(target)
    with pytest.raises(HostError, match="is a symbolic link .*refusing to follow it"):
        runtime_dir()
    (clean_env / f"sandbox-{os.getuid()}").unlink()
    (clean_env / f"sandbox-{os.getuid()}").symlink_to(tmp_path / "missing")
    with pytest.raises(HostError, match="is a symbolic link"):
        runtime_dir()


def test_runtime_dir_override_is_checked_too(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    made = tmp_path / "deep" / "run"
    monkeypatch.setenv("SANDBOX_RUNTIME_DIR", str(made))
    assert runtime_dir() == made and stat.S_IMODE(made.stat().st_mode) == 0o700
    made.chmod(0o775)
    with pytest.raises(HostError, match="SANDBOX_RUNTIME_DIR"):
        runtime_dir()


def test_cache_of_another_account_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if os.geteuid() == 0:
        foreign = tmp_path / "foreign-cache"
        foreign.mkdir()
        os.chown(foreign, 65534, 65534)
    else:
        foreign = Path("/usr/share")  # root's
    monkeypatch.setenv("SANDBOX_CACHE_DIR", str(foreign))
    with pytest.raises(HostError, match=r"belongs to .*not to you.*chown -R"):
        cache_dir()


def test_cache_under_a_file_is_a_clear_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("SANDBOX_CACHE_DIR", str(tmp_path / "file" / "cache"))
    with pytest.raises(HostError, match="is a file, not a directory"):
        cache_dir()


def test_system_tools_are_found_outside_an_ordinary_path(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/usr/local/bin:/usr/bin:/bin")
    mke2fs = find_tool("mke2fs")
    assert mke2fs is not None and "/sbin/" in mke2fs
    assert find_tool("no-such-tool-zz9") is None
    assert tool_env()["PATH"].split(":")[:3] == ["/usr/local/bin", "/usr/bin", "/bin"]
    assert "/usr/sbin" in tool_env()["PATH"].split(":")


def test_subordinate_ranges_are_read_by_name_or_uid(tmp_path: Path) -> None:
    import pwd

    me = pwd.getpwuid(os.getuid()).pw_name
    table = tmp_path / "subuid"
    table.write_text(f"someone:100000:65536\n{me}:165536:65536\n")
    assert subordinate_range("uid", table) == (165536, 65536)
    table.write_text(f"{os.getuid()}:300000:1000\n")
    assert subordinate_range("uid", table) == (300000, 1000)
    table.write_text("someone:100000:65536\n")
    assert subordinate_range("uid", table) is None


def test_unprivileged_build_problems_name_their_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    import sandbox.host.access as host

    monkeypatch.setattr(host, "subordinate_range", lambda kind, path=None: None)
    problems = unprivileged_build_problems()
    assert any("no subordinate uid range in /etc/subuid" in p and "usermod --add-subuids" in p
               for p in problems), problems
    monkeypatch.setattr(host, "subordinate_range", lambda kind, path=None: (100000, 1000))
    assert any("only 1000 subordinate gids" in p for p in unprivileged_build_problems())
    real = host.find_tool
    monkeypatch.setattr(host, "find_tool", lambda name: None if name == "newuidmap" else real(name))
    monkeypatch.setattr(host, "subordinate_range", lambda kind, path=None: (100000, 65536))
    assert any("newuidmap is missing: sudo apt-get install uidmap" in p
               for p in unprivileged_build_problems())


def test_apparmor_restriction_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    import sandbox.host.access as host

    real = host._sysctl
    monkeypatch.setattr(host, "_sysctl", lambda name: "1" if "apparmor" in name else real(name))
    monkeypatch.setattr(host, "subordinate_range", lambda kind, path=None: (100000, 65536))
    text = " ".join(unprivileged_build_problems())
    assert "apparmor_restrict_unprivileged_userns" in text and "userns," in text


def test_kvm_access_problem_names_group_or_udev_fix(tmp_path: Path) -> None:
    device = tmp_path / "kvm"
    device.write_text("")
    device.chmod(0o666)
    assert kvm_access_problem(str(device)) is None
    if os.geteuid() == 0:
        pytest.skip("root opens any file: the refusal needs an ordinary account")
    device.chmod(0o000)
    problem = kvm_access_problem(str(device))
    assert problem is not None and "sudo" in problem


def test_builtin_recipes_are_found_from_any_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SANDBOX_IMAGES_PATH", raising=False)
    builtin = builtin_recipes()
    assert builtin is not None and (builtin / "debian-12.toml").is_file()
    assert known_recipes()["debian-12"].parent == builtin


def test_a_failed_probe_is_reported_but_not_kept(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sandbox.vm.accel as accel
    from sandbox.errors import HostError as Failed

    monkeypatch.setenv("SANDBOX_CACHE_DIR", str(tmp_path / "cache"))
    calls = []

    def no_kernel() -> Path:
        calls.append(1)
        raise Failed("the download failed")

    monkeypatch.setattr(accel, "probe_kernel", no_kernel)
    monkeypatch.setattr(accel, "_kvm_device_problem", lambda: None)  # KVM looks usable
    first = accel.accel_verdict()
    assert first.accel == "tcg" and not first.conclusive
    assert "could not probe KVM (asked again next time): the download failed" in first.reason
    assert not list((tmp_path / "cache" / "host").glob("accel-*.json"))
    accel.accel_verdict()
    assert len(calls) == 2  # probed again, not answered from a cache


def test_cache_dir_is_made_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDBOX_CACHE_DIR", str(tmp_path / "deep" / "cache"))
    path = cache_dir()
    assert stat.S_IMODE(path.lstat().st_mode) == 0o700


def test_an_open_cache_of_mine_is_closed_once_with_a_notice(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import warnings

    from sandbox.errors import SandboxWarning

    made_by_an_earlier_release = tmp_path / "cache"
    made_by_an_earlier_release.mkdir()
    made_by_an_earlier_release.chmod(0o755)
    monkeypatch.setenv("SANDBOX_CACHE_DIR", str(made_by_an_earlier_release))
    with pytest.warns(SandboxWarning, match=r"was open to other accounts \(mode 0755.*it is "
                                            r"now private \(mode 0700\).*shown once"):
        assert cache_dir() == made_by_an_earlier_release
    assert stat.S_IMODE(made_by_an_earlier_release.stat().st_mode) == 0o700
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cache_dir() == made_by_an_earlier_release  # no second notice


def test_a_cache_that_is_a_symlink_is_refused_with_its_target(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "real-cache"
    target.mkdir(mode=0o700)
    link = tmp_path / "cache"
    link.symlink_to(target)
    monkeypatch.setenv("SANDBOX_CACHE_DIR", str(link))
    with pytest.raises(HostError, match=rf"the cache directory {link} is a symbolic link .*"
                                        rf"refusing to follow it.*SANDBOX_CACHE_DIR={target}"):
        cache_dir()
    assert stat.S_IMODE(target.stat().st_mode) == 0o700  # and nothing was changed through it


@pytest.mark.skipif(os.geteuid() != 0, reason="needs a second account, which only root can make")
def test_another_account_can_neither_read_the_cache_nor_hold_its_locks(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache where other accounts can reach it (under /tmp, a traversable home): a golden
    snapshot's RAM cannot be read, and its lock cannot be held by them (flock works on a
    read-only descriptor: a readable lock file would stall every start of ours)."""
    import subprocess
    import tempfile

    from sandbox.base.entries import entry_lock, publish

    from .ordinary import ordinary_account

    account = ordinary_account()
    open_tmp = Path(tempfile.mkdtemp(prefix="sandbox-open-"))
    open_tmp.chmod(0o755)
    try:
        monkeypatch.setenv("SANDBOX_CACHE_DIR", str(open_tmp / "cache"))
        golden = cache_dir() / "golden"
        golden.mkdir()
        entry = golden / "g1"
        with entry_lock(entry):
            publish(entry, lambda work: (work / "ram").write_bytes(b"guest secret"))
        lock = golden / ".locks" / "g1.lock"
        read = account.run(["cat", str(entry / "ram")])
        assert read.returncode != 0 and "guest secret" not in read.stdout, read
        held = account.run(["flock", "--nonblock", "--shared", str(lock), "true"])
        assert held.returncode != 0, held
        assert "Permission denied" in held.stderr, held.stderr
        with entry_lock(entry, timeout=1):  # ours, at once
            pass
        assert stat.S_IMODE(lock.stat().st_mode) == 0o600
    finally:
        subprocess.run(["rm", "-rf", str(open_tmp)], check=False)


def test_a_killed_kvm_probe_leaves_no_qemu(built_image: dict[str, object],
                                           tmp_path: Path) -> None:
    """``sandbox doctor --refresh`` SIGKILLed while its probe QEMUs run: they go with it (on
    the hosts the probe is for, the one under KVM would hang for ever)."""
    import subprocess
    import sys
    import tempfile
    import time

    from sandbox.imaging.image import cached_image
    from sandbox.imaging.recipe import find_recipe

    from .conftest import (
        IMAGE,
        ROOT,
        clean_up_run,
        env_with,
        kill_and_expect_no_qemu,
        qemu_processes,
    )

    image = cached_image(find_recipe(IMAGE))
    assert image is not None
    runtime = Path(tempfile.mkdtemp(prefix="probe-run-"))
    env = env_with(SANDBOX_CACHE_DIR=str(tmp_path / "cache"), SANDBOX_RUNTIME_DIR=str(runtime),
                   SANDBOX_PROBE_KERNEL=str(image.kernel))
    doctor = subprocess.Popen([sys.executable, "-m", "sandbox.cli", "doctor", "--refresh"],
                              env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while len(qemu_processes(str(runtime))) < (2 if os.access("/dev/kvm", os.W_OK) else 1):
            assert doctor.poll() is None and time.monotonic() < deadline, "no probe QEMU ran"
            time.sleep(0.02)
        kill_and_expect_no_qemu(doctor, str(runtime), "a probe QEMU outlived sandbox doctor")
    finally:
        clean_up_run(doctor, runtime)
