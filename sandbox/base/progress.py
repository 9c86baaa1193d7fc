"""Stage reporting: a live line with elapsed time on a terminal, plain lines elsewhere (CI)."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO


class Reporter:
    """Prints ``name ... done in 1.2 s`` for each stage; silent when ``quiet``."""

    def __init__(self, stream: TextIO | None = None, *, quiet: bool = False) -> None:
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.live = (self.stream.isatty() and not os.environ.get("CI")
                     and os.environ.get("TERM") != "dumb")

    def note(self, message: str) -> None:
        if not self.quiet:
            print(message, file=self.stream, flush=True)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self.quiet:
            yield
            return
        start = time.monotonic()
        if self.live:
            from rich.console import Console

            console = Console(file=self.stream)
            with console.status(f"{name}...") as status:
                status.update(f"{name}...")
                yield
            console.print(f"[green]✓[/green] {name} [dim]({time.monotonic() - start:.1f} s)[/dim]")
        else:
            print(f"{name}...", file=self.stream, flush=True)
            yield
            print(f"{name}: done in {time.monotonic() - start:.1f} s", file=self.stream,
                  flush=True)

    @contextmanager
    def progress(self, name: str, total: int | None,
                 done: int = 0) -> Iterator[Callable[[int], None]]:
        """Yields ``advance(n)``: a progress bar on a terminal, a line every 10% (or every
        64 MiB when the total is unknown) elsewhere."""
        if self.quiet:
            yield lambda n: None
            return
        if self.live:
            from rich.console import Console
            from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

            with Progress(*Progress.get_default_columns(), DownloadColumn(),
                          TransferSpeedColumn(), console=Console(file=self.stream)) as bar:
                task = bar.add_task(name, total=total, completed=done)
                yield lambda n: bar.advance(task, n)
            return
        step = max(total // 10, 1) if total else 64 << 20
        state = {"done": done, "next": done + step}
        start = time.monotonic()

        def rate() -> str:
            seconds = time.monotonic() - start
            moved = state["done"] - done
            return f", {moved / 2**20 / seconds:.1f} MiB/s" if seconds > 0.05 and moved else ""

        def advance(n: int) -> None:
            state["done"] += n
            if state["done"] >= state["next"]:
                state["next"] += step
                of = f" of {total >> 20} MiB" if total else ""
                print(f"{name}: {state['done'] >> 20} MiB{of}{rate()}", file=self.stream,
                      flush=True)

        print(f"{name}...", file=self.stream, flush=True)
        yield advance
        print(f"{name}: done, {state['done'] >> 20} MiB in {time.monotonic() - start:.1f} s"
              f"{rate()}", file=self.stream, flush=True)


QUIET = Reporter(quiet=True)
