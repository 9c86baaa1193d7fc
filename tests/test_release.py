"""Releasing: what ``python -m build`` makes of this checkout, as docs/release.yml publishes it.

The sdist and the wheel pass ``twine check --strict``; a wheel built from the unpacked sdist
holds the same files, byte for byte, as the one built from the checkout (so the sdist lacks
nothing: recipes, guest files); and that wheel, installed with its dependencies into a fresh
virtualenv as a user would, gives a ``sandbox`` command that finds the built-in recipes in
the installed package from any directory. Boots no VM and touches no one's cache.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from .conftest import ROOT


def run(argv: list[str | Path], *, timeout: float = 600, cwd: Path | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``argv``; fail the test with its output if it exits non-zero."""
    result = subprocess.run([str(arg) for arg in argv], capture_output=True, text=True,
                            timeout=timeout, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                            check=False)
    if result.returncode != 0:
        pytest.fail(f"{' '.join(map(str, argv))} exited {result.returncode}:\n"
                    f"{result.stdout}\n{result.stderr}", pytrace=False)
    return result


def require_module(name: str) -> None:
    """Fail (not skip) when a release tool is missing from this environment."""
    probe = subprocess.run([sys.executable, "-m", name, "--version"], capture_output=True,
                           text=True, timeout=120, check=False)
    if probe.returncode != 0:
        pytest.fail(f"{sys.executable} cannot run `-m {name}` ({probe.stderr.strip()}): "
                    f"install the dev extra, `pip install -e '.[dev]'` (it lists build and "
                    f"twine)", pytrace=False)


def only(directory: Path, pattern: str) -> Path:
    found = sorted(directory.glob(pattern))
    assert len(found) == 1, f"expected one {pattern} in {directory}, found {found}"
    return found[0]


def wheel_record(wheel: Path) -> dict[str, str]:
    """The wheel's files (RECORD itself left out) and their sha256 as RECORD gives them."""
    with zipfile.ZipFile(wheel) as archive:
        record = next(n for n in archive.namelist() if n.endswith(".dist-info/RECORD"))
        lines = archive.read(record).decode().splitlines()
        names = set(archive.namelist())
    files = {}
    for line in lines:
        name, digest, _size = line.rsplit(",", 2)
        if name != record:
            files[name] = digest
    assert set(files) | {record} == names, f"{wheel.name}: RECORD and archive differ"
    return files


def test_sdist_and_wheel_build_check_and_install(tmp_path: Path) -> None:
    require_module("build")
    require_module("twine")

    dist = tmp_path / "dist"
    run([sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", dist, ROOT])
    sdist = only(dist, "pytest_qemu_sandbox-*.tar.gz")
    wheel = only(dist, "pytest_qemu_sandbox-*.whl")

    unpacked = tmp_path / "unpacked"
    with tarfile.open(sdist) as archive:
        archive.extractall(unpacked, filter="data")
    source = only(unpacked, "pytest_qemu_sandbox-*")
    from_sdist = tmp_path / "from-sdist"
    run([sys.executable, "-m", "build", "--wheel", "--outdir", from_sdist, source])
    rebuilt = only(from_sdist, "pytest_qemu_sandbox-*.whl")

    run([sys.executable, "-m", "twine", "check", "--strict", sdist, wheel, rebuilt])

    files, rebuilt_files = wheel_record(wheel), wheel_record(rebuilt)
    lacking, extra = sorted(files.keys() - rebuilt_files), sorted(rebuilt_files.keys() - files)
    assert not lacking and not extra, (f"the wheel built from the sdist lacks {lacking} and "
                                       f"has {extra} more than the one built from the checkout")
    differ = sorted(name for name in files if files[name] != rebuilt_files[name])
    assert not differ, f"these files differ between the two wheels: {differ}"
    for needed in ("sandbox/images/debian-12.toml", "sandbox/guest/sandbox-agent",
                   "sandbox/guest/setup.sh", "sandbox/py.typed"):
        assert needed in files, f"{needed} is not in {wheel.name}"

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", venv], timeout=300)
    run([venv / "bin" / "python", "-m", "pip", "install", "-q", "--disable-pip-version-check",
         rebuilt], timeout=900)

    env = {k: v for k, v in os.environ.items() if not k.startswith("SANDBOX_")}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    listed = run([venv / "bin" / "sandbox", "image", "list"], cwd=tmp_path, env=env,
                 timeout=120)
    rows = {line.split()[0]: line for line in listed.stdout.splitlines()[1:] if line.strip()}
    assert "debian-12" in rows, listed.stdout
    # The recipe comes from the installed package, not from this checkout's images/.
    site = run([venv / "bin" / "python", "-c", "import sandbox; print(sandbox.__file__)"],
               cwd=tmp_path, env=env).stdout.strip()
    assert str(Path(site).parent / "images" / "debian-12.toml") in rows["debian-12"], (
        listed.stdout)
    assert (tmp_path / "cache" / "pytest-qemu-sandbox").is_dir()
