"""Image recipes: ``images/<name>.toml`` parsed into a validated :class:`Recipe`."""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..base.sizes import parse_size
from ..errors import RecipeError
from ..host.cpu import cpu_model_problem


def builtin_recipes() -> Path | None:
    """The recipes shipped with the project: inside the installed package (a wheel carries
    the checkout's ``images/`` as ``sandbox/images``), or, in a checkout (an editable
    install), ``images/`` beside the package."""
    packaged = Path(__file__).resolve().parents[1] / "images"
    if packaged.is_dir():
        return packaged
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "pyproject.toml").is_file() and (checkout / "images").is_dir():
        return checkout / "images"
    return None

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_PACKAGE = re.compile(r"^[a-z0-9][a-z0-9+.-]+(?:[=:][A-Za-z0-9.+~:-]+)?$")


@dataclass(frozen=True)
class FileEntry:
    """A file to place into the image: inline ``content`` or a ``source`` next to the recipe."""

    path: str
    content: str | None = None
    source: str | None = None
    mode: int = 0o644

    def data(self, base: Path) -> bytes:
        if self.content is not None:
            return self.content.encode()
        assert self.source is not None
        return (base / self.source).read_bytes()


@dataclass(frozen=True)
class Recipe:
    """Everything that decides what an image contains (see ``images/README.md``)."""

    name: str
    description: str = ""
    suite: str = "bookworm"
    mirror: str = ""
    components: tuple[str, ...] = ("main",)
    packages: tuple[str, ...] = ()
    files: tuple[FileEntry, ...] = ()
    customize: tuple[str, ...] = ()
    kernel_cmdline: str = ""
    memory: str = "1G"
    cpus: int = 2
    #: The guest's default CPU model (QEMU's -cpu), "": the accelerator's default.
    cpu: str = ""
    disk_size: str = "2G"
    #: A disk recipe's image: a path (relative to the recipe) or an http(s) URL.
    disk: str = ""
    sha256: str = ""
    boot: str = "bios"
    #: The account that gets the cache's key ("": cloud-init's default user).
    user: str = ""
    cloud_init_user_data: str = ""
    #: What a cloud-init module error does at boot: "warn" (a SandboxWarning; the machine is
    #: used, since SSH lets the user in) or "fail" (a BootError).
    cloud_init_errors: str = "warn"
    path: Path | None = field(default=None, compare=False)

    @property
    def kind(self) -> str:
        """``disk`` for a recipe that imports a disk image, ``debian`` for one built here."""
        return "disk" if self.disk else "debian"

    @property
    def disk_is_url(self) -> bool:
        return self.disk.startswith(("http://", "https://"))

    @property
    def disk_path(self) -> Path:
        """A disk recipe's local disk file (not for URLs)."""
        base = self.path.parent if self.path else Path.cwd()
        return (base / self.disk).resolve()

    @property
    def memory_bytes(self) -> int:
        return parse_size(self.memory, default_unit="M")

    @property
    def disk_bytes(self) -> int:
        return parse_size(self.disk_size, default_unit="M")

    def canonical(self) -> dict[str, Any]:
        """The recipe as plain data, with file contents resolved: what the cache key hashes."""
        data = asdict(self)
        data.pop("path")
        for key in (_DEBIAN_ONLY if self.kind == "disk" else _DISK_ONLY):
            data.pop(key)
        # A policy on using the image, not part of it: changing it neither rebuilds the image
        # nor boots it again (the golden snapshot records cloud-init's errors, and each clone
        # is checked against the recipe's policy of the day).
        data.pop("cloud_init_errors", None)
        if not data["cpu"]:  # the same: recipes without a cpu keep their keys
            data.pop("cpu")
        base = self.path.parent if self.path else Path.cwd()
        data["files"] = [
            {"path": f.path, "mode": f.mode,
             "sha256": hashlib.sha256(f.data(base)).hexdigest()}
            for f in self.files
        ]
        return data

    def digest(self, *extra: str) -> str:
        payload = json.dumps([self.canonical(), *extra], sort_keys=True).encode()
        return hashlib.sha256(payload).hexdigest()


_FIELDS: dict[str, type | tuple[type, ...]] = {
    "description": str, "suite": str, "mirror": str, "components": list, "packages": list,
    "files": list, "customize": list, "kernel_cmdline": str, "memory": (str, int),
    "cpus": int, "cpu": str, "disk_size": (str, int), "name": str, "disk": str, "sha256": str,
    "boot": str, "user": str, "cloud_init": dict, "cloud_init_errors": str,
}
#: Fields of recipes built from Debian packages, which a disk recipe cannot have.
_DEBIAN_ONLY = ("suite", "mirror", "components", "packages", "files", "customize",
                "kernel_cmdline", "disk_size")
