"""An ordinary account to run the sandbox as, and the package installed for it from a wheel.

Users run the sandbox as ordinary accounts with the plugin pip-installed into their own
project. The suite (and the benchmark) prove that path: as root they drop to a dedicated
account, ``sandbox-test``, made here if it does not exist (no other account is touched);
run by an ordinary account, they use that account itself.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: The account the suite makes and uses when it runs as root.
ACCOUNT = "sandbox-test"
#: What a user's project has beside the plugin: xdist, and the tools vm.testinfra(),
#: sandbox.ansible_inventory and the HTML report serve.
USERS_TOOLS = ("pytest-xdist", "pytest-testinfra", "ansible-core", "pytest-html")
#: An ordinary account's PATH: no /usr/sbin, no /sbin.
ORDINARY_PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    home: Path

    @property
    def is_me(self) -> bool:
        return self.uid == os.getuid()

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a fresh login of this account (no sbin on PATH), plus
        ``extra``; ``PATH`` in ``extra`` is put in front of the ordinary one."""
        env = {"HOME": str(self.home), "USER": self.name, "LOGNAME": self.name,
               "LANG": "C.UTF-8", "PATH": ORDINARY_PATH}
        if "PATH" in extra:
            extra = dict(extra, PATH=f"{extra['PATH']}:{ORDINARY_PATH}")
        env.update(extra)
        return env

    def run(self, argv: list[str], *, env: dict[str, str] | None = None,
            cwd: Path | None = None, timeout: float = 900,
            check: bool = False) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` as this account with exactly ``env`` (default: :meth:`env`)."""
        env = env if env is not None else self.env()
        if self.is_me:
            command = argv
        else:  # as root: runuser drops to the account; env -i leaves nothing of root's
            command = ["runuser", "-u", self.name, "--", "env", "-i",
                       *[f"{k}={v}" for k, v in env.items()], *argv]
        result = subprocess.run(command, env=env if self.is_me else None, cwd=cwd,
                                capture_output=True, text=True, timeout=timeout,
                                stdin=subprocess.DEVNULL, check=False)
        if check and result.returncode != 0:
            raise AssertionError(f"{argv} as {self.name} exited {result.returncode}:\n"
                                 f"{result.stdout}\n{result.stderr}")
        return result

    def write(self, path: Path, text: str) -> None:
        """Write a file owned by this account (the caller may be root)."""
        if self.is_me:
            path.write_text(text)
        else:
            subprocess.run(["runuser", "-u", self.name, "--", "sh", "-c", 'cat > "$1"', "sh",
                            str(path)], input=text, text=True, check=True)

    def make_workdir(self) -> Path:
        """A fresh directory of this account's own, in its home."""
        made = self.run(["mktemp", "-d", f"{self.home}/sandbox-tests.XXXXXX"], check=True)
        return Path(made.stdout.strip())

    def remove(self, path: Path) -> None:
        """Remove a directory of this account's (cache entries are sealed read-only)."""
        self.run(["sh", "-c", 'chmod -R u+w "$1" 2>/dev/null; rm -rf "$1"', "sh", str(path)])


def ordinary_account() -> Account:
    """The account to test as: this one when it is not root, else ``sandbox-test``."""
    if os.geteuid() != 0:
        entry = pwd.getpwuid(os.getuid())
        return Account(entry.pw_name, entry.pw_uid, Path(entry.pw_dir))
    try:
        entry = pwd.getpwnam(ACCOUNT)
    except KeyError:
        # useradd gives a new account a subordinate id range on Debian (SUB_UID_COUNT).
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", "--comment",
                        "pytest-qemu-sandbox test account", ACCOUNT], check=True)
        entry = pwd.getpwnam(ACCOUNT)
    account = Account(entry.pw_name, entry.pw_uid, Path(entry.pw_dir))
    if not account.home.is_dir():
        subprocess.run(["mkhomedir_helper", ACCOUNT], check=False)
        account.home.mkdir(mode=0o755, exist_ok=True)
        os.chown(account.home, entry.pw_uid, entry.pw_gid)
    _ensure_subordinate_ids(account)
    return account


def _ensure_subordinate_ids(account: Account) -> None:
    """Give the test account a subordinate id range if it has none (it is ours)."""
    from sandbox.host.access import SUBORDINATE_IDS, free_subordinate_start

    for kind in ("uid", "gid"):
        path = Path(f"/etc/sub{kind}")
        lines = path.read_text().splitlines() if path.exists() else []
        if any(line.split(":")[0] in (account.name, str(account.uid)) for line in lines):
            continue
        start = free_subordinate_start()
        flag = "--add-subuids" if kind == "uid" else "--add-subgids"
        subprocess.run(["usermod", flag, f"{start}-{start + SUBORDINATE_IDS - 1}",
                        account.name], check=True)


def build_wheelhouse(directory: Path) -> Path:
    """This checkout built into a wheel, beside wheels of everything it and pytest-xdist
    need, so that a virtualenv can be made from it without an index. Returns the wheel."""
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check",
                    "-w", str(directory), str(ROOT), *USERS_TOOLS], check=True,
                   capture_output=True, timeout=900)
    directory.chmod(0o755)
    for wheel in directory.iterdir():
        wheel.chmod(0o644)
    return next(directory.glob("pytest_qemu_sandbox-*.whl"))


def python_for(account: Account) -> str:
    """A Python 3.11+ with venv that ``account`` may run (this one's may live under a
    home it cannot enter)."""
    candidates = [os.path.realpath(sys._base_executable), shutil.which("python3.12"),
                  shutil.which("python3.11"), "/usr/bin/python3"]
    for candidate in candidates:
        if candidate and account.run([candidate, "-c", "import sys, venv, ensurepip; "
                                      "sys.exit(sys.version_info < (3, 11))"]).returncode == 0:
            return candidate
    raise AssertionError(f"no Python 3.11+ with venv that {account.name} can run; "
                         "install python3-venv")


def install_from_wheelhouse(account: Account, wheelhouse: Path, venv: Path) -> Path:
    """A fresh virtualenv at ``venv``, owned by ``account``, with the package installed
    from the wheel (no index, no checkout). Returns its bin directory."""
    account.run([python_for(account), "-m", "venv", str(venv)], check=True, timeout=300)
    account.run([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check",
                 "--no-index", "--find-links", str(wheelhouse), "pytest-qemu-sandbox",
                 *USERS_TOOLS], check=True, timeout=600)
    return venv / "bin"


def shared_tmp() -> Path:
    """A fresh directory any account may read (for the wheelhouse)."""
    path = Path(tempfile.mkdtemp(prefix="sandbox-wheelhouse-"))
    path.chmod(0o755)
    return path
