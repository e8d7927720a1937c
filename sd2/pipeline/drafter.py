"""The recipe's drafter: where its weights come from (a ModelRef) or which stage builds it (derive,
head: that stage's own Config), and the drafter kind (sd2.drafters.KINDS) each branch step receives,
so that options a kind lacks are recipe errors naming the field, before any model loads."""

from __future__ import annotations

from pydantic import BaseModel

from sd2.core.errors import Issue, did_you_mean, short
from sd2.core.paths import expand
from sd2.pipeline.registry import STAGES, consumed_inputs


# A recipe's `drafter:` that a stage builds: {<key>: <value>, **that stage's config} (the key's value fills
# the field named here, None: the value is fixed, e.g. derive: target).
BUILDS = {"derive": ("derive", None), "head": ("head", "type")}


def parse_build(raw: dict, distill, issues: list[Issue], validate) -> tuple[str, BaseModel] | None:
    """(stage, config) of a built drafter (``drafter: {derive: target, keep_layers: 8}``, ``drafter:
    {head: fspad}``): the rest of the section is the building stage's own Config, checked by it, here,
    once (``validate``: the schema's stage validation). derive with select: angular measures on the
    distill prompts unless given its own."""
    keys = [k for k in (*BUILDS, "hub", "path", "gguf") if k in raw]
    if len(keys) != 1:
        from sd2.core.models import ModelRef

        unknown = [k for k in raw if k not in keys and k not in ModelRef.model_fields]
        ways = (*BUILDS, "hub", "path", "gguf")
        named = [f"{k}{did_you_mean(k, ways)}" for k in map(str, unknown)]
        got = (", ".join(keys) if keys else "none") + (f"; unknown key(s): {', '.join(named)}" if unknown else "")
        none = "" if keys else "; or leave drafter: out where nothing reads it (every branch starts with - head:)"
        issues.append(Issue("drafter", f"give exactly one of hub, path, gguf, derive, head (got {got}){none}"))
        return None
    (key,) = keys
    stage, field = BUILDS[key]
    rest = {k: v for k, v in raw.items() if k != key}
    if field is not None:
        if field in raw:   # {head: fspad, type: eagle}: one of the two would be dropped without a word
            issues.append(Issue(f"drafter.{field}", f"the {key}'s {field} is the value of {key}: write "
                                                    f"{key}: {short(raw[field])} and remove {field}"))
            return None
        rest[field] = raw[key]
    elif raw[key] != "target":
        issues.append(Issue(f"drafter.{key}", f"a drafter is derived from the target: write {key}: target "
                                              f"(got {short(raw[key])})"))
        return None
    angular = rest.get("select") == "angular" and rest.get("calibration") is None and "keep_layers" in rest
    if stage == "derive" and angular:
        if getattr(distill, "prompts", None) is None:
            issues.append(Issue("drafter.calibration", "select: angular measures layer distances on prompts: give "
                                "drafter.calibration (e.g. {source: mtbench, limit: 32}) or a top-level distill section "
                                "(its prompts are the default)"))
            return None
        rest["calibration"] = distill.prompts
    before = len(issues)
    cfg = validate(stage, rest, "drafter", issues)
    if field is not None:   # the field the key's value fills is named as the recipe names it
        issues[before:] = [Issue(f"drafter.{key}", i.message) if i.path == f"drafter.{field}" else i
                           for i in issues[before:]]
    return (stage, cfg) if cfg is not None else None


def build_ref(stage: str, cfg: BaseModel) -> dict:
    """A built drafter as a recipe's ``drafter:`` section (the resolved recipe)."""
    key, field = next((k, f) for k, (s, f) in BUILDS.items() if s == stage)
    out = cfg.model_dump(mode="json", exclude_none=True)
    return {key: out.pop(field) if field else "target", **out}


def drafter_kind(recipe, build: tuple[str, BaseModel] | None = None) -> str:
    """The drafter kind (sd2.drafters.KINDS) of the recipe's drafter before any branch: the kind its
    building stage produces, what a local folder holds (read once, here), else a causal LM."""
    from sd2 import drafters

    if build is not None:
        return STAGES[build[0]].kind
    d = recipe.drafter
    return drafters.kind_of(expand(d.path)) if d is not None and d.path is not None else drafters.DEFAULT


def step_kinds(start: str, branches: dict, branch_from: dict) -> dict[str, list[str]]:
    """{branch: the drafter kind each of its steps receives}: ``start``, changed by a step whose stage
    produces another kind (``- head:``), carried on by a ``from:`` branch."""
    out: dict[str, list[str]] = {}
    ends: dict[str, str] = {}
    for bname, steps in branches.items():
        kind = ends.get(branch_from[bname], start) if bname in branch_from else start
        out[bname] = []
        for sname, _ in steps:
            out[bname].append(kind)
            kind = STAGES[sname].kind or kind
        ends[bname] = kind
    return out


def builds_anew(stage: str) -> bool:
    """A stage that makes a new model without reading the branch's (``- head:``: a head over the
    target): a branch that starts with it does not start from the recipe's drafter."""
    spec = STAGES[stage]
    return spec.produces == "model" and "model" not in spec.consumes


def on_drafter(branches: dict, branch_from: dict) -> list[str]:
    """The branches whose model starts as the recipe's drafter, in order: every branch but one whose
    first step builds a new model (``builds_anew``) or that starts ``from:`` a branch that is not listed
    (a ``from:`` branch named here starts from one that is)."""
    out: list[str] = []
    for bname, steps in branches.items():
        if bname in branch_from:
            if branch_from[bname] in out:
                out.append(bname)
        elif not (steps and builds_anew(steps[0][0])):
            out.append(bname)
    return out


def needs(distill, distill_raw, branches: dict, branch_from: dict) -> list[str]:
    """What reads the recipe's drafter, besides evaluate (sd2.pipeline.evaluated.needs_raw), each as
    a recipe would say it: a branch that starts from it (``on_drafter``; a ``from:`` branch of one is
    not named again) and an on-policy top-level distill (``distill``: the validated section, or None
    when it failed its own validation: then ``distill_raw``, the section as written, is read)."""
    out = []
    for bname in on_drafter(branches, branch_from):
        if bname not in branch_from:
            steps = branches[bname]
            first = f"its first step is {steps[0][0]}" if steps else "it has no steps"
            out.append(f"branch '{bname}' starts from the recipe's drafter ({first})")
    on_policy = ("model" in consumed_inputs(STAGES["distill"], distill) if distill is not None else
                 isinstance(distill_raw, dict) and distill_raw.get("policy") == "drafter")
    if on_policy:
        out.append("distill.policy: drafter (the drafter writes the answers)")
    return out


def step_path(bname: str, i: int, branch_from: dict) -> str:
    """The recipe path of a branch's i-th parsed step, as a user sees it: a ``from:`` line is step 0."""
    return f"branches.{bname}[{i + (1 if bname in branch_from else 0)}]"


def check_kinds(start: str, branches: dict, branch_from: dict) -> list[Issue]:
    """A branch step's options that the drafter kind it receives lacks (sd2.drafters.problems): a
    head-only finetune option on a causal LM, layer pruning or a raw recipe on a head."""
    from sd2 import drafters

    issues = []
    for bname, kinds in step_kinds(start, branches, branch_from).items():
        for i, ((sname, cfg), kind) in enumerate(zip(branches[bname], kinds)):
            issues += [Issue(f"{step_path(bname, i, branch_from)}.{sname}.{field}", msg)
                       for field, msg in drafters.problems(sname, cfg, kind)]
    return issues
