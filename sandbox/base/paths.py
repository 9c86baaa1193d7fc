"""Where the sandbox keeps things, and how it finds host tools.

Two places belong to the account that runs the sandbox and to no one else:

- the **cache** (images, golden snapshots, keys, host probe results): persistent, under the
  XDG cache directory, or ``SANDBOX_CACHE_DIR``;
- the **runtime directory** (QMP sockets, console logs, disk overlays, pid files):
  ``$XDG_RUNTIME_DIR/sandbox`` when the session has a private runtime
  directory, else ``<tmp>/sandbox-<uid>``, or ``SANDBOX_RUNTIME_DIR``.

Both are checked before use, as ssh-agent and tmux check their socket directories: a real
directory (not a symbolic link) owned by this account and closed to other accounts (mode
0700). A directory that another local user made first, or a link planted in its place, would
let that user redirect this account's sockets and pid files, read golden snapshots' guest RAM
or hold the cache's locks. Such a place is refused with an error that names the path and the
fix; only a cache of this account's own that an earlier release left open (0755) is closed
in place, with a one-time notice. Lock files are made 0600 (:func:`private_lock`).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import stat
import sys
import tempfile
import warnings
from pathlib import Path

import filelock
import platformdirs

from ..errors import HostError, SandboxWarning

APP = "pytest-qemu-sandbox"
#: The runtime directory's name inside $XDG_RUNTIME_DIR: short, since a unix socket path
#: (``machines/<63-character name>/agent.sock`` below it) may not exceed 107 bytes.
RUNTIME_LEAF = "sandbox"

#: Debian puts mke2fs, tune2fs, resize2fs, debugfs and chroot here, and an ordinary
#: account's PATH does not include them.
SYSTEM_TOOL_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")


def find_tool(name: str) -> str | None:
    """The path of host program ``name``: on PATH, or where Debian keeps system tools."""
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(SYSTEM_TOOL_DIRS))


def tool_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """An environment whose PATH also holds the system tool directories (for programs such
    as mmdebstrap that run other host tools themselves)."""
    env = dict(os.environ if base is None else base)
    parts = [p for p in env.get("PATH", os.defpath).split(os.pathsep) if p]
    env["PATH"] = os.pathsep.join(parts + [d for d in SYSTEM_TOOL_DIRS if d not in parts])
    return env


def account_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def cache_dir() -> Path:
    """Images, golden snapshots, keys and host probe results (``SANDBOX_CACHE_DIR``).

    Made private (mode 0700): golden snapshots hold guest RAM (prepared secrets, an imported
    image's SSH host key), and its lock files must be out of other accounts' reach (one that
    holds a lock stalls every start). A cache of this account's that is open to others (made
    by an earlier release) is closed once, with a notice; a link or another account's
    directory is refused."""
    override = os.environ.get("SANDBOX_CACHE_DIR")
    path = Path(override) if override else Path(platformdirs.user_cache_dir(APP))
    how = ("point SANDBOX_CACHE_DIR at a directory of your own" if override else
           "set SANDBOX_CACHE_DIR to a directory of your own")
    _make_dir(path, "cache directory", how, mode=0o700)
    try:
        info = os.lstat(path)
    except OSError as exc:
        raise HostError(f"the cache directory {path} cannot be used ({exc.strerror}); "
                        f"{how}") from None
    if stat.S_ISDIR(info.st_mode) and info.st_uid != os.getuid():
        raise HostError(
            f"the cache directory {path} belongs to {account_name(info.st_uid)}, not to you "
            f"({account_name(os.getuid())}): a cache serves one account (its images carry "
            f"that account's SSH key, its golden snapshots must be writable by it). Use your "
            f"own cache (unset SANDBOX_CACHE_DIR to get "
            f"{platformdirs.user_cache_dir(APP)}), or take this one over with: "
            f"sudo chown -R {account_name(os.getuid())}: {path}")
    if stat.S_ISLNK(info.st_mode):
        target = os.path.realpath(path)
        how = (f"point SANDBOX_CACHE_DIR at the directory itself "
               f"(SANDBOX_CACHE_DIR={target}) if it is yours, or at another directory of "
               f"your own")
    elif stat.S_ISDIR(info.st_mode) and info.st_mode & 0o077:
        _close_cache(path, stat.S_IMODE(info.st_mode))
        return path
    check_private_dir(path, "cache directory", how)
    return path


def _close_cache(path: Path, mode: int) -> None:
    """Make this account's open cache (an earlier release made it 0755) private, once."""
    try:
        os.chmod(path, 0o700, follow_symlinks=False)
    except OSError as exc:
        raise HostError(f"the cache directory {path} is open to other accounts (mode "
                        f"{mode:04o}) and could not be made private ({exc.strerror}); make "
                        f"it private with chmod 700 {path}") from None
    warnings.warn(SandboxWarning(
        f"the cache directory {path} was open to other accounts (mode {mode:04o}: they could "
        f"read golden snapshots' guest RAM and hold its locks); it is now private (mode "
        f"0700). Nothing else changes; this notice is shown once."), stacklevel=3)


