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


def read_from(path: Path) -> str:
    """Where a missing ``path`` was looked for, for its error: '' when absolute, else
    ' (a relative path is read from the current folder, CWD)'."""
    return "" if Path(path).is_absolute() else f" (a relative path is read from the current folder, {Path.cwd()})"
