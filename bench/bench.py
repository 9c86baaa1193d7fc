"""Benchmark: cold boot vs golden-snapshot clones, side by side, on this machine.

    .venv/bin/python bench/bench.py [--clones 10] [--cold 3] [--cycles 50] [--idle 8] [--json]
    .venv/bin/python bench/bench.py --accounts [--clones 10]      # as root

Prints one table: cold boot to first command, clone to first command (p50/p95), restore
only, golden snapshot build, proportional memory (PSS) of idle clones, and sequential and
2-at-a-time clone/command/close cycles, with the cold/clone ratio. Figures, not assertions:
this is where speed and memory targets are measured.

``--accounts`` compares root with an ordinary account in one run: each builds the image
from an empty cache of its own (root: mmdebstrap --mode=root and mke2fs -d; the account:
--mode=unshare and genext2fs), makes the golden snapshot, then times clones to the first
command. The account runs the package installed from a wheel (tests/ordinary.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import sandbox  # noqa: E402
from sandbox.base.progress import Reporter  # noqa: E402
from sandbox.host.tools import qemu_version  # noqa: E402
from sandbox.vm.accel import accel_verdict
from sandbox.vm.golden import discard_golden, list_goldens  # noqa: E402


def focused_start(doc: str, **options: tuple[type, Any, str]
                  ) -> tuple[argparse.Namespace, Reporter, str]:
    """The start of a focused benchmark (bench/networks.py...): its arguments (``--clones``,
    ``--json`` and ``options``: name -> type, default, help), paramiko quiet, a progress
    reporter, and the line that names the machine."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--clones", type=int, default=10, help="clones timed from each source")
    for name, (kind, default, text) in options.items():
        parser.add_argument(f"--{name}", type=kind, default=default, help=text)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    logging.getLogger("paramiko").setLevel(logging.CRITICAL)
    machine = (f"{platform.node()}: {os.cpu_count()} cores, QEMU {qemu_version()}, "
               f"accel {accel_verdict().accel}")
    return args, Reporter(), machine


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def first_command(**shape: Any) -> tuple[float, float | None]:
    """Seconds from launch() to the first command's result; and the restore-only part."""
    started = time.monotonic()
    with sandbox.launch(**shape) as vm:
        vm.succeed("true")
        elapsed = time.monotonic() - started
        return elapsed, vm.restore_seconds


def pss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def cycle() -> float:
    started = time.monotonic()
    with sandbox.launch() as vm:
        vm.succeed("echo hello > /root/hello && cat /root/hello")
    return time.monotonic() - started


