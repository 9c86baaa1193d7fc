"""Benchmark: commands on one clone, one at a time and from many threads at once.

    .venv/bin/python bench/commands.py [--commands 40] [--threads 8] [--json]

Serial: the latency of one short command (`true`) on a running clone. Concurrent: THREADS
threads each run COMMANDS commands (`echo`) on the same clone; the figures are throughput,
per-command latency, how many sessions the guest's SSH server closed before their command
started (Debian 12's dropbear does that when a child exits at that moment; such a session
is opened again, see sandbox/guest/channel.py), and how many commands failed (expected: 0).
"""

from __future__ import annotations

import json
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import sandbox  # noqa: E402
from bench import focused_start, percentile, print_table  # noqa: E402  (bench/bench.py, beside this one)


def timed(vm: sandbox.Machine, command: str) -> float:
    started = time.monotonic()
    vm.succeed(command)
    return time.monotonic() - started


def main() -> None:
    args, note, machine = focused_start(__doc__, commands=(int, 40, "commands per thread"),
                                        threads=(int, 8, "threads at once"))
    results: dict[str, object] = {"machine": machine}
    with sandbox.launch() as vm:
        with note.stage(f"{args.commands} commands, one at a time"):
            serial = [timed(vm, "true") for _ in range(args.commands)]
        latencies: list[float] = []
        failures: list[str] = []

        def worker(index: int) -> None:
            for n in range(args.commands):
                try:
                    latencies.append(timed(vm, f"echo {index}-{n}"))
                except sandbox.SandboxError as exc:
                    failures.append(f"{type(exc).__name__}: {exc}")
                    return

        with note.stage(f"{args.threads} threads x {args.commands} commands"):
            before = vm.channel.sessions_reopened
            started = time.monotonic()
            threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.threads)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            elapsed = time.monotonic() - started
            reopened = vm.channel.sessions_reopened - before
    results.update(serial_p50_s=statistics.median(serial), serial_p95_s=percentile(serial, 95),
                   concurrent_commands=len(latencies), concurrent_s=elapsed,
                   concurrent_p50_s=statistics.median(latencies) if latencies else None,
                   concurrent_p95_s=percentile(latencies, 95) if latencies else None,
                   sessions_reopened=reopened, failures=failures)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    r = results
    total = args.threads * args.commands
    print_table([
        ("machine", str(r["machine"])),
        (f"one command at a time (p50 / p95 of {args.commands})",
         f"{r['serial_p50_s']:.3f} s / {r['serial_p95_s']:.3f} s"),
        (f"{args.threads} threads x {args.commands}: done / wall time",
         f"{len(latencies)} of {total} in {elapsed:.1f} s ({len(latencies) / elapsed:.1f}/s)"),
        ("  latency per command (p50 / p95)",
         f"{r['concurrent_p50_s']:.3f} s / {r['concurrent_p95_s']:.3f} s"
         if latencies else "-"),
        ("  sessions closed by the server and opened again",
         f"{reopened} ({reopened / max(1, total):.1%} of commands)"),
        ("  failed commands", f"{len(failures)}" + (f" (first: {failures[0]})"
                                                      if failures else "")),
    ])
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
