"""Bring your own image: a disk made elsewhere (the suite's "foreign" cloud image, built from
Debian packages by tests/images/foreign-build.sh), imported as qcow2, VMDK and VDI, booted by
SeaBIOS and OVMF, set up by cloud-init, cloned from golden snapshots (real guests)."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import os
import re
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

import sandbox
from sandbox.errors import BootError, HostError, ImageError, RecipeError, SandboxWarning
from sandbox.imaging.image import Image, build_image, get_image, image_key, images_dir
from sandbox.imaging.recipe import parse_recipe
from sandbox.net.segment import setup_line
from sandbox.vm.bringup import refuse_cloud_init_errors, settle

from .conftest import ROOT
from .foreign import convert, foreign_disk, write_recipe
from .test_network import SERVE, probe, serve

pytest_plugins = ["pytester"]


@pytest.fixture(scope="module")
def foreign(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The foreign image in four formats, and recipes for them: bios (qcow2), uefi (VMDK),
    vdi (VDI, BIOS), vhdx (VHDX, BIOS); SANDBOX_IMAGES_PATH points at the recipes while the
    module runs."""
    folder = tmp_path_factory.mktemp("foreign")
    raw = foreign_disk()
    disks = {fmt: convert(raw, fmt, folder / f"foreign.{fmt}")
             for fmt in ("qcow2", "vmdk", "vdi", "vhdx")}
    tag = f"{os.getpid()}"
    names = {kind: f"foreign-{kind}-{tag}" for kind in ("bios", "uefi", "vdi", "vhdx")}
    write_recipe(folder, names["bios"], disks["qcow2"], "bios")
    write_recipe(folder, names["uefi"], disks["vmdk"], "uefi")
    write_recipe(folder, names["vdi"], disks["vdi"], "bios")
    write_recipe(folder, names["vhdx"], disks["vhdx"], "bios")
    old = os.environ.get("SANDBOX_IMAGES_PATH")
    os.environ["SANDBOX_IMAGES_PATH"] = str(folder)
    try:
        yield {"folder": folder, "raw": raw, "disks": disks, "names": names}
    finally:
        if old is None:
            os.environ.pop("SANDBOX_IMAGES_PATH", None)
        else:
            os.environ["SANDBOX_IMAGES_PATH"] = old
        for name in names.values():
            with_cli("image", "rm", name)


def with_cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """The ``sandbox`` command, with this process's environment (recipes path included)."""
    return subprocess.run([sys.executable, "-m", "sandbox.cli", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, check=False)


def leftovers(*names: str, root: Path | None = None) -> list[str]:
    """Half-made cache entries of these images (another xdist worker may be making others)."""
    return [p.name for p in (root or images_dir()).iterdir()
            if p.name.startswith(tuple(f".tmp-{name}-" for name in names))]


# -- importing ------------------------------------------------------------------------------


def test_four_formats_import_to_the_same_disk(foreign: dict[str, Any]) -> None:
    images = {}
    for kind, fmt in (("bios", "qcow2"), ("uefi", "vmdk"), ("vdi", "vdi"), ("vhdx", "vhdx")):
        started = time.monotonic()
        result = with_cli("image", "build", foreign["names"][kind])
        assert result.returncode == 0, result.stderr
        images[kind] = sandbox.imaging.image.Image.load(Path(result.stdout.strip()))
        manifest = images[kind].manifest
        print(f"import {fmt}: {time.monotonic() - started:.1f} s")
        assert manifest["source_format"] == fmt
        assert manifest["source_sha256"] == hashlib.sha256(
            foreign["disks"][fmt].read_bytes()).hexdigest()
        assert oct((images[kind].path / "seed.iso").stat().st_mode)[-3:] == "400"
    for kind in ("uefi", "vdi", "vhdx"):  # the guest sees the same disk, whatever the format
        same = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2",
                               str(images["bios"].disk), str(images[kind].disk)],
                              capture_output=True, text=True, check=False)
        assert same.returncode == 0, same.stdout + same.stderr
    again = with_cli("image", "build", foreign["names"]["bios"])
    assert "cached" in again.stderr
    listed = {row["name"]: row for row in json.loads(
        with_cli("image", "list", "--format", "json").stdout)}
    row = listed[foreign["names"]["uefi"]]
    assert row["boot"] == "uefi" and row["source"] == str(foreign["disks"]["vmdk"])
    assert row["source_sha256"] == images["uefi"].manifest["source_sha256"]


