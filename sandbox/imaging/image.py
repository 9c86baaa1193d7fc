"""Images: a recipe built into a read-only, content-addressed disk + kernel + initrd (a Debian
recipe, :mod:`sandbox.imaging.debian`) or a disk image imported with its cloud-init seed (a
disk recipe, :mod:`sandbox.imaging.foreign`), and the cache that holds them.

A build runs in a temporary directory beside the cache entry and appears with one atomic
rename when complete; concurrent builders of the same recipe serialise on a file lock.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..base.entries import entry_lock, publish, remove_entry
from ..base.paths import cache_dir
from ..base.progress import QUIET, Reporter
from ..base.sizes import parse_size
from ..errors import ImageError, SandboxError
from ..guest.files import GUEST_AGENT, GUEST_SETUP
from ..guest.keys import KeyPair, cache_key
from ..share.artifact import Entry
from ..share.store import offer, remote_entry
from .debian import BUILDER_VERSION, build_into, check_space, require_tools
from .foreign import IMPORT_VERSION, import_into, source_sha256
from .recipe import Recipe, find_recipe

#: The entry's copy of the SSH client key baked into the image (private, 0400).
CLIENT_KEY = "client_key"


@dataclass(frozen=True)
class Image:
    """A finished image in the cache. Never modified after its build."""

    path: Path
    manifest: dict[str, Any]
    #: True only for the Image that build_image() has just built (not a cache hit).
    built_now: bool = field(default=False, compare=False)
    #: ``cloud_init_errors`` of the recipe it was found by (get_image), which governs over
    #: what the manifest recorded at build time.
    cloud_init_policy: str | None = field(default=None, compare=False)

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
    def kind(self) -> str:
        """``debian`` (built here, booted with its kernel) or ``disk`` (imported, booted by
        firmware, set up by cloud-init)."""
        return str(self.manifest.get("kind", "debian"))

    @property
    def boot(self) -> str:
        """``kernel`` (direct kernel boot), ``bios`` or ``uefi``."""
        return str(self.manifest.get("boot", "kernel"))

    @property
    def user(self) -> str:
        """The account SSH logs in as ("" for a disk image: cloud-init's default user, found
        when it first boots)."""
        return str(self.manifest.get("user", "root"))

    @property
    def cloud_init_errors(self) -> str:
        """What cloud-init's module errors do to a machine of an imported image ("warn",
        "fail"): the recipe's setting now, else what an image built before it was left out of
        the image's key recorded."""
        if self.cloud_init_policy is not None:
            return self.cloud_init_policy
        return str(self.manifest.get("recipe", {}).get("cloud_init_errors", "warn"))

    @property
    def seed(self) -> Path | None:
        return self.path / "seed.iso" if self.kind == "disk" else None

    @property
    def kernel(self) -> Path:
        return self.path / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.path / "initrd.img"

    @property
    def kernel_cmdline(self) -> str:
        return str(self.manifest.get("kernel_cmdline", ""))

    @property
    def host_key(self) -> str:
        return str(self.manifest["host_key"])

    def client_key(self) -> KeyPair:
        """The SSH client key baked into this image: the copy its entry keeps (it travels
        with the entry), or this cache's key for an entry made before entries kept one."""
        if "client_key" not in self.manifest:
            return cache_key()
        private = self.path / CLIENT_KEY
        if not private.exists():
            raise ImageError(f"image entry {self.path.name} lacks its SSH client key "
                             f"({CLIENT_KEY}): it was copied incompletely; remove it (sandbox "
                             f"image rm {self.name}) and build or fetch it again")
        return KeyPair(private, str(self.manifest["client_key"]))

    @property
    def memory(self) -> str:
        return str(self.manifest["memory"])

    @property
    def memory_mib(self) -> int:
        return parse_size(self.memory, default_unit="M") >> 20

    @property
    def cpus(self) -> int:
        return int(self.manifest["cpus"])

    @property
    def cpu(self) -> str:
        """The recipe's CPU model ("": the accelerator's default)."""
        return str(self.manifest.get("recipe", {}).get("cpu", ""))

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
    """Content address of the image a recipe builds (recipe, builder; for a disk recipe the
    disk's sha256 instead of the builder). Not the SSH client key baked in: each entry
    keeps its own (:meth:`Image.client_key`), so hosts with other cache keys share entries."""
    if recipe.kind == "disk":
        return recipe.digest("disk", IMPORT_VERSION, source_sha256(recipe))
    setup = hashlib.sha256(GUEST_SETUP.read_bytes() + GUEST_AGENT.read_bytes()).hexdigest()
    return recipe.digest(BUILDER_VERSION, setup)


