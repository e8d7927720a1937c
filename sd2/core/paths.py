"""Paths the user types (recipes, command-line options)."""

from __future__ import annotations

from pathlib import Path


def expand(text: str | Path) -> Path:
    """``text`` as a Path with ``~`` expanded. ``~someone`` for an unknown user stays as written
    (Path.expanduser raises RuntimeError there), so it is reported as a path that does not exist."""
    path = Path(text)
    try:
        return path.expanduser()
    except RuntimeError:
        return path