def cpu_seconds() -> float:
    """CPU time of this process and of its reaped children (every QEMU it ran, qemu-img)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), \
        resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def transfers(image: str, size_mib: int = 100) -> dict[str, float]:
    """MiB/s of put and get of one ``size_mib`` file and push of a directory of that many
    1 MiB files, on one clone (the files are random: nothing compresses)."""
    import tempfile

    rates: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-transfer-") as scratch, \
            sandbox.launch(image) as vm:
        payload = Path(scratch) / "payload"
        with payload.open("wb") as out:
            for _ in range(size_mib):
                out.write(os.urandom(1 << 20))
        tree = Path(scratch) / "tree"
        tree.mkdir()
        for index in range(size_mib):
            (tree / f"part-{index:03d}").write_bytes(os.urandom(1 << 20))
        for name, action in (
                ("put", lambda: vm.put(payload, "/root/payload")),
                ("get", lambda: vm.get("/root/payload", Path(scratch) / "back")),
                ("push", lambda: vm.push(tree, "/root/tree"))):
            started = time.monotonic()
            action()
            rates[f"{name}_mib_s"] = size_mib / (time.monotonic() - started)
        same = (Path(scratch) / "back").read_bytes() == payload.read_bytes()
        rates["get_identical"] = float(same)
    return rates


def build_and_clones(image: str, clones: int) -> dict[str, Any]:
    """From an empty cache: image build, golden snapshot, then ``clones`` clones timed."""
    from sandbox.imaging.image import get_image

    started = time.monotonic()
    built = get_image(image)
    build_wall = time.monotonic() - started
    started = time.monotonic()
    first_command(image=image)
    golden = time.monotonic() - started
    times = [first_command(image=image)[0] for _ in range(clones)]
    return {"uid": os.getuid(), "builder": built.manifest["builder"],
            "build_s": built.manifest["build_seconds"], "build_wall_s": build_wall,
            "golden_build_s": golden, "clone_p50_s": statistics.median(times),
            "clone_p95_s": percentile(times, 95)}


def compare_accounts(args: argparse.Namespace) -> None:
    """Root and an ordinary account, each from an empty cache, one after the other."""
    import shutil
    import subprocess
    import tempfile

    from tests.ordinary import (
        build_wheelhouse,
        install_from_wheelhouse,
        ordinary_account,
        shared_tmp,
    )

    if os.geteuid() != 0:
        sys.exit("--accounts compares root with an ordinary account: run it as root")
    part = ["--part", "--image", args.image, "--clones", str(args.clones)]
    account = ordinary_account()
    wheelhouse = shared_tmp()
    work = account.make_workdir()
    root_cache = Path(tempfile.mkdtemp(prefix="bench-root-cache-"))
    try:
        build_wheelhouse(wheelhouse)
        bin_dir = install_from_wheelhouse(account, wheelhouse, work / "venv")
        script = work / "bench.py"
        account.write(script, Path(__file__).read_text())
        results: dict[str, dict[str, Any]] = {}
        for who in ("root", account.name):
            print(f"bench: {who}: image build, golden snapshot, {args.clones} clones...",
                  file=sys.stderr, flush=True)
            if who == "root":
                env = dict(os.environ, SANDBOX_CACHE_DIR=str(root_cache))
                done = subprocess.run([sys.executable, __file__, *part], env=env,
                                      capture_output=True, text=True, check=False)
            else:
                done = account.run([str(bin_dir / "python"), str(script), *part],
                                   env=account.env(PATH=str(bin_dir),
                                                   SANDBOX_CACHE_DIR=str(work / "cache")),
                                   cwd=work, timeout=3600)
            if done.returncode != 0:
                sys.exit(f"bench: {who} failed:\n{done.stderr[-3000:]}")
            results[who] = json.loads(done.stdout)
    finally:
        account.remove(work)
        shutil.rmtree(wheelhouse, ignore_errors=True)
        subprocess.run(["rm", "-rf", str(root_cache)], check=False)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    root, user = results["root"], results[account.name]
    rows = [("", "root", account.name, "ratio"),
            ("image build (builder's own figure)", f"{root['build_s']:.1f} s",
             f"{user['build_s']:.1f} s", f"{user['build_s'] / root['build_s']:.2f}x"),
            ("golden snapshot build", f"{root['golden_build_s']:.1f} s",
             f"{user['golden_build_s']:.1f} s",
             f"{user['golden_build_s'] / root['golden_build_s']:.2f}x"),
            (f"clone -> first command, p50 of {args.clones}", f"{root['clone_p50_s']:.3f} s",
             f"{user['clone_p50_s']:.3f} s",
             f"{user['clone_p50_s'] / root['clone_p50_s']:.2f}x"),
            (f"clone -> first command, p95 of {args.clones}", f"{root['clone_p95_s']:.3f} s",
             f"{user['clone_p95_s']:.3f} s",
             f"{user['clone_p95_s'] / root['clone_p95_s']:.2f}x")]
    print(f"\nroot: {root['builder']}\n{account.name} (uid {user['uid']}): {user['builder']}\n")
    width = max(len(r[0]) for r in rows)
    for name, a, b, ratio in rows:
        print(f"{name:<{width}}  {a:>10}  {b:>12}  {ratio:>6}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", default="debian-12")
    parser.add_argument("--clones", type=int, default=10, help="clones timed one by one")
    parser.add_argument("--cold", type=int, default=3, help="cold boots timed")
    parser.add_argument("--cycles", type=int, default=50, help="clone-command-close cycles")
    parser.add_argument("--idle", type=int, default=8, help="idle clones for the PSS figure")
    parser.add_argument("--keep-golden", action="store_true",
                        help="reuse a cached golden snapshot instead of timing a fresh build")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--accounts", action="store_true",
                        help="compare root with an ordinary account (build and clones)")
    parser.add_argument("--part", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.getLogger("paramiko").setLevel(logging.CRITICAL)
    if args.accounts:
        compare_accounts(args)
        return
    if args.part:  # one side of --accounts: JSON on stdout
        print(json.dumps(build_and_clones(args.image, args.clones)))
        return
    note = Reporter()
    results: dict[str, Any] = {
        "machine": f"{platform.node()}: {os.cpu_count()} cores, "
                   f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') >> 30} GiB, "
                   f"QEMU {qemu_version()}, accel {accel_verdict().accel}",
    }

    sandbox.launch(args.image, cold=True).close()  # the image exists before anything is timed
    if not args.keep_golden:
        for golden in list_goldens():
            if golden.manifest["image"] == args.image:
                discard_golden(golden)
    with note.stage("golden snapshot build"):
        started = time.monotonic()
        first_command(image=args.image)
        results["golden_build_s"] = time.monotonic() - started

    with note.stage(f"{args.cold} cold boots"):
        cold = [first_command(image=args.image, cold=True)[0] for _ in range(args.cold)]
    with note.stage(f"{args.clones} clones"):
        clones = [first_command(image=args.image) for _ in range(args.clones)]
    clone_times = [c[0] for c in clones]
    restores = [c[1] for c in clones if c[1] is not None]
    results.update(
        cold_first_command_p50_s=statistics.median(cold),
        clone_first_command_p50_s=statistics.median(clone_times),
        clone_first_command_p95_s=percentile(clone_times, 95),
        restore_p50_s=statistics.median(restores),
        restore_p95_s=percentile(restores, 95),
    )
    results["cold_clone_ratio"] = results["cold_first_command_p50_s"] / \
        results["clone_first_command_p50_s"]

    with note.stage(f"{args.idle} idle clones"):
        machines = [sandbox.launch(args.image) for _ in range(args.idle)]
        try:
            time.sleep(3)
            pss = [pss_kib(m.pid) for m in machines if m.pid]
        finally:
            for m in machines:
                m.close()
    results["idle_clones"] = args.idle
    results["idle_pss_total_mib"] = sum(pss) / 1024
    results["idle_pss_per_clone_mib"] = sum(pss) / 1024 / len(pss)

    with note.stage(f"{args.cycles} cycles, one at a time"):
        started, cpu = time.monotonic(), cpu_seconds()
        serial = [cycle() for _ in range(args.cycles)]
        results["cycles_serial_total_s"] = time.monotonic() - started
        results["cycle_cpu_s"] = (cpu_seconds() - cpu) / args.cycles
    with note.stage(f"{args.cycles} cycles, two at a time"):
        started = time.monotonic()
        with ThreadPoolExecutor(2) as pool:
            paired = list(pool.map(lambda _: cycle(), range(args.cycles)))
        results["cycles_parallel2_total_s"] = time.monotonic() - started
    results["cycles_speedup_2"] = results["cycles_serial_total_s"] / \
        results["cycles_parallel2_total_s"]
    with note.stage("transfers of 100 MiB"):
        results.update(transfers(args.image))
    results["cycle_serial_p50_s"] = statistics.median(serial)
    results["cycle_parallel2_p50_s"] = statistics.median(paired)
    results["cycles"] = args.cycles

    if args.json:
        print(json.dumps(results, indent=2))
        return
    rows = [
        ("machine", results["machine"]),
        ("golden snapshot build", f"{results['golden_build_s']:.1f} s"),
        (f"cold boot -> first command (p50 of {args.cold})",
         f"{results['cold_first_command_p50_s']:.2f} s"),
        (f"clone -> first command (p50 / p95 of {args.clones})",
         f"{results['clone_first_command_p50_s']:.3f} s / "
         f"{results['clone_first_command_p95_s']:.3f} s"),
        ("restore only (p50 / p95)",
         f"{results['restore_p50_s']:.3f} s / {results['restore_p95_s']:.3f} s"),
        ("cold / clone ratio", f"{results['cold_clone_ratio']:.1f}x"),
        (f"PSS of {args.idle} idle clones (total / each)",
         f"{results['idle_pss_total_mib']:.0f} MiB / {results['idle_pss_per_clone_mib']:.0f} MiB"),
        (f"{args.cycles} clone-command-close cycles, serial",
         f"{results['cycles_serial_total_s']:.1f} s (p50 {results['cycle_serial_p50_s']:.2f} s)"),
        (f"{args.cycles} cycles, 2 at a time",
         f"{results['cycles_parallel2_total_s']:.1f} s "
         f"(p50 {results['cycle_parallel2_p50_s']:.2f} s)"),
        ("cycles: 2 at a time vs one at a time", f"{results['cycles_speedup_2']:.2f}x"),
        ("CPU-seconds per cycle (QEMU, guest, host side, children)",
         f"{results['cycle_cpu_s']:.3f} s"),
        ("put of a 100 MiB file", f"{results['put_mib_s']:.1f} MiB/s"),
        ("get of a 100 MiB file", f"{results['get_mib_s']:.1f} MiB/s"
         + ("" if results["get_identical"] else " (NOT IDENTICAL)")),
        ("push of a 100 MiB directory (100 files)", f"{results['push_mib_s']:.1f} MiB/s"),
    ]
    print_table(rows)


def print_table(rows: list[tuple[str, str]]) -> None:
    """Figures as two aligned columns, after a blank line."""
    width = max(len(r[0]) for r in rows)
    print()
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