_DISK_ONLY = ("disk", "sha256", "boot", "user", "cloud_init_user_data", "cloud_init_errors")
#: File names taken as disk images (not recipes) where an image is asked for by path.
DISK_SUFFIXES = (".qcow2", ".img", ".raw", ".vmdk", ".vdi", ".vhdx")
_USER = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
_FILE_FIELDS = {"path", "content", "source", "mode"}


def _unknown(where: str, key: str, known: set[str] | dict[str, Any]) -> RecipeError:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return RecipeError(f"{where}: unknown field {key!r}{hint} (known fields: "
                       f"{', '.join(sorted(known))})")


def parse_recipe(path: Path) -> Recipe:
    """Read and validate a recipe file; every problem names the file and the field."""
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such recipe file") from None
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{path}: not valid TOML: {exc}") from None
    where = str(path)
    for key, value in raw.items():
        if key not in _FIELDS:
            raise _unknown(where, key, _FIELDS)
        if not isinstance(value, _FIELDS[key]) or isinstance(value, bool):
            expected = _FIELDS[key]
            names = " or ".join(t.__name__ for t in (expected if isinstance(expected, tuple)
                                                     else (expected,)))
            raise RecipeError(f"{where}: field {key!r} must be {names}, got {value!r}")

    name = raw.get("name", path.stem)
    if not _NAME.match(name):
        raise RecipeError(f"{where}: field 'name' {name!r} must be lower case letters, digits, "
                          "'.', '_' or '-'")
    for key in ("components", "packages", "customize"):
        for item in raw.get(key, []):
            if not isinstance(item, str):
                raise RecipeError(f"{where}: field {key!r} must hold strings, got {item!r}")
    for package in raw.get("packages", []):
        if not _PACKAGE.match(package):
            raise RecipeError(f"{where}: field 'packages': {package!r} is not a Debian "
                              "package name")
    for key, unit in (("memory", "M"), ("disk_size", "M")):
        if key in raw:
            try:
                parse_size(raw[key], default_unit=unit)
            except ValueError as exc:
                raise RecipeError(f"{where}: field {key!r}: {exc}") from None
    if "cpus" in raw and not 1 <= raw["cpus"] <= 64:
        raise RecipeError(f"{where}: field 'cpus' must be between 1 and 64, got {raw['cpus']}")
    if "cpu" in raw and (problem := cpu_model_problem(raw["cpu"])):
        raise RecipeError(f"{where}: field 'cpu': {problem}")
    _check_disk_fields(where, raw)

    files = []
    for index, entry in enumerate(raw.get("files", [])):
        here = f"{where}: files[{index}]"
        if not isinstance(entry, dict):
            raise RecipeError(f"{here} must be a table with 'path' and 'content' or 'source'")
        for key in entry:
            if key not in _FILE_FIELDS:
                raise _unknown(here, key, _FILE_FIELDS)
        guest_path = str(entry.get("path", ""))
        if not guest_path.startswith("/"):
            raise RecipeError(f"{here}: field 'path' must be an absolute guest path")
        if ".." in guest_path.split("/") or "\0" in guest_path or guest_path.endswith("/"):
            raise RecipeError(f"{here}: field 'path' {guest_path!r} must name a file inside the "
                              "image, without '..' parts")
        if ("content" in entry) == ("source" in entry):
            raise RecipeError(f"{here}: give exactly one of 'content' or 'source'")
        if "source" in entry:
            _check_source(here, path.parent, str(entry["source"]))
        mode = entry.get("mode", "0644")
        try:
            mode_int = int(mode, 8) if isinstance(mode, str) else int(mode)
        except ValueError:
            raise RecipeError(f"{here}: field 'mode' must be octal like \"0644\"") from None
        files.append(FileEntry(path=entry["path"], content=entry.get("content"),
                               source=entry.get("source"), mode=mode_int))

    return Recipe(
        name=name,
        description=raw.get("description", ""),
        suite=raw.get("suite", "bookworm"),
        mirror=raw.get("mirror", ""),
        components=tuple(raw.get("components", ["main"])),
        packages=tuple(raw.get("packages", [])),
        files=tuple(files),
        customize=tuple(raw.get("customize", [])),
        kernel_cmdline=raw.get("kernel_cmdline", ""),
        memory=str(raw.get("memory", "1G")),
        cpus=raw.get("cpus", 2),
        cpu=raw.get("cpu", ""),
        disk_size=str(raw.get("disk_size", "2G")),
        disk=raw.get("disk", ""),
        sha256=raw.get("sha256", "").lower(),
        boot=raw.get("boot", "bios"),
        user=raw.get("user", ""),
        cloud_init_user_data=raw.get("cloud_init", {}).get("user_data", ""),
        cloud_init_errors=raw.get("cloud_init_errors", "warn"),
        path=path.resolve(),
    )


