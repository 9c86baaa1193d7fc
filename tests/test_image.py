"""Images: the cache, the CLI, the doctor, and bad input (real builds with mmdebstrap)."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from sandbox.base.paths import cache_dir, find_tool
from sandbox.errors import ImageError
from sandbox.guest.keys import cache_key
from sandbox.imaging.image import build_image, get_image, image_key, images_dir, list_images
from sandbox.imaging.recipe import find_recipe, parse_recipe
from sandbox.vm.accel import accel_verdict

from .conftest import IMAGE, env_with, host_path_mentions, sandbox_cli

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


def leftovers(name: str) -> list[str]:
    return sorted(p.name for p in images_dir().glob(f".tmp-{name}-*"))


def test_four_concurrent_builds_make_one_image(built_image: dict[str, Any],
                                               tmp_path: Path) -> None:
    results = built_image["concurrent"]
    variant = None
    if results is None:
        # The session found the image cached: build a variant so the check still runs.
        text = find_recipe(IMAGE).path.read_text()  # type: ignore[union-attr]
        variant = tmp_path / "concurrency-check.toml"
        variant.write_text(re.sub(r"(?m)^description = .*$",
                                  f'description = "concurrency check {time.time()}"', text))
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda _: sandbox_cli("image", "build", str(variant)),
                                    range(4)))
    try:
        outcomes = sorted("built" if "built in" in r.stderr else
                          "cached" if "cached" in r.stderr or "waiting" in r.stderr else r.stderr
                          for r in results)
        assert [r.returncode for r in results] == [0, 0, 0, 0]
        if variant is None and os.environ.get("PYTEST_XDIST_WORKER"):
            # Another worker may have been the one that built: never more than one build.
            assert outcomes.count("built") <= 1 and set(outcomes) <= {"built", "cached"}
        else:
            assert outcomes == ["built", "cached", "cached", "cached"]
        assert len({r.stdout.strip() for r in results}) == 1
    finally:
        if variant is not None:
            sandbox_cli("image", "rm", "concurrency-check")


def test_cached_build_is_a_hit_and_image_is_read_only(built_image: dict[str, Any]) -> None:
    result = sandbox_cli("image", "build", IMAGE)
    assert result.returncode == 0, result.stderr
    assert "cached" in result.stderr
    path = Path(result.stdout.strip())
    assert {p.name for p in path.iterdir()} == {"disk.qcow2", "vmlinuz", "initrd.img",
                                                 "manifest.json", "client_key"}
    assert path.stat().st_mode & 0o222 == 0
    assert all(p.stat().st_mode & 0o222 == 0 for p in path.iterdir())
    info = subprocess.run(["qemu-img", "info", "--output=json", str(path / "disk.qcow2")],
                          capture_output=True, text=True, check=True)
    assert json.loads(info.stdout)["format"] == "qcow2"


def test_an_image_keeps_the_key_baked_into_it_and_no_path_of_its_cache(
        built_image: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An entry that moves to another cache (another host, another account) is found there
    by the same key, and logged into with the key it carries."""
    image = get_image(IMAGE)
    key = image.client_key()
    assert key.private_path == image.path / "client_key"
    assert stat.S_IMODE(key.private_path.stat().st_mode) == 0o400
    assert key.public_line == image.manifest["client_key"] == cache_key().public_line
    assert f"ssh-ed25519 {key.load().get_base64()}" == " ".join(key.public_line.split()[:2])
    assert host_path_mentions(image.path, str(cache_dir())) == []
    monkeypatch.setenv("SANDBOX_CACHE_DIR", str(tmp_path / "other"))
    assert cache_key().public_line != image.manifest["client_key"]  # another cache's key...
    assert image_key(find_recipe(IMAGE)) == image.digest  # ...and the same image key


def test_image_list_and_inspect(built_image: dict[str, Any]) -> None:
    listed = sandbox_cli("image", "list", "--format", "json")
    assert listed.returncode == 0
    names = [entry["name"] for entry in json.loads(listed.stdout)]
    assert IMAGE in names
    table = sandbox_cli("image", "list")
    assert IMAGE in table.stdout and "DIGEST" in table.stdout
    inspected = json.loads(sandbox_cli("image", "inspect", IMAGE).stdout)
    manifest = inspected if isinstance(inspected, dict) else inspected[0]
    assert manifest["host_key"].startswith("ssh-ed25519 ")
    assert "root=/dev/vda" in manifest["kernel_cmdline"]


def test_unknown_names_list_what_exists() -> None:
    result = sandbox_cli("image", "build", "debian-99")
    assert result.returncode == 2
    assert "unknown image 'debian-99'" in result.stderr and "debian-12" in result.stderr
    result = sandbox_cli("image", "inspect", "never-built")
    assert result.returncode == 2 and "no built image named 'never-built'" in result.stderr