def test_image_import_writes_a_recipe(foreign: dict[str, Any], tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "sandbox.cli", "image", "import",
                             str(foreign["disks"]["vdi"]), "--name", "imported-vdi",
                             "--boot", "uefi"], capture_output=True, text=True, cwd=tmp_path,
                            timeout=600, check=False)
    try:
        assert result.returncode == 0, result.stderr
        recipe = parse_recipe(tmp_path / "images" / "imported-vdi.toml")
        assert recipe.boot == "uefi" and recipe.disk_path == foreign["disks"]["vdi"]
        assert recipe.sha256 == hashlib.sha256(foreign["disks"]["vdi"].read_bytes()).hexdigest()
        assert "imported from vdi" in result.stderr
        again = subprocess.run([sys.executable, "-m", "sandbox.cli", "image", "import",
                                str(foreign["disks"]["vdi"]), "--name", "imported-vdi"],
                               capture_output=True, text=True, cwd=tmp_path, check=False)
        assert again.returncode != 0 and "exists already" in again.stderr
    finally:
        removed = with_cli("image", "rm", "imported-vdi")
    assert f"(imported from {foreign['disks']['vdi']}, sha256 {recipe.sha256})" in removed.stdout


def test_image_rm_old_keeps_the_version_the_recipe_builds_now(foreign: dict[str, Any],
                                                             tmp_path: Path) -> None:
    """Two versions of one image (the recipe changed between imports): `image list` tells
    which is current, `image rm --old` removes the other and keeps the current one."""
    name = f"versions-{os.getpid()}"
    recipe = write_recipe(foreign["folder"], name, foreign["disks"]["qcow2"], "bios")
    try:
        assert with_cli("image", "build", name).returncode == 0
        first = sandbox.imaging.image.find_images(name)[0]
        recipe.write_text(recipe.read_text().replace('memory = "1G"', 'memory = "2G"'))
        assert with_cli("image", "build", name).returncode == 0
        second = next(i for i in sandbox.imaging.image.find_images(name) if i.path != first.path)
        listed = {row["digest"]: row["current"] for row in json.loads(
            with_cli("image", "list", "--format", "json").stdout) if row["name"] == name}
        assert listed == {first.digest: False, second.digest: True}
        result = with_cli("image", "rm", name, "--old")
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines() == [f"removed {name} {first.digest[:16]}"
                                              f" (imported from {foreign['disks']['qcow2']},"
                                              f" sha256 {first.manifest['source_sha256']})"]
        assert [i.path for i in sandbox.imaging.image.find_images(name)] == [second.path]
        again = with_cli("image", "rm", name, "--old")
        assert again.stdout.strip() == f"{name}: no old versions"
    finally:
        with_cli("image", "rm", name)


def test_bad_disks_are_named_and_leave_nothing(tmp_path: Path) -> None:
    text = tmp_path / "notes.img"
    text.write_text("not a disk\n" * 1000)
    zeros = tmp_path / "blank.raw"
    zeros.write_bytes(bytes(4 << 20))
    qed = tmp_path / "old.qed"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qed", str(qed), "64M"], check=True)
    cases = [(text, "no partition table"), (zeros, "no partition table"),
             (qed, "qed image, which the sandbox does not import")]
    for disk, message in cases:
        recipe = parse_recipe(write_recipe(tmp_path, f"bad-{disk.stem}", disk, "bios"))
        with pytest.raises(ImageError, match=message):
            build_image(recipe)
    wrong = parse_recipe(write_recipe(tmp_path, "wrong-sum", zeros, "bios",
                                      sha256=f'"{"0" * 64}"'))
    with pytest.raises(ImageError, match="not the recipe's 0000"):
        build_image(wrong)
    missing = parse_recipe(write_recipe(tmp_path, "missing", tmp_path / "nope.qcow2", "bios"))
    with pytest.raises(ImageError, match="no such file"):
        build_image(missing)
    assert leftovers("bad-notes", "bad-blank", "bad-old", "wrong-sum", "missing") == []