def private_lock(path: Path, timeout: float = -1) -> filelock.FileLock:
    """A lock file only this account can open (mode 0600; one made looser by an earlier
    release is closed). Kept in a private directory, no other account can take it: flock
    works on a read-only descriptor, so a readable lock file is one anyone can hold."""
    with contextlib.suppress(OSError):
        info = os.lstat(path)
        if info.st_mode & 0o077 and info.st_uid == os.getuid() and stat.S_ISREG(info.st_mode):
            os.chmod(path, 0o600)
    return filelock.FileLock(str(path), timeout=timeout, mode=0o600)


def runtime_dir() -> Path:
    """Run state: QMP sockets, console logs, disk overlays (``SANDBOX_RUNTIME_DIR``).

    Kept short on purpose: unix socket paths are limited to 107 bytes.
    """
    override = os.environ.get("SANDBOX_RUNTIME_DIR")
    if override:
        path = Path(override)
    else:
        session = os.environ.get("XDG_RUNTIME_DIR")
        if session and _private(Path(session)):
            path = Path(session) / RUNTIME_LEAF
        else:  # no session runtime directory (cron, CI, su): a private one under tmp
            path = Path(tempfile.gettempdir()) / f"sandbox-{os.getuid()}"
    fix = ("set SANDBOX_RUNTIME_DIR to a private directory of yours (it is created with "
           "mode 0700)")
    _make_dir(path, "runtime directory", fix, mode=0o700)
    check_private_dir(path, "runtime directory", fix)
    return path


def check_private_dir(path: Path, what: str, fix: str) -> None:
    """Refuse ``path`` unless it is a real directory of this account closed to others."""
    info = os.lstat(path)
    me = account_name(os.getuid())
    if stat.S_ISLNK(info.st_mode):
        raise HostError(f"the {what} {path} is a symbolic link (to {os.readlink(path)}); "
                        f"refusing to follow it, since another account may have planted it. "
                        f"Remove the link if it is yours (rm {path}), or {fix}")
    if not stat.S_ISDIR(info.st_mode):
        raise HostError(f"the {what} {path} is not a directory; remove it or {fix}")
    if info.st_uid != os.getuid():
        raise HostError(f"the {what} {path} belongs to {account_name(info.st_uid)}, not to you "
                        f"({me}): another account created it first, and using it would let "
                        f"that account reach your machines' sockets and files. Ask an "
                        f"administrator to remove it (sudo rm -rf {path}), or {fix}")
    if info.st_mode & 0o077:
        raise HostError(f"the {what} {path} is open to other accounts (mode "
                        f"{stat.S_IMODE(info.st_mode):04o}); make it private with "
                        f"chmod 700 {path} (or remove it), or {fix}")


def _private(path: Path) -> bool:
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return (stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid()
            and not info.st_mode & 0o077)


def _make_dir(path: Path, what: str, fix: str, mode: int = 0o755) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir(mode=mode, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        if path.is_symlink():  # a dangling link: the caller's check names it
            return
        if path.parent.is_dir():
            raise HostError(f"the {what} {path} exists but is not a directory; "
                            f"{fix}") from None
        raise HostError(f"the {what} {path} cannot be made: a part of that path is a "
                        f"file, not a directory; {fix}") from None
    except PermissionError as exc:
        raise HostError(f"the {what} {path} cannot be made ({exc.strerror}: "
                        f"{exc.filename}); {fix}") from None


def module_process(module: str, *args: str) -> tuple[list[str], dict[str, str]]:
    """The command line and environment that run ``python -m MODULE ARGS`` (``module``: the
    helper module's ``__name__``, so that the command follows the module) as a process of
    its own (a console keeper, a network switch), with this very package importable whether
    it is installed or a checkout."""
    package_parent = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [package_parent, *filter(None, [os.environ.get("PYTHONPATH")])]))
    return [sys.executable, "-m", module, *args], env