def test_misspelled_recipe_field_from_cli(tmp_path: Path) -> None:
    recipe = tmp_path / "typo.toml"
    recipe.write_text('packges = ["curl"]\n')
    result = sandbox_cli("image", "build", str(recipe))
    assert result.returncode == 2
    assert "unknown field 'packges'" in result.stderr and "'packages'" in result.stderr


def test_missing_package_is_named_and_nothing_is_left(tmp_path: Path) -> None:
    recipe = tmp_path / "bad-package.toml"
    recipe.write_text('packages = ["linux-image-cloud-amd64", "no-such-package-zz9"]\n')
    with pytest.raises(ImageError, match="not found in the archive: no-such-package-zz9"):
        build_image(parse_recipe(recipe))
    assert leftovers("bad-package") == []
    assert not [i for i in list_images() if i.name == "bad-package"]


def test_disk_too_small_is_named_and_nothing_is_left(tmp_path: Path) -> None:
    recipe = tmp_path / "tiny-disk.toml"
    recipe.write_text('disk_size = "100M"\n')
    with pytest.raises(ImageError, match=r"disk_size 100M is too small .*set disk_size to at"):
        build_image(parse_recipe(recipe))
    assert leftovers("tiny-disk") == []


@needs_root
def test_no_space_in_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(small)], check=True)
    try:
        monkeypatch.setenv("SANDBOX_CACHE_DIR", str(small))
        with pytest.raises(ImageError, match=r"not enough space in the cache .*SANDBOX_CACHE_DIR"):
            build_image(find_recipe(IMAGE))
        assert not list((small / "images").glob(".tmp-*"))
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_doctor_reports_the_accelerator_with_a_reason() -> None:
    first = sandbox_cli("doctor", "--json")
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout)
    assert report["accel"]["accel"] in ("kvm", "tcg")
    assert report["accel"]["reason"]
    assert report["tools"]["qemu-system-x86_64"]["version"]
    # Asked again, the verdict comes from the per-host cache: the same probe, not a new one.
    again = json.loads(sandbox_cli("doctor", "--json").stdout)
    assert again["accel"]["probed_at"] == report["accel"]["probed_at"]
    text = sandbox_cli("doctor")
    assert "accelerator" in text.stdout and report["accel"]["accel"] in text.stdout


def test_doctor_names_the_package_when_qemu_is_missing() -> None:
    result = sandbox_cli("doctor", env=env_with(SANDBOX_QEMU="/nonexistent/qemu-system-x86_64"))
    assert result.returncode == 1
    assert "apt-get install qemu-system-x86" in result.stdout + result.stderr


def test_kvm_request_fails_fast_where_kvm_does_not_work(built_image: dict[str, Any]) -> None:
    verdict = accel_verdict()
    if verdict.kvm_usable:
        pytest.skip("KVM works on this host")
    started = time.monotonic()
    result = sandbox_cli("run", "--accel", "kvm", "--", "true", timeout=60)
    assert result.returncode == 2
    assert "KVM was requested but does not work" in result.stderr
    assert time.monotonic() - started < 30


def test_recipe_files_and_multi_line_customize_land_inside_the_tree(tmp_path: Path) -> None:
    """A recipe's files are written in the chroot with their modes, and a customize entry
    may be a script of several lines."""
    recipe = tmp_path / "custom-check.toml"
    recipe.write_text(textwrap.dedent('''
        packages = ["linux-image-cloud-amd64"]
        customize = ["""
        set -e
        echo one > /etc/multi-line
        echo two >> /etc/multi-line
        """]

        [[files]]
        path = "/etc/placed"
        content = "placed\\n"
        mode = "0600"
        '''))
    built = build_image(parse_recipe(recipe))
    try:
        raw = tmp_path / "disk.raw"
        subprocess.run(["qemu-img", "convert", "-O", "raw", str(built.disk), str(raw)],
                       check=True)

        def debugfs(request: str) -> str:
            return subprocess.run([find_tool("debugfs") or "debugfs", "-R", request, str(raw)],
                                  capture_output=True, text=True, check=True).stdout

        assert debugfs("cat /etc/multi-line") == "one\ntwo\n"
        assert debugfs("cat /etc/placed") == "placed\n"
        assert "Mode:  0600" in debugfs("stat /etc/placed")
    finally:
        sandbox_cli("image", "rm", "custom-check")


def test_debian_13_is_built_from_packages_and_cloned() -> None:
    """The second built-in recipe: trixie, built like debian-12, cloned from its snapshot."""
    import sandbox

    with sandbox.launch("debian-13") as vm:
        assert 'VERSION_CODENAME=trixie' in vm.succeed("cat /etc/os-release")
        assert vm.succeed("python3 -c 'import sys; print(sys.version_info >= (3, 13))'") == \
            "True\n"
        assert vm.source is not None  # a clone, not a cold boot