def image_path(recipe: Recipe, key: str | None = None) -> Path:
    """Where the image of ``recipe`` (content address ``key``) is, or will be, cached."""
    return images_dir() / f"{recipe.name}-{(key or image_key(recipe))[:16]}"


def current_path(recipe: Recipe) -> Path | None:
    """Where the version of ``recipe`` that would be built now is cached; None when that
    cannot be told (a disk recipe whose disk is gone or unreadable)."""
    try:
        return image_path(recipe)
    except (SandboxError, OSError):
        return None


def cached_image(recipe: Recipe) -> Image | None:
    path = image_path(recipe)
    return Image.load(path) if (path / "manifest.json").exists() else None


def get_image(name_or_path: str, *, reporter: Reporter = QUIET) -> Image:
    """The image for a recipe name or file, building it first when the cache has none."""
    recipe = find_recipe(name_or_path)
    image = cached_image(recipe) or build_image(recipe, reporter=reporter)
    return replace(image, cloud_init_policy=recipe.cloud_init_errors)


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
    """Build ``recipe`` into the cache, or return the copy a concurrent builder made. With a
    registry set (``SANDBOX_REGISTRY``) a missing image is pulled from it when it has one,
    and one built here is pushed when ``SANDBOX_PUSH=1`` (:mod:`sandbox.share.store`)."""
    key = image_key(recipe)
    final = image_path(recipe, key)
    with entry_lock(final, lambda: reporter.note(f"waiting for a concurrent build of "
                                                 f"{recipe.name}...")):
        if (final / "manifest.json").exists():
            if not force:
                return Image.load(final)
            remove_image(Image.load(final))
        if force:  # a rebuild, asked for: not the registry's copy
            image = _build(recipe, key, final, reporter)
            offer(Entry("image", final, key), reporter=reporter)
            return image
        with remote_entry("image", key, final, reporter=reporter,
                          check=lambda work, manifest: check_pulled(key, work, manifest)
                          ) as remote:
            if remote.manifest is not None:
                return Image(final, remote.manifest)
            image = _build(recipe, key, final, reporter)
            remote.built(Entry("image", final, key), reporter=reporter)
            return image


def check_pulled(key: str, work: Path, manifest: dict[str, Any]) -> None:
    """Refuse a pulled image that is not the one asked for, or lacks what logs into it."""
    if manifest.get("digest") != key:
        raise ImageError(f"the registry's image-{key[:16]}... holds image "
                         f"{str(manifest.get('digest'))[:16]}...; it was not used")
    if not (work / CLIENT_KEY).exists() or not str(manifest.get("client_key", "")).startswith(
            "ssh-ed25519 "):
        raise ImageError(f"the registry's image-{key[:16]}... has no client key; it was not "
                         "used")


def _build(recipe: Recipe, key: str, final: Path, reporter: Reporter) -> Image:
    if recipe.kind == "disk":
        digest = source_sha256(recipe)
        with reporter.stage(f"{recipe.name}: importing {recipe.disk}"):
            manifest = publish(final, lambda work: _with_manifest(
                work, import_into(recipe, key, digest, work, reporter,
                                  _client_key(work))),
                private=("seed.iso", CLIENT_KEY))
        return Image(final, manifest, built_now=True)
    tools = require_tools()
    check_space(recipe, images_dir())
    manifest = publish(final, lambda work: _with_manifest(
        work, build_into(recipe, key, work, tools, reporter, _client_key(work))),
        private=(CLIENT_KEY,))
    return Image(final, manifest, built_now=True)


def _client_key(work: Path) -> KeyPair:
    """The key an image built in ``work`` lets in: this cache's, copied into the entry."""
    return cache_key().copy_to(work / CLIENT_KEY)


def _with_manifest(work: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    (work / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


