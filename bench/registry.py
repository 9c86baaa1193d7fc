"""Benchmark: machine state through an OCI registry against building it on every host.

    .venv/bin/python bench/registry.py [--json]

Starts Debian's docker-registry on 127.0.0.1 (as the tests do, from .tools/ of the checkout),
then, each from an empty cache of its own:

1. builds: ``sandbox run -- true`` with no registry (image build, golden boot, clone);
2. pushes that cache's debian-12 (image and golden snapshot) and a template (a machine with
   a service started and a file written), timing each push and measuring the registry's
   storage;
3. pulls: ``sandbox run -- true`` on an empty cache with SANDBOX_REGISTRY set (the image and
   golden snapshot pulled, then the clone), and ``sandbox run --template`` on another empty
   cache (the template and what it stands on pulled);
4. ``sandbox pull debian-12`` on an empty cache: pull throughput.

Figures, not assertions.
"""

from __future__ import annotations

import os
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

IMAGE = "debian-12"
TEMPLATE = "bench-registry"


def du(path: Path) -> int:
    """Bytes ``path`` occupies on disk."""
    return sum(p.lstat().st_blocks * 512 for p in path.rglob("*") if p.is_file())


def main() -> None:
    as_json = "--json" in sys.argv
    work = Path(tempfile.mkdtemp(prefix="bench-registry-"))
    (work / "registry").mkdir()
    server = RegistryServer(work / "registry").start()
    figures: dict[str, Any] = {}

    def sandbox(cache: str, *args: str, registry: bool = True) -> tuple[float, str]:
        env = dict(os.environ, SANDBOX_CACHE_DIR=str(work / cache),
                   SANDBOX_RUNTIME_DIR=str(work / f"run-{cache}"))
        env.pop("SANDBOX_REGISTRY", None)
        env.pop("SANDBOX_PUSH", None)
        if registry:
            env["SANDBOX_REGISTRY"] = server.reference("bench")
        started = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "sandbox.cli", *args], env=env,
                                capture_output=True, text=True, cwd=ROOT, timeout=1800,
                                check=False)
        seconds = time.monotonic() - started
        if result.returncode != 0:
            raise SystemExit(f"sandbox {' '.join(args)} failed:\n{result.stderr[-3000:]}")
        return seconds, result.stdout + result.stderr

    try:
        figures["build: first clone -> first command (s)"], _ = sandbox(
            "built", "run", "--", "true", registry=False)
        storage = server.storage
        figures["push debian-12, image + golden (s)"], out = sandbox("built", "push", IMAGE)
        figures["registry size of debian-12 (MiB)"] = du(storage) / 2**20
        # A template: a machine with a service started and a file written.
        setup = ("import sandbox\n"
                 "with sandbox.launch('debian-12') as vm:\n"
                 "    vm.succeed('head -c 50M /dev/urandom > /srv/blob; "
                 "systemd-run --unit=ticker sleep 100000')\n"
                 f"    vm.save_template({TEMPLATE!r})\n")
        env = dict(os.environ, SANDBOX_CACHE_DIR=str(work / "built"),
                   SANDBOX_RUNTIME_DIR=str(work / "run-built"))
        subprocess.run([sys.executable, "-c", setup], env=env, cwd=ROOT, check=True,
                       timeout=600)
        before = du(storage)
        figures["push template (s)"], _ = sandbox("built", "push", "--template", TEMPLATE)
        figures["registry size of the template (MiB, beyond debian-12)"] = \
            (du(storage) - before) / 2**20
        figures["pull: first clone -> first command (s)"], out = sandbox(
            "pulled", "run", "--", "true")
        if "pulling" not in out:
            raise SystemExit(f"the pull path did not pull:\n{out[-2000:]}")
        figures["pull: first clone of the template -> first command (s)"], _ = sandbox(
            "pulled-template", "run", "--template", TEMPLATE, "--", "true")
        seconds, _ = sandbox("pull-only", "pull", IMAGE)
        figures["sandbox pull debian-12 (s)"] = seconds
        figures["pull throughput (MiB/s of registry blobs)"] = \
            figures["registry size of debian-12 (MiB)"] / seconds
        unpacked = du(work / "pull-only")
        figures["debian-12 unpacked in the cache (MiB on disk)"] = unpacked / 2**20
        figures["pull / build ratio"] = (figures["pull: first clone -> first command (s)"]
                                         / figures["build: first clone -> first command (s)"])
    finally:
        server.stop()
        remove_tree(work)
    print_figures(figures, as_json)


if __name__ == "__main__":
    main()
