"""Images: a recipe built into a read-only, content-addressed disk + kernel + initrd.

Pipeline (no loop mounts, no downloads beyond the Debian mirror the host already uses)::

    recipe --mmdebstrap--> tree --mke2fs -d--> ext4 raw --qemu-img--> disk.qcow2
                              \\--> boot/vmlinuz, boot/initrd.img (direct kernel boot)

A build runs in a temporary directory beside the cache entry and appears with one atomic
rename when complete; concurrent builders of the same recipe serialise on a file lock.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .entries import entry_lock, publish, remove_entry
from .errors import HostError, ImageError
from .keys import cache_key
from .paths import cache_dir
from .progress import QUIET, Reporter
from .recipe import Recipe, find_recipe
from .sizes import format_size

#: Bumped whenever the build pipeline changes what ends up in an image.
BUILDER_VERSION = "1"

#: Packages the sandbox itself relies on inside every guest, added to each recipe's list.
BASE_PACKAGES = ("systemd-sysv", "udev", "dropbear-bin", "openssh-sftp-server", "socat",
                 "iproute2")

#: Kernel command line every image gets; the recipe's ``kernel_cmdline`` is appended.
BASE_CMDLINE = "root=/dev/vda rw console=ttyS0 loglevel=4 net.ifnames=0 panic=-1"

#: Free space a build needs beyond the disk size (the tree, the raw file, the qcow2).
BUILD_HEADROOM = 1 << 30

_GUEST_SETUP = Path(__file__).with_name("guest") / "setup.sh"
_GUEST_AGENT = Path(__file__).with_name("guest") / "sandbox-agent"


@dataclass(frozen=True)
class Image:
    """A finished image in the cache. Never modified after its build."""

    path: Path
    manifest: dict[str, Any]
    #: True only for the Image that build_image() has just built (not a cache hit).
    built_now: bool = field(default=False, compare=False)

    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def digest(self) -> str:
        return str(self.manifest["digest"])

    @property
    def disk(self) -> Path:
        return self.path / "disk.qcow2"

    @property
    def kernel(self) -> Path:
        return self.path / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.path / "initrd.img"

    @property
    def kernel_cmdline(self) -> str:
        return str(self.manifest["kernel_cmdline"])

    @property
    def host_key(self) -> str:
        return str(self.manifest["host_key"])

    @property
    def memory(self) -> str:
        return str(self.manifest["memory"])

    @property
    def cpus(self) -> int:
        return int(self.manifest["cpus"])

    @property
    def size(self) -> int:
        return sum(f.stat().st_size for f in self.path.iterdir())

    @classmethod
    def load(cls, path: Path) -> Image:
        return cls(path, json.loads((path / "manifest.json").read_text()))


def images_dir() -> Path:
    path = cache_dir() / "images"
    path.mkdir(parents=True, exist_ok=True)
    return path


def image_key(recipe: Recipe) -> str:
    """Content address of the image a recipe builds (recipe, builder, baked-in key)."""
    setup = hashlib.sha256(_GUEST_SETUP.read_bytes() + _GUEST_AGENT.read_bytes()).hexdigest()
    return recipe.digest(BUILDER_VERSION, setup, cache_key().public_line)


def cached_image(recipe: Recipe) -> Image | None:
    path = images_dir() / f"{recipe.name}-{image_key(recipe)[:16]}"
    return Image.load(path) if (path / "manifest.json").exists() else None


def get_image(name_or_path: str, *, reporter: Reporter = QUIET) -> Image:
    """The image for a recipe name or file, building it first when the cache has none."""
    recipe = find_recipe(name_or_path)
    return cached_image(recipe) or build_image(recipe, reporter=reporter)


def list_images() -> list[Image]:
    found = []
    for entry in sorted(images_dir().iterdir()):
        if not entry.name.startswith(".") and (entry / "manifest.json").exists():
            found.append(Image.load(entry))
    return found


def find_images(name: str) -> list[Image]:
    """Built images of one recipe name (every digest), or ImageError listing what exists."""
    matches = [image for image in list_images() if image.name == name]
    if not matches:
        built = sorted({image.name for image in list_images()}) or ["none"]
        raise ImageError(f"no built image named {name!r}; built images: {', '.join(built)}. "
                         f"Build it with: sandbox image build {name}")
    return matches


def remove_image(image: Image) -> None:
    remove_entry(image.path)


def build_image(recipe: Recipe, *, reporter: Reporter = QUIET, force: bool = False) -> Image:
    """Build ``recipe`` into the cache, or return the copy a concurrent builder made."""
    _require_tools()
    key = image_key(recipe)
    final = images_dir() / f"{recipe.name}-{key[:16]}"
    with entry_lock(final, lambda: reporter.note(f"waiting for a concurrent build of "
                                                 f"{recipe.name}...")):
        if (final / "manifest.json").exists():
            if not force:
                return Image.load(final)
            remove_image(Image.load(final))
        _check_space(recipe)
        manifest = publish(final, lambda work: _build_into(recipe, key, work, reporter))
        return Image(final, manifest, built_now=True)


def _require_tools() -> None:
    missing = [tool for tool in ("mmdebstrap", "mke2fs", "qemu-img") if not shutil.which(tool)]
    if missing:
        raise HostError(f"building images needs {', '.join(missing)}; install with: "
                        "apt-get install mmdebstrap e2fsprogs qemu-utils")
    if os.geteuid() != 0:
        raise HostError("building images needs root (mmdebstrap writes a tree owned by root); "
                        "run the build with sudo, or use a cache that root has filled "
                        "(SANDBOX_CACHE_DIR)")


def _check_space(recipe: Recipe) -> None:
    usage = shutil.disk_usage(images_dir())
    need = recipe.disk_bytes + BUILD_HEADROOM
    if usage.free < need:
        raise ImageError(f"not enough space in the cache {images_dir()}: "
                         f"{format_size(usage.free)} free, a build of {recipe.name!r} needs "
                         f"about {format_size(need)}. Free some space (sandbox image rm NAME) "
                         "or point SANDBOX_CACHE_DIR at a larger disk.")


def _build_into(recipe: Recipe, key: str, work: Path, reporter: Reporter) -> dict[str, Any]:
    started = time.monotonic()
    tree = work / "tree"
    out = work / "out"
    staged = work / "files"
    out.mkdir()
    staged.mkdir()
    base = recipe.path.parent if recipe.path else Path.cwd()
    for index, entry in enumerate(recipe.files):
        (staged / str(index)).write_bytes(entry.data(base))
    env = dict(os.environ,
               SANDBOX_AUTHORIZED_KEY=cache_key().public_line,
               SANDBOX_FILES="\n".join(f"{i} {oct(f.mode)[2:]} {f.path}"
                                       for i, f in enumerate(recipe.files)),
               SANDBOX_FILES_DIR=str(staged),
               SANDBOX_OUT=str(out),
               SANDBOX_AGENT=str(_GUEST_AGENT),
               SANDBOX_CUSTOMIZE="\n".join(recipe.customize))
    packages = list(dict.fromkeys([*BASE_PACKAGES, *recipe.packages]))
    command = ["mmdebstrap", "--variant=apt", "--format=directory", "--mode=root",
               f"--components={','.join(recipe.components)}",
               f"--include={','.join(packages)}",
               "--customize-hook=" + f"sh {shlex.quote(str(_GUEST_SETUP))} \"$1\"",
               recipe.suite, str(tree), *apt_sources(recipe)]
    with reporter.stage(f"{recipe.name}: installing {len(packages)} packages (mmdebstrap)"):
        _run(command, work / "mmdebstrap.log", env=env, what="mmdebstrap")

    tree_bytes = _tree_bytes(tree)
    need = int(tree_bytes * 1.15) + (64 << 20)
    if recipe.disk_bytes < need:
        raise ImageError(f"recipe {recipe.name!r}: disk_size {recipe.disk_size} is too small "
                         f"for the tree ({format_size(tree_bytes)}); set disk_size to at least "
                         f"{format_size(need)} in {recipe.path}")
    kernel = out / "vmlinuz"
    if not kernel.exists():
        raise ImageError(f"recipe {recipe.name!r} installs no kernel: add a kernel package "
                         "such as linux-image-cloud-amd64 to 'packages'")
    raw = work / "disk.raw"
    with reporter.stage(f"{recipe.name}: ext4 filesystem {recipe.disk_size} (mke2fs -d)"):
        _run(["mke2fs", "-q", "-F", "-t", "ext4", "-L", "sandbox-root", "-d", str(tree),
              str(raw), str(recipe.disk_bytes // 1024) + "k"], work / "mke2fs.log",
             what="mke2fs", too_small=recipe)
    remove_entry(tree)
    with reporter.stage(f"{recipe.name}: qcow2 image (qemu-img convert)"):
        _run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw),
              str(work / "disk.qcow2")], work / "qemu-img.log", what="qemu-img convert")
    raw.unlink()
    shutil.move(str(kernel), work / "vmlinuz")
    shutil.move(str(out / "initrd.img"), work / "initrd.img")
    host_key = (out / "ssh_host_ed25519_key.pub").read_text().split()
    for leftover in ("out", "files"):
        remove_entry(work / leftover)
    for log in work.glob("*.log"):
        log.unlink()
    manifest: dict[str, Any] = {
        "name": recipe.name,
        "digest": key,
        "builder_version": BUILDER_VERSION,
        "recipe_path": str(recipe.path) if recipe.path else None,
        "recipe": recipe.canonical(),
        "suite": recipe.suite,
        "kernel_cmdline": f"{BASE_CMDLINE} {recipe.kernel_cmdline}".strip(),
        "memory": recipe.memory,
        "cpus": recipe.cpus,
        "disk_size": recipe.disk_size,
        "tree_bytes": tree_bytes,
        "host_key": " ".join(host_key[:2]),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "build_seconds": round(time.monotonic() - started, 1),
    }
    (work / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def apt_sources(recipe: Recipe) -> list[str]:
    """One-line apt sources for the recipe's suite, from its ``mirror`` or the host's own."""
    components = " ".join(recipe.components)
    main, security = (recipe.mirror, "") if recipe.mirror else host_debian_mirrors()
    lines = [f"deb {main} {recipe.suite} {components}"]
    if recipe.suite not in ("sid", "unstable", "experimental"):
        lines.append(f"deb {main} {recipe.suite}-updates {components}")
        if security:
            lines.append(f"deb {security} {recipe.suite}-security {components}")
    return lines


def host_debian_mirrors() -> tuple[str, str]:
    """(archive, security) URIs the host's apt already uses for Debian."""
    uris: list[str] = []
    sources = Path("/etc/apt/sources.list")
    files = [sources] if sources.exists() else []
    directory = Path("/etc/apt/sources.list.d")
    if directory.is_dir():
        files += sorted(directory.iterdir())
    for file in files:
        try:
            text = file.read_text()
        except OSError:
            continue
        if file.suffix == ".sources":
            uris += [u for line in text.splitlines() if line.startswith("URIs:")
                     for u in line.split()[1:]]
        elif file.suffix == ".list" or file == sources:
            for line in text.splitlines():
                parts = re.sub(r"\[[^]]*\]", "", line).split()
                if len(parts) >= 3 and parts[0] == "deb":
                    uris.append(parts[1])
    main = next((u for u in uris if u.rstrip("/").endswith("/debian")),
                "http://deb.debian.org/debian")
    security = next((u for u in uris if u.rstrip("/").endswith("/debian-security")),
                    "http://deb.debian.org/debian-security")
    return main.rstrip("/"), security.rstrip("/")


