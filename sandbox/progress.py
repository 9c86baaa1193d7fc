"""Stage reporting: a live line with elapsed time on a terminal, plain lines elsewhere (CI)."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
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


QUIET = Reporter(quiet=True)
