"""Errors that sd2 shows to users: a message that names the field or file and the fix, never a traceback."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Iterable


class Sd2Error(Exception):
    """An error with a user-facing message. The CLI prints it and exits 1, with no traceback."""


@dataclass(frozen=True)
class Issue:
    """One problem in a recipe: where (a dotted field path), what is wrong, and the bad value."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class RecipeError(Sd2Error):
    """Every problem found in a recipe, gathered so the user can fix them in one pass."""

    def __init__(self, issues: Iterable[Issue], source: str | None = None):
        self.issues = list(issues)
        self.source = source
        where = f" in {source}" if source else ""
        lines = [f"{len(self.issues)} problem(s){where}:"] + [f"  - {i}" for i in self.issues]
        super().__init__("\n".join(lines))


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' when a close match exists, else ''."""
    match = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