def _run(command: list[str], log: Path, *, what: str, env: dict[str, str] | None = None,
         too_small: Recipe | None = None) -> None:
    with log.open("wb") as handle:
        result = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env,
                                stdin=subprocess.DEVNULL, check=False)
    if result.returncode == 0:
        return
    output = log.read_text(errors="replace")
    missing = re.findall(r"Unable to locate package (\S+)", output)
    missing += re.findall(r"Package '([^']+)' has no installation candidate", output)
    if missing:
        raise ImageError(f"package(s) not found in the archive: {', '.join(sorted(set(missing)))}"
                         " — check the names in the recipe's 'packages' "
                         "(apt-cache search NAME)")
    if too_small and re.search(r"(No space left|Could not allocate block)", output):
        raise ImageError(f"recipe {too_small.name!r}: disk_size {too_small.disk_size} is too "
                         "small for the tree; raise disk_size in the recipe")
    errors = [line for line in output.splitlines() if line.startswith(("E:", "W:"))]
    tail = "\n".join((errors or output.splitlines())[-15:])
    raise ImageError(f"{what} failed with status {result.returncode}:\n{tail}")


def _tree_bytes(tree: Path) -> int:
    total = 0
    for root, dirs, files in os.walk(tree):
        for name in dirs + files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total
