"""Errors that sd2 shows to users: a message that names the field or file and the fix, never a traceback."""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def reading(what: str, expected: str, fix: str):
    """Turn a failure of a third-party reader (transformers, tokenizers, safetensors, gguf, datasets)
    inside the block into an Sd2Error that names what was read, what was expected and the fix,
    keeping the library's one-line reason. Those libraries raise many types (ValueError, OSError,
    KeyError, their own), so every Exception is caught; MemoryError is not a bad input and passes.

        with reading(f"the model folder {path}", "a save_pretrained folder with *.safetensors",
                     "rebuild it with sd2, or point the recipe at another folder"):
            model = AutoModelForCausalLM.from_pretrained(path)
    """
    try:
        yield
    except (Sd2Error, MemoryError):
        raise
    except Exception as e:
        raise Sd2Error(f"cannot read {what}: {reason(e)}. Expected {expected}; {fix}") from e


def reason(e: BaseException, limit: int = 300) -> str:
    """An exception as one short line: its type and the first line of its message."""
    lines = str(e).strip().splitlines()
    text = f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
