"""Example hooks: collect a log from every VM of a failed test."""

from pathlib import Path


def pytest_sandbox_teardown(machine, node, failed):
    if failed:
        logs = Path("sandbox-logs")
        logs.mkdir(exist_ok=True)
        (logs / f"{node.name}-{machine.name}-journal.txt").write_text(
            machine.run("journalctl -b --no-pager | tail -n 200").stdout)
