"""Benchmark: a failed test's machine saved, and resumed with ``sandbox debug`` to a shell.

    .venv/bin/python bench/replay.py [--json]

1. A suite whose one test starts a service (systemd unit, a Python server holding a value in
   memory), writes a file and fails, run with ``--sandbox-save-failed``, from this host's
   cache (``SANDBOX_CACHE_DIR`` or the default; debian-12 built there if missing): the save's
   time and the file's size, as the report prints them; the same with
   ``--sandbox-save-failed-base``.
2. Debian's docker-registry on 127.0.0.1 (from .tools/, as the tests start it) gets that
   cache's debian-12 (``sandbox push``).
3. ``sandbox debug FILE`` in a pseudo-terminal, timed to the guest shell's prompt: on an
   empty cache (the base pulled from the registry), then again on that now warm cache.

Figures, not assertions.
"""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from figures import print_figures, remove_tree  # noqa: E402  (bench/ is on sys.path)

from tests.registry import RegistryServer  # noqa: E402

SUITE = '''
def test_service(vm):
    vm.succeed("echo state > /root/evidence")
    vm.succeed("systemd-run --unit=value-server python3 -c 'import os, socket, time; "
               "v = os.urandom(8).hex(); s = socket.socket(); s.bind((\\\"127.0.0.1\\\", 7777)); "
               "s.listen(); time.sleep(10**6)'")
    vm.succeed("systemctl is-active value-server")
    assert False, "failing on purpose"
'''
PROMPT = re.compile(rb"root@[^\s:]+:[^\r\n]*# ")


def to_prompt(argv: list[str], env: dict[str, str], timeout: float = 600) -> float:
    """Seconds from starting ``argv`` in a pseudo-terminal to a root shell prompt in it;
    then ``exit`` is typed and the process waited for."""
    started = time.monotonic()
    pid, fd = pty.fork()
    if pid == 0:
        os.execve(argv[0], argv, env)
    seen = b""
    try:
        while not PROMPT.search(seen):
            if time.monotonic() - started > timeout:
                raise SystemExit(f"no prompt within {timeout} s:\n{seen[-3000:]!r}")
            ready, _, _ = select.select([fd], [], [], 1.0)
            if ready:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:
                    raise SystemExit(f"{argv} ended before a prompt:\n"
                                     f"{seen[-3000:].decode(errors='replace')}") from None
                seen += chunk
        seconds = time.monotonic() - started
        os.write(fd, b"exit\r")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.5)
            if ready:
                try:
                    if not os.read(fd, 65536):
                        break
                except OSError:
                    break
    finally:
        os.close(fd)
        os.waitpid(pid, 0)
    return seconds


def main() -> None:
    as_json = "--json" in sys.argv
    work = Path(tempfile.mkdtemp(prefix="bench-replay-", dir="/tmp"))
    (work / "registry").mkdir()
    server = RegistryServer(work / "registry").start()
    figures: dict[str, Any] = {}
    base_env = {k: v for k, v in os.environ.items()
                if k not in ("SANDBOX_REGISTRY", "SANDBOX_PUSH")}
    empty_env = dict(base_env, SANDBOX_CACHE_DIR=str(work / "empty-cache"),
                     SANDBOX_RUNTIME_DIR=str(work / "run"),
                     SANDBOX_REGISTRY=server.reference("bench"))
    names: list[str] = []
    try:
        suite = work / "suite"
        suite.mkdir()
        (suite / "test_service.py").write_text(SUITE)
        for label, extra in (("", []), (" with its base", ["--sandbox-save-failed-base"])):
            out = work / f"vms{len(extra)}"
            result = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                 f"--sandbox-save-failed={out}", *extra, str(suite)], cwd=suite, env=base_env,
                capture_output=True, text=True, timeout=1800, check=False)
            found = re.search(r"saved VM 'vm1' of \S+ \(([\d.]+)([KMG]?), ([\d.]+) s\)",
                              result.stdout)
            if found is None:
                raise SystemExit(f"no saved VM:\n{result.stdout[-3000:]}{result.stderr[-2000:]}")
            unit = {"K": 1 / 1024, "M": 1, "G": 1024, "": 1 / 2**20}[found.group(2)]
            figures[f"save a VM with a service{label} (s)"] = float(found.group(3))
            figures[f"saved file{label} (MiB)"] = \
                next(out.glob("*.sandbox")).stat().st_size / 2**20
            assert float(found.group(1)) * unit > 0
        file = next((work / "vms0").glob("*.sandbox"))
        pushed = subprocess.run([sys.executable, "-m", "sandbox.cli", "push", "debian-12", "-q"],
                                env=dict(base_env, SANDBOX_REGISTRY=server.reference("bench")),
                                capture_output=True, text=True, cwd=ROOT, timeout=1800,
                                check=False)
        if pushed.returncode != 0:
            raise SystemExit(f"push failed:\n{pushed.stderr[-3000:]}")
        sandbox = str(Path(sys.executable).parent / "sandbox")
        for label, name in (("empty cache, base pulled", "cold"), ("warm cache", "warm")):
            names.append(name)
            figures[f"sandbox debug FILE -> shell prompt, {label} (s)"] = to_prompt(
                [sandbox, "debug", str(file), "--name", name], empty_env)
        figures["debug -> prompt: warm / empty cache ratio"] = (
            figures["sandbox debug FILE -> shell prompt, warm cache (s)"]
            / figures["sandbox debug FILE -> shell prompt, empty cache, base pulled (s)"])
    finally:
        for name in names:
            subprocess.run([sys.executable, "-m", "sandbox.cli", "down", name], env=empty_env,
                           capture_output=True, cwd=ROOT, check=False)
        server.stop()
        remove_tree(work)
    print_figures(figures, as_json)


if __name__ == "__main__":
    main()
