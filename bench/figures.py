"""What the benchmark scripts share: their scratch trees removed, their figures printed."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any


def remove_tree(work: Path) -> None:
    """Remove a benchmark's scratch tree, sealed (read-only) cache entries and all."""
    subprocess.run(["chmod", "-R", "u+w", str(work)], check=False)
    shutil.rmtree(work, ignore_errors=True)


def print_figures(figures: dict[str, Any], as_json: bool) -> None:
    """One line per figure (name, value), or JSON."""
    if as_json:
        print(json.dumps(figures, indent=2))
        return
    width = max(len(name) for name in figures)
    for name, value in figures.items():
        print(f"{name:<{width}}  {value:10.2f}")
