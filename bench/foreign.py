"""Benchmark: bring your own image. The suite's "foreign" cloud image (tests/images/
foreign-build.sh: GRUB, cloud-init, OpenSSH, none of the sandbox's parts) imported as qcow2,
VMDK and VDI; cold firmware boot to ready under SeaBIOS and OVMF; every format under both
firmwares through `sandbox run` and a pytest test with the vm marker; golden clone to first
command for it and for debian-12; the clone identity check.

    .venv/bin/python bench/foreign.py [--clones 10] [--matrix 0] [--json]

Import is timed from an empty entry (each image is removed first). "Ready" is SSH letting the
login account in and cloud-init reporting done. The identity check runs two clones of one
golden snapshot: their first 32 random bytes must differ, and their clocks must be within a
second or two of the host's although the snapshot was saved earlier.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import sandbox  # noqa: E402
from bench import focused_start, percentile, print_table  # noqa: E402  (bench/bench.py, beside this one)
from sandbox.imaging.image import build_image  # noqa: E402
from sandbox.imaging.recipe import parse_recipe  # noqa: E402
from sandbox.vm.golden import remove_images  # noqa: E402
from tests.foreign import convert, foreign_disk, write_recipe  # noqa: E402


def forget(name: str) -> None:
    """Remove image ``name`` and its golden snapshots, if there are any."""
    with contextlib.suppress(sandbox.ImageError):
        remove_images(name)


def first_command(image: str) -> float:
    started = time.monotonic()
    with sandbox.launch(image) as vm:
        vm.succeed("true")
        return time.monotonic() - started


MARKER_TEST = """
import pytest

@pytest.mark.parametrize("name", {names!r})
def test_on(name, request):
    request.applymarker(pytest.mark.vm(image=name))
    vm = request.getfixturevalue("vm")
    assert vm.succeed("cat /etc/hostname").strip() == name
"""


def main() -> None:
    args, note, machine = focused_start(__doc__, matrix=(int, 1, "1: every format x firmware "
                                                         "through sandbox run and pytest"))
    results: dict[str, object] = {"machine": machine}
    with note.stage("the foreign image (built once, then cached)"):
        raw = foreign_disk()
    folder = Path(tempfile.mkdtemp(prefix="bench-foreign-"))
    os.environ["SANDBOX_IMAGES_PATH"] = str(folder)
    combos = {f"bench-{fmt}-{boot}": (fmt, boot) for fmt in ("qcow2", "vmdk", "vdi")
              for boot in ("bios", "uefi")}
    imports: dict[str, float] = {}
    runs: dict[str, str] = {}
    try:
        disks = {fmt: convert(raw, fmt, folder / f"foreign.{fmt}")
                 for fmt in ("qcow2", "vmdk", "vdi")}
        for name, (fmt, boot) in combos.items():
            recipe = parse_recipe(write_recipe(folder, name, disks[fmt], boot))
            forget(name)  # timed from an empty entry
            started = time.monotonic()
            build_image(recipe)
            imports.setdefault(fmt, time.monotonic() - started)
        cold = {}
        for boot in ("bios", "uefi"):
            with note.stage(f"cold {boot} boot to ready"):
                started = time.monotonic()
                with sandbox.launch(f"bench-qcow2-{boot}", cold=True) as vm:
                    cold[boot] = time.monotonic() - started
                    vm.succeed("true")
        chosen = combos if args.matrix else {"bench-qcow2-bios": ("qcow2", "bios")}
        for name in chosen:
            with note.stage(f"sandbox run --image {name} -- cat /etc/hostname"):
                started = time.monotonic()
                run = subprocess.run([sys.executable, "-m", "sandbox.cli", "run", "--image",
                                      name, "--", "cat", "/etc/hostname"], capture_output=True,
                                     text=True, check=False, timeout=900)
                runs[name] = (f"{run.stdout.strip() or run.stderr.strip()[-200:]}, exit "
                              f"{run.returncode}, {time.monotonic() - started:.0f} s (golden "
                              "snapshot made)")
        (folder / "test_marker.py").write_text(MARKER_TEST.format(names=list(chosen)))
        marked = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                 str(folder / "test_marker.py")], capture_output=True,
                                text=True, check=False, cwd=folder, timeout=1800)
        marker = marked.stdout.strip().splitlines()[-1]
        sandbox.launch("debian-12").close()  # its golden snapshot exists before timing
        with note.stage(f"{args.clones} clones of each, interleaved"):
            foreign_times, debian_times = [], []
            for _ in range(args.clones):
                foreign_times.append(first_command("bench-qcow2-bios"))
                debian_times.append(first_command("debian-12"))
        with sandbox.launch("bench-qcow2-bios") as a, sandbox.launch("bench-qcow2-bios") as b:
            samples = [vm.succeed("head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; "
                                  "echo; date +%s.%N") for vm in (a, b)]
            now = time.time()
            assert a.source is not None
            saved = a.source.manifest["created_at"]
        randoms = [s.split()[0] for s in samples]
        offsets = [float(s.split()[1]) - now for s in samples]
    finally:
        for name in combos:
            forget(name)
        subprocess.run(["rm", "-rf", str(folder)], check=False)
    results.update(
        import_s=imports, cold_ready_s=cold, runs=runs, marker_tests=marker,
        foreign_p50_s=statistics.median(foreign_times),
        foreign_p95_s=percentile(foreign_times, 95),
        debian_p50_s=statistics.median(debian_times), debian_p95_s=percentile(debian_times, 95),
        clones_random_differ=randoms[0] != randoms[1], clone_clock_offsets_s=offsets,
        golden_saved_at=saved)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print_table([
        ("machine", str(results["machine"])),
        *((f"import {fmt} (sha256, qemu-img convert, seed)", f"{s:.1f} s")
          for fmt, s in imports.items()),
        *((f"cold {boot} boot -> ready (SSH, cloud-init done)", f"{s:.1f} s")
          for boot, s in cold.items()),
        *((f"sandbox run --image {name}", text) for name, text in runs.items()),
        (f"pytest, @pytest.mark.vm(image=...) x {len(chosen)}", marker),
        (f"foreign clone -> first command (p50 / p95 of {args.clones})",
         f"{results['foreign_p50_s']:.3f} s / {results['foreign_p95_s']:.3f} s"),
        (f"debian-12 clone -> first command (p50 / p95 of {args.clones})",
         f"{results['debian_p50_s']:.3f} s / {results['debian_p95_s']:.3f} s"),
        ("two clones: first 32 random bytes differ", str(randoms[0] != randoms[1])),
        ("two clones: clock - host (snapshot saved " + saved + ")",
         " / ".join(f"{o:+.2f} s" for o in offsets)),
    ])


if __name__ == "__main__":
    main()
