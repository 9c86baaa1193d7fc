"""A Debian recipe built into an image's files (no loop mounts, no downloads beyond the
Debian mirror the host already uses)::

    as root:    recipe --mmdebstrap --mode=root--> tree --mke2fs -d--> ext4 raw
    otherwise:  recipe --mmdebstrap --mode=unshare--> tarball --genext2fs, tune2fs--> ext4 raw
                ext4 raw --qemu-img--> disk.qcow2; the kernel and initrd come out beside it
                (direct kernel boot)

Both give the same tree, owners and modes included (unshare mode maps root to this
account's subordinate ids; the tarball records them as root's); genext2fs keeps no extended
attributes (file capabilities). The root path is kept because it is faster.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from ..base.entries import remove_entry
from ..base.paths import SYSTEM_TOOL_DIRS, find_tool, tool_env
from ..base.progress import Reporter
from ..base.sizes import format_size
from ..errors import HostError, ImageError
from ..guest.files import GUEST_AGENT, GUEST_SETUP
from ..guest.keys import KeyPair
from ..host.access import TOOL_PACKAGES, unprivileged_build_problems
from .recipe import Recipe

#: Bumped whenever the build pipeline changes what ends up in an image.
BUILDER_VERSION = "4"


#: Packages the sandbox itself relies on inside every guest, added to each recipe's list
#: (python3 runs the guest agent that gives each clone its own clock and randomness).
BASE_PACKAGES = ("systemd-sysv", "udev", "dropbear-bin", "openssh-sftp-server", "socat",
                 "iproute2", "python3")


#: Kernel command line every image gets; the recipe's ``kernel_cmdline`` is appended.
BASE_CMDLINE = "root=/dev/vda rw console=ttyS0 loglevel=4 net.ifnames=0 panic=-1"


#: Free space a build needs beyond the disk size (the tree, the raw file, the qcow2).
BUILD_HEADROOM = 1 << 30


#: The folder that carries the guest setup into the tree (its /tmp) and its results out.
_STAGE = "sandbox-build"


def require_tools() -> dict[str, str]:
    """The host programs a build runs (name -> path), or HostError naming what is missing
    and the one command that installs it."""
    unprivileged = os.geteuid() != 0
    names = ["mmdebstrap", "qemu-img"]
    names += ["genext2fs", "tune2fs", "e2fsck"] if unprivileged else ["mke2fs"]
    tools = {name: find_tool(name) for name in names}
    missing = [name for name, path in tools.items() if path is None]
    if missing:
        packages = sorted({TOOL_PACKAGES[name] for name in missing})
        raise HostError(f"building images needs {', '.join(missing)}, not found on PATH or in "
                        f"{', '.join(SYSTEM_TOOL_DIRS)}; install with: "
                        f"sudo apt-get install {' '.join(packages)}")
    if unprivileged:
        problems = unprivileged_build_problems()
        if problems:
            raise HostError("building images as an ordinary account needs user namespaces "
                            "(mmdebstrap --mode=unshare), and this host is not ready:\n  - "
                            + "\n  - ".join(problems)
                            + "\n(sandbox doctor checks this again; or build as root once and "
                            "use that cache as root)")
    return {name: str(path) for name, path in tools.items()}


def check_space(recipe: Recipe, directory: Path) -> None:
    usage = shutil.disk_usage(directory)
    need = recipe.disk_bytes + BUILD_HEADROOM
    if usage.free < need:
        raise ImageError(f"not enough space in the cache {directory}: "
                         f"{format_size(usage.free)} free, a build of {recipe.name!r} needs "
                         f"about {format_size(need)}. Free some space (sandbox image rm NAME) "
                         "or point SANDBOX_CACHE_DIR at a larger disk.")


def build_into(recipe: Recipe, key: str, work: Path, tools: dict[str, str],
               reporter: Reporter, client: KeyPair) -> dict[str, Any]:
    """mmdebstrap, then the filesystem, then qcow2 (``client``'s key lets SSH in); the
    manifest (the caller writes it). Everything the guest setup needs goes
    into the tree and everything it makes comes out through mmdebstrap's own copy-in and
    copy-out hooks, so the same hooks work in root and in unshare mode (where the namespace's
    root may not read this account's files)."""
    started = time.monotonic()
    stage = work / _STAGE
    (stage / "files").mkdir(parents=True)
    shutil.copyfile(GUEST_SETUP, stage / "setup.sh")
    shutil.copyfile(GUEST_AGENT, stage / "sandbox-agent")
    base = recipe.path.parent if recipe.path else Path.cwd()
    for index, entry in enumerate(recipe.files):
        (stage / "files" / str(index)).write_bytes(entry.data(base))
    (stage / "customize").mkdir()
    for index, script in enumerate(recipe.customize):  # a file each: may span lines
        (stage / "customize" / f"{index:04d}").write_text(script + "\n")
    env = tool_env()
    env.update(LC_ALL="C.UTF-8",
               SANDBOX_AUTHORIZED_KEY=client.public_line,
               SANDBOX_FILES="\n".join(f"{i} {oct(f.mode)[2:]} {f.path}"
                                       for i, f in enumerate(recipe.files)))
    packages = list(dict.fromkeys([*BASE_PACKAGES, *recipe.packages]))
    unprivileged = "genext2fs" in tools
    # Paths outside the tree are relative to the working directory: mmdebstrap splits
    # special hooks on white space, and the cache path may hold some.
    command = [tools["mmdebstrap"], "--variant=apt",
               "--mode=unshare" if unprivileged else "--mode=root",
               "--format=tar" if unprivileged else "--format=directory",
               f"--components={','.join(recipe.components)}",
               f"--include={','.join(packages)}",
               f"--customize-hook=copy-in {_STAGE} /tmp",
               f'--customize-hook=sh "$1/tmp/{_STAGE}/setup.sh" "$1"',
               f"--customize-hook=copy-out /tmp/{_STAGE}/out .",
               f'--customize-hook=rm -rf "$1/tmp/{_STAGE}"',
               recipe.suite, "-" if unprivileged else "tree", *apt_sources(recipe)]
    raw = work / "disk.raw"
    what = (f"{recipe.name}: installing {len(packages)} packages and writing the filesystem "
            f"(mmdebstrap --mode=unshare | genext2fs)" if unprivileged else
            f"{recipe.name}: installing {len(packages)} packages (mmdebstrap)")
    with reporter.stage(what):
        if unprivileged:
            tree_bytes = _bootstrap_to_ext2(recipe, command, tools, work, env, raw)
        else:
            _run(command, work / "mmdebstrap.log", env=env, cwd=work, what="mmdebstrap")
            tree_bytes = _tree_bytes(work / "tree")
            _check_fits(recipe, tree_bytes)
    kernel = work / "out" / "vmlinuz"
    if not kernel.exists():
        raise ImageError(f"recipe {recipe.name!r} installs no kernel: add a kernel package "
                         "such as linux-image-cloud-amd64 to 'packages'")
    if unprivileged:
        with reporter.stage(f"{recipe.name}: ext4 features (tune2fs, e2fsck)"):
            _run([tools["tune2fs"], "-O", "extents,uninit_bg,dir_index,has_journal", str(raw)],
                 work / "tune2fs.log", what="tune2fs")
            # e2fsck exits 1 when it optimised something (the new features): not an error.
            _run([tools["e2fsck"], "-fy", str(raw)], work / "e2fsck.log", what="e2fsck",
                 ok=(0, 1))
    else:
        with reporter.stage(f"{recipe.name}: ext4 filesystem {recipe.disk_size} (mke2fs -d)"):
            _run([tools["mke2fs"], "-q", "-F", "-t", "ext4", "-L", "sandbox-root", "-d",
                  str(work / "tree"), str(raw), str(recipe.disk_bytes // 1024) + "k"],
                 work / "mke2fs.log", what="mke2fs", too_small=recipe)
        remove_entry(work / "tree")
    with reporter.stage(f"{recipe.name}: qcow2 image (qemu-img convert)"):
        _run([tools["qemu-img"], "convert", "-f", "raw", "-O", "qcow2", str(raw),
              str(work / "disk.qcow2")], work / "qemu-img.log", what="qemu-img convert")
    raw.unlink()
    shutil.move(str(kernel), work / "vmlinuz")
    shutil.move(str(work / "out" / "initrd.img"), work / "initrd.img")
    host_key = (work / "out" / "ssh_host_ed25519_key.pub").read_text().split()
    for leftover in ("out", _STAGE):
        remove_entry(work / leftover)
    for log in work.glob("*.log"):
        log.unlink()
    manifest: dict[str, Any] = {
        "name": recipe.name,
        "digest": key,
        "builder_version": BUILDER_VERSION,
        "builder": ("mmdebstrap --mode=unshare, genext2fs, tune2fs" if unprivileged else
                    "mmdebstrap --mode=root, mke2fs -d"),
        "recipe_path": str(recipe.path) if recipe.path else None,
        "recipe": recipe.canonical(),
        "suite": recipe.suite,
        "kernel_cmdline": f"{BASE_CMDLINE} {recipe.kernel_cmdline}".strip(),
        "memory": recipe.memory,
        "cpus": recipe.cpus,
        "disk_size": recipe.disk_size,
        "tree_bytes": tree_bytes,
        "host_key": " ".join(host_key[:2]),
        "client_key": client.public_line,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "build_seconds": round(time.monotonic() - started, 1),
    }
    return manifest


def _bootstrap_to_ext2(recipe: Recipe, command: list[str], tools: dict[str, str], work: Path,
                       env: dict[str, str], raw: Path) -> int:
    """Unprivileged: mmdebstrap in a user namespace writes the tree as a tarball (owners and
    modes as root would have them), which genext2fs turns into the filesystem directly. The
    tarball is pumped through here to count its size (for the disk-size check)."""
    blocks = recipe.disk_bytes // 4096
    with (work / "mmdebstrap.log").open("wb") as mm_log, \
            (work / "genext2fs.log").open("wb") as gen_log:
        mmdebstrap = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=mm_log, env=env,
                                      cwd=work, stdin=subprocess.DEVNULL)
        genext2fs = subprocess.Popen(
            [tools["genext2fs"], "-B", "4096", "-b", str(blocks), "-i", "16384", "-L",
             "sandbox-root", "-a", "-", str(raw)],
            stdin=subprocess.PIPE, stdout=gen_log, stderr=subprocess.STDOUT, env=env)
        assert mmdebstrap.stdout is not None and genext2fs.stdin is not None
        total = 0
        writing = True
        try:
            while chunk := mmdebstrap.stdout.read(1 << 20):
                total += len(chunk)
                if writing:
                    try:
                        genext2fs.stdin.write(chunk)
                    except BrokenPipeError:  # it gave up (no space): keep counting
                        writing = False
        except BaseException:
            # SIGTERM, not SIGKILL: mmdebstrap then removes its temporary tree, whose files
            # belong to subordinate ids that this account cannot delete itself.
            mmdebstrap.terminate()
            genext2fs.kill()
            raise
        finally:
            for stream in (mmdebstrap.stdout, genext2fs.stdin):
                with contextlib.suppress(OSError):
                    stream.close()
            mm_status = mmdebstrap.wait()
            gen_status = genext2fs.wait()
    _check_status(mm_status, work / "mmdebstrap.log", what="mmdebstrap")
    _check_fits(recipe, total)
    _check_status(gen_status, work / "genext2fs.log", what="genext2fs", too_small=recipe)
    return total


def _check_fits(recipe: Recipe, tree_bytes: int) -> None:
    need = int(tree_bytes * 1.15) + (64 << 20)
    if recipe.disk_bytes < need:
        raise ImageError(f"recipe {recipe.name!r}: disk_size {recipe.disk_size} is too small "
                         f"for the tree ({format_size(tree_bytes)}); set disk_size to at least "
                         f"{format_size(need)} in {recipe.path}")


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
         cwd: Path | None = None, too_small: Recipe | None = None,
         ok: tuple[int, ...] = (0,)) -> None:
    with log.open("wb") as handle:
        result = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env,
                                cwd=cwd, stdin=subprocess.DEVNULL, check=False)
    _check_status(result.returncode, log, what=what, too_small=too_small, ok=ok)


def _check_status(status: int, log: Path, *, what: str, too_small: Recipe | None = None,
                  ok: tuple[int, ...] = (0,)) -> None:
    """ImageError for a failed build step, with the cause read from its log."""
    if status in ok:
        return
    output = log.read_text(errors="replace")
    missing = re.findall(r"Unable to locate package (\S+)", output)
    missing += re.findall(r"Package '([^']+)' has no installation candidate", output)
    if missing:
        raise ImageError(f"package(s) not found in the archive: {', '.join(sorted(set(missing)))}"
                         " — check the names in the recipe's 'packages' "
                         "(apt-cache search NAME)")
    if too_small and re.search(r"(No space left|Could not allocate block|no free space|"
                               r"no free inode)", output):
        raise ImageError(f"recipe {too_small.name!r}: disk_size {too_small.disk_size} is too "
                         "small for the tree; raise disk_size in the recipe")
    if "newuidmap" in output or "subuid" in output or "unshare" in output.lower():
        problems = unprivileged_build_problems()
        if problems:
            raise ImageError(f"{what} could not use user namespaces: " + "; ".join(problems))
    errors = [line for line in output.splitlines() if line.startswith(("E:", "W:"))]
    tail = "\n".join((errors or output.splitlines())[-15:])
    raise ImageError(f"{what} failed with status {status}:\n{tail}")


def _tree_bytes(tree: Path) -> int:
    total = 0
    for root, dirs, files in os.walk(tree):
        for name in dirs + files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total