def _check_disk_fields(where: str, raw: dict[str, Any]) -> None:
    """The fields of a recipe that imports a disk image (``disk = ...``)."""
    if "disk" not in raw:
        for key in ("sha256", "boot", "user", "cloud_init", "cloud_init_errors"):
            if key in raw:
                raise RecipeError(f"{where}: field {key!r} belongs to a recipe with 'disk' "
                                  "(a disk image to import); add 'disk' or remove it")
        return
    for key in _DEBIAN_ONLY:
        if key in raw:
            raise RecipeError(f"{where}: field {key!r} is for recipes built from Debian "
                              "packages, not for one that imports a disk image ('disk')")
    disk = raw["disk"]
    if not disk or "\0" in disk:
        raise RecipeError(f"{where}: field 'disk' must be a path or an http(s) URL")
    digest = raw.get("sha256", "")
    if digest and not re.fullmatch(r"[0-9a-fA-F]{64}", digest):
        raise RecipeError(f"{where}: field 'sha256' must be 64 hexadecimal digits")
    if disk.startswith(("http://", "https://")) and not digest:
        raise RecipeError(f"{where}: a disk from a URL needs its 'sha256' (the download is "
                          "checked against it); add sha256 = \"...\"")
    if "://" in disk and not disk.startswith(("http://", "https://")):
        raise RecipeError(f"{where}: field 'disk' {disk!r}: only http:// and https:// URLs "
                          "(or a path) are supported")
    if raw.get("boot", "bios") not in ("bios", "uefi"):
        raise RecipeError(f"{where}: field 'boot' must be \"bios\" or \"uefi\", got "
                          f"{raw['boot']!r}")
    if raw.get("cloud_init_errors", "warn") not in ("warn", "fail"):
        raise RecipeError(f"{where}: field 'cloud_init_errors' must be \"warn\" or \"fail\", "
                          f"got {raw['cloud_init_errors']!r}")
    if "user" in raw and not _USER.match(raw["user"]):
        raise RecipeError(f"{where}: field 'user' {raw['user']!r} is not an account name")
    cloud_init = raw.get("cloud_init", {})
    for key, value in cloud_init.items():
        if key != "user_data":
            raise _unknown(f"{where}: [cloud_init]", key, {"user_data"})
        if not isinstance(value, str) or not value.lstrip().startswith("#cloud-config"):
            raise RecipeError(f"{where}: [cloud_init] user_data must be a string starting "
                              "with '#cloud-config'")


def _check_source(here: str, base: Path, source: str) -> None:
    """A ``source`` must be a file inside the recipe's directory: a recipe cannot copy the
    host's other files (``/etc/shadow``, ``../../secret``) into an image."""
    resolved = (base / source).resolve()
    if not resolved.is_relative_to(base.resolve()):
        raise RecipeError(f"{here}: field 'source' {source!r} is outside the recipe's "
                          f"directory {base}; copy the file next to the recipe")
    if not resolved.is_file():
        raise RecipeError(f"{here}: field 'source': no file {source!r} next to the recipe")


def recipe_dirs() -> list[Path]:
    """Recipe search path: ``SANDBOX_IMAGES_PATH`` (colon separated), ./images, built-ins."""
    import os

    dirs = [Path(p) for p in os.environ.get("SANDBOX_IMAGES_PATH", "").split(":") if p]
    dirs.append(Path.cwd() / "images")
    builtin = builtin_recipes()
    if builtin is not None:
        dirs.append(builtin)
    seen: list[Path] = []
    for d in dirs:
        if d.is_dir() and d.resolve() not in seen:
            seen.append(d.resolve())
    return seen


def known_recipes() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for directory in recipe_dirs():
        for file in sorted(directory.glob("*.toml")):
            found.setdefault(file.stem, file)
    return found


def find_recipe(name_or_path: str) -> Recipe:
    """A recipe by name (``debian-12``) or by path (``./my.toml``); a disk image's path
    (``./disk.qcow2``) gives a recipe made on the fly that imports it (BIOS boot,
    cloud-init's default user)."""
    if name_or_path.lower().endswith(DISK_SUFFIXES):
        return disk_recipe(Path(name_or_path))
    if name_or_path.endswith(".toml") or "/" in name_or_path:
        return parse_recipe(Path(name_or_path))
    known = known_recipes()
    if name_or_path not in known:
        names = ", ".join(sorted(known)) or "none"
        close = difflib.get_close_matches(name_or_path, list(known), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise RecipeError(f"unknown image {name_or_path!r}.{hint} Known images: {names}. "
                          "Add images/<name>.toml or pass a path to a recipe file.")
    return parse_recipe(known[name_or_path])


def disk_recipe(disk: Path) -> Recipe:
    """The recipe that imports disk image ``disk`` as it is: named after the file, keyed
    by its path and content like any recipe's disk."""
    if not disk.is_file():
        raise RecipeError(f"{disk}: no such disk image file (an image is a recipe name, a "
                          "recipe's .toml path, or the path of a disk image file)")
    name = re.sub(r"[^a-z0-9._-]+", "-", disk.name.split(".")[0].lower()).strip("-._")
    return Recipe(name=name or "disk", description=f"the disk image {disk.name}",
                  disk=str(disk.resolve()), path=None)
