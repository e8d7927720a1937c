"""Which drafters the evaluate stage times (``evaluate.drafters``), and prompt lookup's name: the
recipe checks that read the evaluate section against the recipe's branches (sd2.pipeline.schema),
and whether it times the un-branched drafter, which a recipe without `drafter:` does not have."""

from __future__ import annotations

from typing import Any

from sd2.core.errors import Issue, did_you_mean
from sd2.core.report import RAW, RESERVED_NAMES, TARGET


def check_evaluated(evaluate, raw: Any, branches: list[str]) -> list[Issue]:
    """Issues of ``evaluate.drafters`` (each a branch name or RAW, once) and of prompt lookup's name (not
    a branch's, RAW or TARGET). ``evaluate`` is the validated section, or None when it failed its own
    validation: then ``raw`` (the section as written) is read, so that its other errors do not hide
    these."""
    out: list[Issue] = []
    chosen, lookup = _evaluated(evaluate, raw)
    clash = lookup is not None and (lookup.name in branches or lookup.name in RESERVED_NAMES)
    if chosen:
        out.extend(_check_evaluated(chosen, [RAW, *branches], None if clash else lookup))
    if clash:
        whose = "a branch's name" if lookup.name in branches else (
            f"reserved ('{RAW}' is the un-branched drafter, '{TARGET}' the baseline)")
        out.append(Issue("evaluate.prompt_lookup.name", f"'{lookup.name}' is {whose}, and the report names "
                                                        "each drafter once; give prompt lookup another name"))
    return out


def needs_raw(evaluate, raw: Any, branches: list[str]) -> str | None:
    """Why the evaluate section times the un-branched drafter (RAW), as a recipe would say it, or None
    (a recipe without `drafter:` has none): ``evaluate.drafters`` names it, or, unset (every drafter),
    there is no branch and no prompt lookup, so RAW is all it would time. ``evaluate`` and ``raw`` as
    for ``check_evaluated``; no ``evaluate:`` section times nothing."""
    chosen, lookup = _evaluated(evaluate, raw)
    if chosen and RAW in chosen:
        return f"evaluate.drafters names {RAW} (the un-branched drafter)"
    if evaluate is not None and chosen is None and not branches and lookup is None:
        return (f"evaluate has no branch and no prompt_lookup to time, so it would time {RAW} (the un-branched "
                f"drafter) alone")
    return None


def _evaluated(evaluate, raw) -> tuple[list[str] | None, Any]:
    """(evaluate.drafters, prompt lookup) of the validated section, or, when it has errors of its own
    (``evaluate`` None), of the section as written (``_raw_evaluated``), so that they are still checked."""
    if evaluate is None:
        return _raw_evaluated(raw)
    # getattr: a registry may swap the evaluate stage
    return getattr(evaluate, "drafters", None), getattr(evaluate, "prompt_lookup", None)


def _raw_evaluated(raw) -> tuple[list[str] | None, Any]:
    """(drafters, prompt lookup) of an ``evaluate:`` section that failed its own validation, read as
    written where they are well-formed (a list of names; a prompt lookup whose name is a string), so
    that a mistake elsewhere in the section does not hide a bad drafter name."""
    from types import SimpleNamespace

    if not isinstance(raw, dict):
        return None, None
    chosen = raw.get("drafters")
    chosen = chosen if isinstance(chosen, list) and chosen and all(isinstance(n, str) for n in chosen) else None
    pl = raw.get("prompt_lookup")      # off unless given; {} turns it on under its default name
    name = pl.get("name", "prompt_lookup") if isinstance(pl, dict) else None
    return chosen, (SimpleNamespace(name=name) if isinstance(name, str) else None)


def _check_evaluated(chosen: list[str], known: list[str], lookup) -> list[Issue]:
    """``evaluate.drafters``: each entry a branch name or RAW, once."""
    out, seen = [], set()
    for i, n in enumerate(chosen):
        where = f"evaluate.drafters[{i}]"
        if n in seen:
            out.append(Issue(where, f"'{n}' is listed twice; was another branch meant?"))
        elif n == TARGET:
            out.append(Issue(where, f"'{TARGET}' is the baseline, always timed; list drafters only"))
        elif lookup is not None and n == lookup.name:
            out.append(Issue(where, f"'{n}' is prompt lookup, which evaluate.prompt_lookup turns on or off, not "
                                    "evaluate.drafters; remove it here"))
        elif n not in known:
            out.append(Issue(where, f"names no drafter of this recipe{did_you_mean(str(n), known)}; give a branch "
                                    f"name or '{RAW}' (the un-branched drafter): {', '.join(known)}"))
        seen.add(n)
    return out
