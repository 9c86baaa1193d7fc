"""Benchmark: prepared-state templates against setting a machine up in every test.

    .venv/bin/python bench/templates.py [--tests 10] [--clones 10] [--rows 80000] [--json]

The setup is examples/inventory's (install a service, seed its SQLite database, start it).
Prints: the setup's time; the template's save time (full state, then reloaded into shared
RAM) and what it occupies on disk; clone -> first command p50/p95 from the template and from
the plain golden snapshot (interleaved, so both see the same machine load); and a suite of
--tests tests run one at a time, two ways: per-test setup (clone, setup, test), and the
template (made once: setup, save; then clone, test), on its first run (the template made)
and on later runs (the template reused). Figures, not assertions.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import sandbox  # noqa: E402
from bench import focused_start, percentile, print_table  # noqa: E402  (bench/bench.py, beside this one)
from sandbox.machine.prepare import ensure_template  # noqa: E402

APP = ROOT / "examples" / "inventory" / "app"
NAME = "bench-inventory"


def setup(rows: int) -> Any:
    def run(vm: sandbox.Machine) -> None:
        vm.push(APP, "/opt/src")
        vm.succeed(f"ROWS={rows} /opt/src/install.sh", timeout=1800)
    return run


#: One test of the suite, in one guest process: read through the service, change the
#: data behind it, read again.
TEST = """
import json, sqlite3, urllib.request
def stats():
    return json.loads(urllib.request.urlopen("http://127.0.0.1:8080/stats").read())
before = stats()["items"]
db = sqlite3.connect("/var/lib/inventory/db.sqlite")
db.execute("DELETE FROM items WHERE id < 100")
db.commit()
print(before, stats()["items"])
"""


def a_test(vm: sandbox.Machine, rows: int) -> None:
    assert vm.succeed(["python3", "-c", TEST]).split() == [str(rows), str(rows - 99)]


def first_command(**shape: Any) -> float:
    started = time.monotonic()
    with sandbox.launch(**shape) as vm:
        vm.succeed("true")
        return time.monotonic() - started


def main() -> None:
    args, note, machine = focused_start(
        __doc__, tests=(int, 10, "tests in the suite"),
        rows=(int, 80000, "items the setup seeds (80000: over 20 s under TCG here)"))
    results: dict[str, Any] = {"machine": machine, "tests": args.tests, "rows": args.rows}
    sandbox.launch().close()  # the image and golden snapshot exist before anything is timed
    for template in sandbox.templates():
        if template.name == NAME:
            sandbox.remove_template(template.id)
    key = f"{args.rows}-{time.time()}"  # a template of this run, made while timed

    with note.stage(f"suite of {args.tests}, setup in every test"):
        started, setups = time.monotonic(), []
        for _ in range(args.tests):
            with sandbox.launch() as vm:
                began = time.monotonic()
                setup(args.rows)(vm)
                setups.append(time.monotonic() - began)
                a_test(vm, args.rows)
        results["per_test_total_s"] = time.monotonic() - started
    results["setup_p50_s"] = statistics.median(setups)

    for run in ("first", "reused"):
        with note.stage(f"suite of {args.tests} on a template, {run} run"):
            started = time.monotonic()
            template = ensure_template(NAME, setup(args.rows), key=key)  # made on the first
            for _ in range(args.tests):
                with sandbox.launch(template=template) as vm:
                    a_test(vm, args.rows)
            results[f"template_{run}_total_s"] = time.monotonic() - started
    manifest = template.manifest
    results.update(
        save_s=manifest["save_seconds"], full_save_s=manifest["full_save_seconds"],
        reload_s=manifest["reload_seconds"], template_disk_mib=template.size / 2**20,
        ram_used_mib=manifest["ram_bytes_used"] / 2**20, guest_ram_mib=manifest["memory_mib"],
        overlay_mib=manifest["disk_bytes"] / 2**20, state_kib=manifest["state_bytes"] / 1024)

    with note.stage(f"{args.clones} clones from each, interleaved"):
        golden, templated = [], []
        for _ in range(args.clones):
            golden.append(first_command())
            templated.append(first_command(template=template))
    sandbox.remove_template(NAME)
    results.update(
        golden_clone_p50_s=statistics.median(golden), golden_clone_p95_s=percentile(golden, 95),
        template_clone_p50_s=statistics.median(templated),
        template_clone_p95_s=percentile(templated, 95))
    results["first_run_speedup"] = results["per_test_total_s"] / results["template_first_total_s"]
    results["later_run_speedup"] = results["per_test_total_s"] / results["template_reused_total_s"]
    if args.json:
        print(json.dumps(results, indent=2))
        return
    r = results
    rows = [
        ("machine", r["machine"]),
        (f"setup (install, seed {args.rows} items, start), p50", f"{r['setup_p50_s']:.1f} s"),
        ("template save (full state / reload into shared RAM)",
         f"{r['save_s']:.1f} s ({r['full_save_s']:.1f} s / {r['reload_s']:.1f} s)"),
        ("template on disk (RAM file / overlay / state)",
         f"{r['template_disk_mib']:.0f} MiB ({r['ram_used_mib']:.0f} MiB of "
         f"{r['guest_ram_mib']} MiB guest RAM / {r['overlay_mib']:.1f} MiB / "
         f"{r['state_kib']:.0f} KiB)"),
        (f"clone -> first command, golden (p50 / p95 of {args.clones})",
         f"{r['golden_clone_p50_s']:.3f} s / {r['golden_clone_p95_s']:.3f} s"),
        (f"clone -> first command, template (p50 / p95 of {args.clones})",
         f"{r['template_clone_p50_s']:.3f} s / {r['template_clone_p95_s']:.3f} s"),
        ("template - golden, p50",
         f"{r['template_clone_p50_s'] - r['golden_clone_p50_s']:+.3f} s"),
        (f"suite of {args.tests}: setup in every test", f"{r['per_test_total_s']:.1f} s"),
        (f"suite of {args.tests}: template, first run (made)",
         f"{r['template_first_total_s']:.1f} s ({r['first_run_speedup']:.1f}x faster)"),
        (f"suite of {args.tests}: template, later runs (reused)",
         f"{r['template_reused_total_s']:.1f} s ({r['later_run_speedup']:.1f}x faster)"),
    ]
    print_table(rows)


if __name__ == "__main__":
    main()