def test_uefi_without_firmware_is_named(tmp_path: Path, foreign: dict[str, Any],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDBOX_OVMF", str(tmp_path / "no-such-OVMF.fd"))
    recipe = parse_recipe(write_recipe(tmp_path, "uefi-nofw", foreign["disks"]["qcow2"], "uefi"))
    with pytest.raises(HostError, match="apt-get install ovmf"):
        build_image(recipe)
    assert leftovers("uefi-nofw") == []


def test_recipe_fields_of_disk_recipes_are_checked(tmp_path: Path) -> None:
    cases = {
        'disk = "https://example.org/a.qcow2"\n': "needs its 'sha256'",
        'disk = "a.qcow2"\npackages = ["vim"]\n': "field 'packages' is for recipes built",
        'disk = "a.qcow2"\nboot = "efi"\n': "must be \"bios\" or \"uefi\"",
        'disk = "ftp://example.org/a.qcow2"\nsha256 = "' + "a" * 64 + '"\n': "only http",
        'sha256 = "' + "a" * 64 + '"\n': "belongs to a recipe with 'disk'",
        'disk = "a.qcow2"\n[cloud_init]\nuser_data = "packages: []"\n': "#cloud-config",
        'disk = "a.qcow2"\nuser = "Bad User"\n': "not an account name",
    }
    for text, message in cases.items():
        recipe = tmp_path / "r.toml"
        recipe.write_text(text)
        with pytest.raises(RecipeError, match=message):
            parse_recipe(recipe)


class _Server(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; cuts the first full transfer short (to test resuming)."""

    cut = True
    ranges: list[str] = []

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 (the handler's name)
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        wanted = self.headers.get("Range")
        start = int(wanted.split("=")[1].rstrip("-")) if wanted else 0
        _Server.ranges.append(wanted or "")
        self.send_response(206 if wanted else 200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        if _Server.cut and not wanted:
            _Server.cut = False
            self.wfile.write(data[:len(data) // 3])  # then the connection drops
            self.wfile.flush()
            self.connection.close()
            return
        self.wfile.write(data[start:])


def test_url_download_is_checked_resumed_and_kept(foreign: dict[str, Any], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDBOX_CACHE_DIR", str(tmp_path / "cache"))  # no earlier download
    served = tmp_path / "www"
    served.mkdir()
    disk = served / "cloud.qcow2"
    disk.write_bytes(foreign["disks"]["qcow2"].read_bytes())
    digest = hashlib.sha256(disk.read_bytes()).hexdigest()
    handler = lambda *a: _Server(*a, directory=str(served))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        write_recipe(tmp_path, "from-url", f"{url}/cloud.qcow2", "bios",
                     sha256=f'"{digest}"')
        first = with_cli("image", "build", str(tmp_path / "from-url.toml"))
        assert first.returncode != 0 and "run again to resume it" in first.stderr
        second = with_cli("image", "build", str(tmp_path / "from-url.toml"))
        assert second.returncode == 0, second.stderr
        assert "downloading" in second.stderr
        assert _Server.ranges[-1].startswith("bytes=") and _Server.ranges[-1] != "bytes=0-"
        image = sandbox.imaging.image.Image.load(Path(second.stdout.strip()))
        assert image.manifest["source"] == f"{url}/cloud.qcow2"
        # a wrong checksum: refused, the download discarded, nothing imported
        write_recipe(tmp_path, "bad-sum", f"{url}/cloud.qcow2", "bios",
                     sha256=f'"{"1" * 64}"')
        bad = with_cli("image", "build", str(tmp_path / "bad-sum.toml"))
        assert bad.returncode != 0 and "not the recipe's 1111" in bad.stderr
        # (a download is kept by its checksum: an unknown one must be fetched)
        write_recipe(tmp_path, "no-host", "http://127.0.0.1:9/x.qcow2", "bios",
                     sha256=f'"{"2" * 64}"')
        unreachable = with_cli("image", "build", str(tmp_path / "no-host.toml"), timeout=120)
        assert unreachable.returncode != 0 and "cannot download" in unreachable.stderr
        assert leftovers("from-url", "bad-sum", "no-host") == []
    finally:
        server.shutdown()


# -- booting and cloning ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bios", "uefi"])
def test_sandbox_run_on_the_imported_image(foreign: dict[str, Any], kind: str) -> None:
    """(A VDI disk boots in test_a_disk_given_by_path_is_imported_as_it_is.)"""
    name = foreign["names"][kind]
    started = time.monotonic()
    result = with_cli("run", "--image", name, "--", "cat", "/etc/hostname")
    assert result.returncode == 0, result.stderr[-3000:]
    print(f"{kind}: first run (golden snapshot made) {time.monotonic() - started:.1f} s")
    assert result.stdout.strip() == name
    with sandbox.launch(name) as vm:
        firmware = vm.succeed("test -d /sys/firmware/efi && echo uefi || echo bios").strip()
        assert firmware == ("uefi" if kind == "uefi" else "bios")
        assert vm.succeed("whoami").strip() == "debian"  # cloud-init's default user
        assert vm.succeed("sudo -n whoami").strip() == "root"
        assert vm.succeed("cloud-init status").strip() == "status: done"


def test_testinfra_on_an_imported_image_with_sudo(foreign: dict[str, Any]) -> None:
    """vm.testinfra() logs in as the imported image's user; sudo=True runs as root."""
    with sandbox.launch(foreign["names"]["bios"]) as vm:
        plain, root = vm.testinfra(), vm.testinfra(sudo=True)
        assert plain.check_output("whoami") == "debian"
        assert root.check_output("whoami") == "root"
        assert not plain.run("cat /etc/shadow").succeeded
        assert root.file("/etc/shadow").mode == 0o640
        assert root.service("ssh").is_running
        assert root.package("openssh-server").is_installed
        assert root.socket("tcp://22").is_listening


def test_clones_of_an_imported_image_have_their_own_clock_and_randomness(
        foreign: dict[str, Any]) -> None:
    name = foreign["names"]["bios"]
    with sandbox.launch(name) as first, sandbox.launch(name) as second:
        samples = [vm.succeed("head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; "
                              "date +%s.%N") for vm in (first, second)]
        now = time.time()
        randoms = [s.split()[0] for s in samples]
        clocks = [float(s.split()[1]) for s in samples]
        assert randoms[0] != randoms[1]
        assert all(abs(clock - now) < 5 for clock in clocks), (clocks, now)
        # the golden snapshot was saved minutes ago: without the agent the clock would lag
        assert first.source is not None and first.source.manifest["agent"] is True
        first.succeed("touch /tmp/only-first")
        second.fail("test -e /tmp/only-first")


def test_imported_images_join_private_networks(foreign: dict[str, Any],
                                               built_image: dict[str, Any]) -> None:
    """Two clones of the foreign image and one of debian-12 on one network: the foreign
    kernel names its NIC by PCI slot (enp0s16), the agent finds it by its PCI address; all
    reach each other by name. The SSH way (cold boots, no agent) works for its user too."""
    name = foreign["names"]["bios"]
    with sandbox.Network() as net, sandbox.launch(name, name="fa", networks=[net]) as fa, \
            sandbox.launch(name, name="fb", networks=[net]) as fb, \
            sandbox.launch("debian-12", name="deb", networks=[net]) as deb:
        assert fa.agent_answered and fb.agent_answered
        # the snapshot with the NIC was made from the plain one, not by a boot
        plain = sandbox.launch(name)
        plain.close()
        assert fa.source is not None and plain.source is not None
        assert fa.source.manifest["derived_from"] == plain.source.path.name
        assert fa.source.manifest["user"] == "debian"
        assert fa.interface(net) == fb.interface(net) != "eth1"
        assert deb.interface(net) == "eth1"
        for vm in (fa, fb, deb):
            assert vm.succeed("getent hosts fa fb deb").split() == [
                fa.address(net), "fa", fb.address(net), "fb", deb.address(net), "deb"]
            assert vm.succeed(f"ip -4 -o addr show dev {vm.interface(net)} | wc -l") == "1\n"
        serve(deb, "from-deb")
        assert probe(fa, "deb").stdout.strip() == "from-deb"
        fb.succeed_as_root(f"echo from-fb > /root/answer && {SERVE}", timeout=60)
        fb.wait_for_port(7000, timeout=30)
        assert probe(deb, "fb").stdout.strip() == "from-fb"
        assert probe(fa, "fb").stdout.strip() == "from-fb"
        # What a cold-booted machine gets over SSH (through sudo for user debian), applied
        # again: one address, the same names, still reachable.
        fa.succeed_as_root(setup_line(fa._memberships, fa._hosts()), timeout=60)
        assert fa.succeed(f"ip -4 -o addr show dev {fa.interface(net)} | wc -l") == "1\n"
        assert probe(fa, "fb").stdout.strip() == "from-fb"
        fb.block(net)
        assert probe(fa, "fb").exit_status != 0
        fb.unblock(net)
        assert fa.wait_until_succeeds("python3 -c \"import socket; socket.create_connection("
                                      "('fb', 7000), 1)\"", timeout=30) == ""


def test_a_template_of_an_imported_image_machine(foreign: dict[str, Any]) -> None:
    """A machine of the foreign image, prepared and saved as a template: its clones start
    with its files and processes, as user debian, with their own clock and randomness."""
    name, template = foreign["names"]["bios"], f"foreign-template-{os.getpid()}"
    try:
        with sandbox.launch(name) as vm:
            vm.succeed("echo prepared > ~/state && (sleep 4711 >/dev/null 2>&1 &)")
            saved = vm.save_template(template)
            assert vm.succeed("cat ~/state") == "prepared\n"  # it runs on
        assert saved.manifest["user"] == "debian" and saved.manifest["agent"] is True
        with sandbox.launch(template=template) as first, \
                sandbox.launch(template=template) as second:
            for clone in (first, second):
                assert clone.succeed("whoami; cat ~/state") == "debian\nprepared\n"
                clone.succeed("pgrep -f 'sleep 4711'")
            samples = [vm.succeed("head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; "
                                  "echo; date +%s.%N") for vm in (first, second)]
            now = time.time()
            assert samples[0].split()[0] != samples[1].split()[0]
            assert all(abs(float(s.split()[1]) - now) < 5 for s in samples), (samples, now)
            first.succeed("echo changed > ~/state")
            assert second.succeed("cat ~/state") == "prepared\n"
    finally:
        sandbox.remove_template(template)


def test_pytest_marker_runs_on_the_imported_image(foreign: dict[str, Any],
                                                  pytester: pytest.Pytester) -> None:
    name = foreign["names"]["bios"]
    pytester.makepyfile(f"""
        import pytest

        @pytest.mark.vm(image="{name}")
        def test_on_foreign(vm):
            assert vm.succeed("cat /etc/hostname").strip() == "{name}"
            assert vm.succeed("cloud-init status").strip() == "status: done"
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_seed_volume_holds_the_sandbox_part_and_the_recipes_merged(tmp_path: Path) -> None:
    import email

    import pycdlib

    from sandbox.imaging.seed import MERGE, host_key_pair, user_data, write_seed

    private, public = host_key_pair()
    assert public.startswith("ssh-ed25519 ") and "OPENSSH PRIVATE KEY" in private
    text = user_data(user="ops", authorized_key="ssh-ed25519 AAAA test", host_key=(private, public),
                     extra="#cloud-config\npackages: [htop]\n")
    write_seed(tmp_path / "seed.iso", instance_id="i-1", hostname="box", user_data_text=text)
    iso = pycdlib.PyCdlib()
    iso.open(str(tmp_path / "seed.iso"))
    try:
        assert iso.pvd.volume_identifier.decode().strip() == "cidata"
        files = {}
        for name in ("user-data", "meta-data"):
            out = tmp_path / name
            with out.open("wb") as handle:
                iso.get_file_from_iso_fp(handle, rr_path=f"/{name}")
            files[name] = out.read_text()
    finally:
        iso.close()
    assert files["meta-data"] == "instance-id: i-1\nlocal-hostname: box\n"
    parts = [p for p in email.message_from_string(files["user-data"]).walk()
             if not p.is_multipart()]
    ours = json.loads(str(parts[0].get_payload()).removeprefix("#cloud-config\n"))
    assert ours["users"][1]["name"] == "ops" and "NOPASSWD" in ours["users"][1]["sudo"]
    assert ours["users"][1]["ssh_authorized_keys"] == ["ssh-ed25519 AAAA test"]
    assert ours["ssh_keys"]["ed25519_public"] == public and ours["ssh_pwauth"] is False
    assert parts[1]["Merge-Type"] == MERGE and "packages: [htop]" in parts[1].get_payload()


def test_an_image_without_cloud_init_fails_at_its_login_prompt(foreign: dict[str, Any],
                                                               tmp_path: Path) -> None:
    """The foreign disk with cloud-init disabled (/etc/cloud/cloud-init.disabled written into
    its root filesystem with debugfs): it boots to a login prompt, and the sandbox says why
    it cannot use it instead of waiting out the boot timeout."""
    from sandbox.vm.golden import golden_root

    offset_mib = 65  # the root partition's start (tests/images/foreign-build.sh)
    root = tmp_path / "root.img"
    subprocess.run(["dd", f"if={foreign['raw']}", f"of={root}", "bs=1M", f"skip={offset_mib}",
                    "conv=sparse", "status=none"], check=True)
    subprocess.run(["/usr/sbin/debugfs", "-w", "-R",
                    "write /dev/null /etc/cloud/cloud-init.disabled", str(root)],
                   check=True, capture_output=True)
    disk = tmp_path / "no-cloud-init.raw"
    subprocess.run(["cp", "--sparse=always", str(foreign["raw"]), str(disk)], check=True)
    subprocess.run(["dd", f"if={root}", f"of={disk}", "bs=1M", f"seek={offset_mib}",
                    "conv=notrunc,sparse", "status=none"], check=True)
    root.unlink()
    name = f"no-cloud-init-{os.getpid()}"
    write_recipe(foreign["folder"], name, disk, "bios")
    started = time.monotonic()
    try:
        with pytest.raises(ImageError, match="login prompt without cloud-init"):
            sandbox.launch(name, boot_timeout=300)
        print(f"refused after {time.monotonic() - started:.0f} s")
        assert time.monotonic() - started < 200  # at the prompt, not at the boot timeout
        assert leftovers(name, root=golden_root()) == []
    finally:
        with_cli("image", "rm", name)


# -- untrusted disks (every import below was accepted before these checks) ------------------


def bootable_raw(path: Path, text: bytes = b"", size: int = 1 << 20) -> Path:
    """A raw disk with an MBR signature (what the import's boot check looks for) and
    ``text`` after it."""
    data = bytearray(size)
    data[510:512] = b"\x55\xaa"
    data[1024:1024 + len(text)] = text
    path.write_bytes(bytes(data))
    return path


def qemu_img(*args: str, cwd: Path | None = None) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True, cwd=cwd)


def test_a_disk_naming_other_host_files_is_refused(tmp_path: Path) -> None:
    """A qcow2 backing file (absolute, or relative like a download's ../keys/...), a qcow2
    external data file and a VMDK descriptor's extent would each make qemu-img copy a file
    of this host into the guest's disk. Each is refused, naming the field and the file."""
    secret = bootable_raw(tmp_path / "secret.raw", b"HOST-SECRET-" * 8)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    absolute = tmp_path / "absolute.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(secret), "-F", "raw", str(absolute))
    relative = downloads / "relative.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "../secret.raw", "-F", "raw", relative.name,
             cwd=downloads)
    data_file = tmp_path / "data-file.qcow2"
    qemu_img("convert", "-q", "-f", "raw", "-O", "qcow2", "-o",
             f"data_file={tmp_path / 'data.raw'}", str(secret), str(data_file))
    flat = tmp_path / "descriptor.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat", str(flat), "1M")
    text = flat.read_text(errors="replace")
    flat.write_text(re.sub(r'RW \d+ FLAT "[^"]+" 0', f'RW 2048 FLAT "{secret}" 0', text))
    cases = [(absolute, f"with a backing file \\(backing-filename: {secret}\\)"),
             (relative, "with a backing file \\(backing-filename: ../secret.raw\\)"),
             (data_file, f"with an external data file \\(data-file: {tmp_path}/data.raw\\)"),
             (flat, f"monolithicFlat VMDK whose data is in other files \\(extents: {secret}\\)")]
    for disk, message in cases:
        recipe = parse_recipe(write_recipe(tmp_path, f"refer-{disk.stem}", disk, "bios"))
        with pytest.raises(ImageError, match=message) as info:
            build_image(recipe)
        assert "imports only self-contained disks" in str(info.value)
    assert leftovers("refer-absolute", "refer-relative", "refer-data-file",
                     "refer-descriptor") == []
    for image in sandbox.imaging.image.list_images():  # nothing of the secret reached the cache
        assert not image.name.startswith("refer-")


def test_imports_are_bounded_in_size_and_time(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A compressed qcow2 that expands 100:1 is measured before it is converted; a
    conversion that runs too long is stopped; both say which setting to raise."""
    plain = bootable_raw(tmp_path / "plain.raw", b"\x01" * (60 << 20), size=64 << 20)
    bomb = tmp_path / "bomb.qcow2"
    qemu_img("convert", "-q", "-c", "-f", "raw", "-O", "qcow2", str(plain), str(bomb))
    plain.unlink()
    assert bomb.stat().st_size < (2 << 20)
    recipe = parse_recipe(write_recipe(tmp_path, "bomb", bomb, "bios"))
    monkeypatch.setenv("SANDBOX_IMPORT_MAX_SIZE", "32M")
    with pytest.raises(ImageError, match=r"the converted disk of .*bomb.qcow2 needs 6[0-9.]+M, "
                                         r"more than 32M, .* raise SANDBOX_IMPORT_MAX_SIZE"):
        build_image(recipe)
    monkeypatch.setenv("SANDBOX_IMPORT_MAX_SIZE", "1G")
    monkeypatch.setenv("SANDBOX_IMPORT_TIMEOUT", "0.001")
    with pytest.raises(ImageError, match="took longer than 0 s; raise SANDBOX_IMPORT_TIMEOUT"):
        build_image(recipe)
    monkeypatch.setenv("SANDBOX_IMPORT_TIMEOUT", "soon")
    with pytest.raises(HostError, match="SANDBOX_IMPORT_TIMEOUT='soon' is not a number"):
        build_image(recipe)
    assert leftovers("bomb") == []


class _Endless(http.server.BaseHTTPRequestHandler):
    """An endless body with no length (``/endless``), or one byte every half second
    (``/drip``): each stops by itself after a while, so nothing here runs for ever."""

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 (the handler's name)
        self.send_response(200)
        self.end_headers()
        with contextlib.suppress(OSError):
            if self.path == "/endless":
                for _ in range(256):  # 256 MiB at most
                    self.wfile.write(b"\x07" * (1 << 20))
            else:
                for _ in range(60):
                    self.wfile.write(b"\x07")
                    self.wfile.flush()
                    time.sleep(0.5)


def test_a_download_is_bounded_in_size_and_time(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDBOX_CACHE_DIR", str(tmp_path / "cache"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Endless)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        monkeypatch.setenv("SANDBOX_IMPORT_MAX_SIZE", "8M")
        endless = parse_recipe(write_recipe(tmp_path, "endless", f"{url}/endless", "bios",
                                            sha256=f'"{"3" * 64}"'))
        with pytest.raises(ImageError, match="larger than 8M, the largest disk the sandbox "
                                             "imports \\(it was discarded\\)"):
            build_image(endless)
        assert list((tmp_path / "cache" / "downloads").iterdir()) == []
        monkeypatch.setenv("SANDBOX_DOWNLOAD_TIMEOUT", "2")
        drip = parse_recipe(write_recipe(tmp_path, "drip", f"{url}/drip", "bios",
                                         sha256=f'"{"4" * 64}"'))
        started = time.monotonic()
        with pytest.raises(ImageError, match="took longer than 2 s .*run again to resume it"):
            build_image(drip)
        assert time.monotonic() - started < 10
    finally:
        server.shutdown()


def test_the_digest_of_a_disk_rewritten_in_place_is_computed_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Other bytes of the same size written into the same file, its modification time set
    back (as ``cp -p`` or ``rsync -t --inplace`` do): the pinned sha256 no longer matches."""
    from sandbox.imaging.foreign import file_sha256

    monkeypatch.setenv("SANDBOX_CACHE_DIR", str(tmp_path / "cache"))
    disk = bootable_raw(tmp_path / "disk.raw", b"first")
    before = disk.stat()
    first = file_sha256(disk)
    with disk.open("r+b") as handle:
        handle.seek(1024)
        handle.write(b"other")
    os.utime(disk, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert disk.stat().st_mtime_ns == before.st_mtime_ns
    assert disk.stat().st_ino == before.st_ino and disk.stat().st_size == before.st_size
    assert file_sha256(disk) == hashlib.sha256(disk.read_bytes()).hexdigest() != first
    recipe = parse_recipe(write_recipe(tmp_path, "pinned", disk, "bios",
                                       sha256=f'"{first}"'))
    with pytest.raises(ImageError, match="the file changed, or the recipe's sha256 is wrong"):
        build_image(recipe)


def test_a_disk_given_by_path_is_imported_as_it_is(foreign: dict[str, Any],
                                                   tmp_path: Path) -> None:
    """``sandbox run --image ./disk.vdi``: the disk is imported on the fly (named after
    the file, keyed by its content) and runs; a path to nothing says what an image is.
    (The suite's VirtualBox disk: the one boot of a VDI import.)"""
    disk = tmp_path / "Path Disk.vdi"
    os.link(foreign["disks"]["vdi"], disk)
    try:
        result = subprocess.run([sys.executable, "-m", "sandbox.cli", "run", "--image",
                                 f"./{disk.name}", "--", "cat", "/etc/hostname"],
                                capture_output=True, text=True, cwd=tmp_path, timeout=900,
                                check=False)
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.strip() == "path-disk"
        [image] = sandbox.imaging.image.find_images("path-disk")
        assert image.manifest["source"] == str(disk)
        assert image.manifest["source_format"] == "vdi"
        assert image.manifest["source_sha256"] == hashlib.sha256(disk.read_bytes()).hexdigest()
    finally:
        with_cli("image", "rm", "path-disk")
    with pytest.raises(RecipeError, match="no such disk image file .*the path of a disk image"):
        sandbox.launch(str(tmp_path / "missing.vmdk"))


def test_cloud_init_reports_are_read_for_errors_only() -> None:
    """cloud-init 22 (Debian 12) and 23+ outputs of ``status --long``: a successful one
    has a detail too (its datasource), which is no error."""
    from sandbox.vm.bringup import cloud_init_report

    done_22 = ("\nstatus: done\ntime: Tue, 01 Dec 2026 02:40:01 +0000\ndetail:\n"
               "DataSourceNoCloud [seed=/dev/vda][dsmode=net]\nexit=0")
    error_22 = ("status: error\ntime: Tue, 01 Dec 2026 02:40:01 +0000\ndetail:\n"
                "('scripts-user', RuntimeError('Runparts: 1 failures (runcmd) in 1 attempted "
                "commands'))\nexit=1")
    error_23 = ("status: error\nextended_status: error - done\nboot_status_code: "
                "enabled-by-generator\ndetail: DataSourceNoCloud [seed=/dev/vda]\n"
                "errors:\n\t- ('locale', ProcessExecutionError('update-locale'))\n"
                "recoverable_errors: {}\nexit=1")
    assert cloud_init_report(done_22) == ("done", [])
    assert cloud_init_report(error_22) == ("error", [
        "('scripts-user', RuntimeError('Runparts: 1 failures (runcmd) in 1 attempted "
        "commands'))"])
    assert cloud_init_report(error_23) == (
        "error", ["- ('locale', ProcessExecutionError('update-locale'))"])
    assert cloud_init_report("status: running\nexit=0") == ("running", [])
    assert cloud_init_report("garbage") == ("unknown", [])


CLOUD_INIT_FAILS = '"#cloud-config\\nruncmd:\\n  - [false]\\n"'


def test_a_cloud_init_module_error_is_a_warning_unless_the_recipe_says_fail(
        foreign: dict[str, Any]) -> None:
    """cloud-init's runcmd fails (so its scripts-user module reports an error); login works.
    By default the machine is used with a SandboxWarning carrying cloud-init's detail, which
    the golden snapshot's manifest records. The same recipe changed to cloud_init_errors =
    "fail" refuses clones of that snapshot with no boot and no rebuild (the setting is not
    part of the image's key); changed back, it clones it again."""
    name = f"ci-errors-{os.getpid()}"
    folder = foreign["folder"]
    recipe = folder / f"{name}.toml"
    body = (f'disk = "{foreign["disks"]["qcow2"]}"\nmemory = "1G"\n{{policy}}'
            f"[cloud_init]\nuser_data = {CLOUD_INIT_FAILS}\n")
    recipe.write_text(body.format(policy=""))
    try:
        warned = pytest.warns(SandboxWarning, match=r"cloud-init reported errors in image "
                                                    rf"{name}; the machine is used anyway"
                                                    r"(.|\n)*scripts.user")
        with warned, sandbox.launch(name) as vm:
            assert vm.succeed("whoami").strip() == "debian"
            assert "status: error" in vm.run("cloud-init status").stdout
            assert vm.source is not None
            golden = vm.source.path
            recorded = vm.source.manifest["cloud_init_errors"]
            assert any("scripts" in line for line in recorded), recorded
            assert not any("exit=" in line or "DataSource" in line for line in recorded)
        image = get_image(name).path
        recipe.write_text(body.format(policy='cloud_init_errors = "fail"\n'))
        with pytest.raises(BootError, match=rf"cloud-init reported errors in image {name} "
                                            r"\(cloud_init_errors = \"fail\" in its recipe; "
                                            rf"recorded when golden snapshot {golden.name} "
                                            r"was made\):\n  .*scripts.user"):
            sandbox.launch(name)  # refused from the snapshot's record, before any QEMU starts
        assert get_image(name).path == image and golden.exists()
        recipe.write_text(body.format(policy='cloud_init_errors = "warn"\n'))
        with warnings.catch_warnings():
            warnings.simplefilter("error", SandboxWarning)  # warned once, at the boot
            with sandbox.launch(name) as vm:
                assert vm.source is not None and vm.source.path == golden
                assert vm.succeed("echo again") == "again\n"
    finally:
        with_cli("image", "rm", name)


class _Reports:
    """A channel whose `cloud-init status` prints ``text`` (what settle() reads)."""

    def __init__(self, text: str) -> None:
        self.text, self.commands = text, []

    def run(self, command: str, *, timeout: float) -> Any:
        self.commands.append(command)
        return type("Result", (), {"stdout": self.text if "cloud-init" in command else ""})


def test_a_boot_whose_cloud_init_reports_errors_is_refused_under_fail(tmp_path: Path) -> None:
    """settle(), the policy at a boot (the real guest's part is the test above): "fail"
    refuses before the machine is used, "warn" warns and returns the errors to record,
    a clean report neither; refuse_cloud_init_errors() says which snapshot recorded them."""
    error = ("status: error\ndetail:\n('scripts-user', RuntimeError('Runparts: 1 failures "
             "(runcmd) in 1 attempted commands'))\nexit=1")  # cloud-init 22's form
    image = Image(tmp_path, {"name": "x", "recipe": {}}, cloud_init_policy="fail")
    channel = _Reports(error)
    with pytest.raises(BootError, match=r"in image x \(cloud_init_errors = \"fail\" in its "
                                        r"recipe\):\n  .*scripts-user"):
        settle(channel, image, 10)
    assert len(channel.commands) == 1  # refused before the settle command
    warn = replace(image, cloud_init_policy="warn")
    with pytest.warns(SandboxWarning, match="the machine is used anyway"):
        assert settle(_Reports(error), warn, 10) == [
            "('scripts-user', RuntimeError('Runparts: 1 failures (runcmd) in 1 attempted "
            "commands'))"]
    assert settle(_Reports("status: done\nexit=0"), image, 10) == []
    refuse_cloud_init_errors(warn, ["e"], "g")
    refuse_cloud_init_errors(image, [], "g")
    with pytest.raises(BootError, match="recorded when golden snapshot g was made"):
        refuse_cloud_init_errors(image, ["e"], "g")
    # an image built before the setting left the key: its manifest's word, when no recipe
    assert Image(tmp_path, {"recipe": {"cloud_init_errors": "fail"}}).cloud_init_errors == "fail"
    assert Image(tmp_path, {"recipe": {}}).cloud_init_errors == "warn"


def test_cloud_init_errors_is_not_part_of_the_image_key(tmp_path: Path) -> None:
    disk = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
    keys = set()
    for policy in ("", 'cloud_init_errors = "warn"\n', 'cloud_init_errors = "fail"\n'):
        recipe = tmp_path / "p.toml"
        recipe.write_text(f'disk = "{disk}"\n{policy}')
        parsed = parse_recipe(recipe)
        keys.add(image_key(parsed))
        assert parsed.cloud_init_errors == (policy.split('"')[1] if policy else "warn")
    assert len(keys) == 1


def test_sandbox_ssh_logs_in_as_the_imported_images_user(foreign: dict[str, Any]) -> None:
    """`sandbox ssh NAME` on a named machine of an imported image: the host's ssh client
    logs in as the image's user (cloud-init's default, here "debian"), not root."""
    from .test_cli import cli_in_terminal, read_until

    machine = f"ssh-user-{os.getpid()}"
    up = with_cli("up", machine, "--image", foreign["names"]["bios"])
    assert up.returncode == 0, up.stderr[-3000:]
    try:
        with cli_in_terminal("ssh", machine) as (process, main_fd):
            os.write(main_fd, b"echo user=$(whoami)=\n")
            seen = read_until(main_fd, b"user=debian=", 60)  # (returns early at the end)
            assert b"user=debian=" in seen, seen[-500:]  # not "Please login as ... debian"
            os.write(main_fd, b"exit\n")
            assert process.wait(timeout=60) == 0
    finally:
        down = with_cli("down", machine)
        assert down.returncode == 0, down.stderr
