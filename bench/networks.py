"""Benchmark: private networks. Plain vs networked clone to first command, how soon block and
partition take effect, and the failover example's switch-over time.

    .venv/bin/python bench/networks.py [--clones 10] [--json]

A networked clone here joins a network that already has one member (so its start includes
telling that peer its name). "Takes effect" is measured inside the guest: a client connects
to a peer every 20 ms; the figure is from the call (host) to the client's last answered
connection, on the guest's clock (set from the host's when the clone started). The
switch-over is what examples/failover measures (run here with pytest): from the primary's
link cut to the client's first answer from the backup.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import sandbox  # noqa: E402
from bench import focused_start, percentile, print_table  # noqa: E402  (bench/bench.py, beside this one)

SERVE = ("systemd-run --unit hello python3 -c \"import socket; s = socket.socket(); "
         "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('0.0.0.0', 7000)); "
         "s.listen()\nwhile True:\n c, _ = s.accept(); c.sendall(b'x'); c.close()\"")
CLIENT = """
import socket, time
end = time.time() + 20
with open("/root/answers", "w", buffering=1) as log:
    while time.time() < end:
        try:
            with socket.create_connection(("server", 7000), 0.05) as s:
                s.recv(1)
                log.write(f"{time.time()}\\n")
        except OSError:
            pass
        time.sleep(0.02)
"""


def first_command(**shape: object) -> float:
    started = time.monotonic()
    with sandbox.launch(**shape) as vm:  # type: ignore[arg-type]
        vm.succeed("true")
        return time.monotonic() - started


def effect_seconds(client: sandbox.Machine, cut: object, undo: object) -> float:
    """Seconds from ``cut()`` to the client's last answered connection."""
    client.succeed(f"cat > /root/client.py <<'EOF'\n{CLIENT}EOF\n"
                   "systemd-run --unit client python3 /root/client.py")
    client.wait_until_succeeds("test -s /root/answers", timeout=30)
    time.sleep(0.5)
    at = time.time()
    cut()  # type: ignore[operator]
    time.sleep(1.5)
    answers = [float(t) for t in client.succeed("cat /root/answers").split()]
    undo()  # type: ignore[operator]
    client.succeed("systemctl stop client; rm /root/answers")
    return max(0.0, max(t for t in answers) - at)


def main() -> None:
    args, note, machine = focused_start(__doc__)
    results: dict[str, object] = {"machine": machine}
    with sandbox.Network() as net:
        sandbox.launch().close()  # golden snapshots of both shapes exist before timing
        with sandbox.launch(name="server", networks=[net]) as server:
            server.succeed(SERVE)
            server.wait_for_port(7000)
            with note.stage(f"{args.clones} plain and {args.clones} networked clones"):
                plain, networked = [], []
                for n in range(args.clones):
                    plain.append(first_command())
                    networked.append(first_command(name=f"c{n}", networks=[net]))
            with sandbox.launch(name="client", networks=[net]) as client, \
                    note.stage("block and partition"):
                block = effect_seconds(client, lambda: server.block(net),
                                       lambda: server.unblock(net))
                split = effect_seconds(client, lambda: net.partition([server], [client]),
                                       net.heal)
    with note.stage("failover example"):
        example = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
             str(ROOT / "examples" / "failover")], capture_output=True, text=True, cwd=ROOT,
            check=False, timeout=1800)
        found = re.search(r"switch-over: .* ([0-9.]+) s after the cut", example.stdout)
        if found is None:
            sys.exit(f"the failover example failed:\n{example.stdout[-3000:]}")
        results["failover_s"] = float(found.group(1))
    results.update(plain_p50_s=statistics.median(plain), plain_p95_s=percentile(plain, 95),
                   networked_p50_s=statistics.median(networked),
                   networked_p95_s=percentile(networked, 95), block_effect_s=block,
                   partition_effect_s=split)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    r = results
    print_table([
        ("machine", str(r["machine"])),
        (f"plain clone -> first command (p50 / p95 of {args.clones})",
         f"{r['plain_p50_s']:.3f} s / {r['plain_p95_s']:.3f} s"),
        (f"networked clone -> first command (p50 / p95 of {args.clones})",
         f"{r['networked_p50_s']:.3f} s / {r['networked_p95_s']:.3f} s"),
        ("networked - plain, p50",
         f"{r['networked_p50_s'] - r['plain_p50_s']:+.3f} s"),  # type: ignore[operator]
        ("block: call -> last answered connection", f"{r['block_effect_s']:.3f} s"),
        ("partition: call -> last answered connection", f"{r['partition_effect_s']:.3f} s"),
        ("failover example: cut -> served by the backup", f"{r['failover_s']:.2f} s"),
    ])


if __name__ == "__main__":
    main()
