"""Recipe schema and validation.

A recipe is one run, fully declarative. ``load_recipe`` reads YAML, applies ``key.path=value``
overrides, and validates the whole file before any model loads. Every problem is gathered and
raised once as a ``RecipeError``, each naming the field path, the bad value and what is allowed.
"""

from __future__ import annotations

import re
import typing
import io
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sd2.core.errors import Issue, RecipeError, did_you_mean, short
from sd2.core.models import ModelRef, known_layer_count, known_vocab_size
from sd2.core.precision import check_env
from sd2.core.report import RAW, RESERVED_NAMES, TARGET
from sd2.pipeline.evaluated import check_evaluated, needs_raw
from sd2.pipeline.files import check_model_paths, check_prompt_files
from sd2.pipeline.drafter import (BUILDS, build_ref, builds_anew, check_kinds, drafter_kind, needs, on_drafter,
                                  parse_build, step_kinds, step_path)
from sd2.pipeline.registry import BRANCH_STAGES, STAGES, consumed_inputs

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")  # branch names: '.' separates branch and stage in step ids
RUN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class Recipe(BaseModel):
    """One run. Stage sections (distill, evaluate, branch steps) are validated by the stage's own Config."""
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="run name; the run folder is <out>/<name>")
    seed: int = Field(0, description="seeds every stage")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available, else cpu")
    target: ModelRef
    drafter: ModelRef | None = Field(None, description="where the drafter's weights come from; a drafter a stage "
                                                       "builds (derive: target, head: ...) is that stage's config "
                                                       "(BUILDS); unset: none, where nothing reads one "
                                                       "(_check_no_drafter)")
    distill: dict[str, Any] | None = Field(None, description="config of the distill stage (shared by all branches)")
    branches: dict[str, list[dict[str, Any]]] = Field(default_factory=dict, description="named drafter branches: lists of {stage: config}")
    evaluate: dict[str, Any] | None = Field(None, description="config of the evaluate stage")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not RUN_NAME_RE.match(v):
            raise ValueError(f"must match {RUN_NAME_RE.pattern} (letters, digits, '_', '.' and '-'), got {v!r}")
        return v

    @model_validator(mode="before")
    @classmethod
    def _target_is_not_derived(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("target"), dict) and {"derive", "head"} & data["target"].keys():
            raise ValueError("target cannot be derived or a head; only the drafter can (drafter: {derive: target, ...} "
                             "or {head: fspad})")
        return data


# ---------------------------------------------------------------------------------------------
# Loading, overrides and validation


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``key.path=value`` overrides; the value is parsed as YAML (``gamma=[2,4]`` is a list).
    Integer path parts index lists: ``branches.sparse.0.prune.sparsity=0.6``."""
    issues = []
    for item in overrides:
        if "=" not in item:
            issues.append(Issue(f"override {item!r}", "must look like key.path=value"))
            continue
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            issues.append(Issue(f"override {key}", f"the value is not valid YAML: {str(e).splitlines()[0]}"))
            continue
        parts = key.strip().split(".")
        node: Any = data
        try:
            for part in parts[:-1]:
                node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
            last = parts[-1]
            if isinstance(node, list):
                node[int(last)] = value
            elif isinstance(node, dict):
                node[last] = value
            else:
                raise TypeError
        except (ValueError, IndexError, TypeError, AttributeError):
            issues.append(Issue(f"override {key}", "path does not exist in the recipe"))
    if issues:
        raise RecipeError(issues, "command-line overrides")
    return data


def _loc_to_path(prefix: str, loc: tuple) -> str:
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _fields_at(model_cls: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the (nested) pydantic model at ``loc``, for 'did you mean' on unknown keys."""
    cls: Any = model_cls
    for part in loc:
        if isinstance(part, int) or not (isinstance(cls, type) and issubclass(cls, BaseModel)):
            continue
        field = cls.model_fields.get(part)
        if field is None:
            return []
        cls = _unwrap(field.annotation)
    return list(cls.model_fields) if isinstance(cls, type) and issubclass(cls, BaseModel) else []


def _unwrap(tp: Any) -> Any:
    """The pydantic model inside Optional[...], list[...] or dict[..., ...], if any."""
    for arg in typing.get_args(tp) or ():
        inner = _unwrap(arg)
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            return inner
    return tp


def pydantic_issues(err: ValidationError, model_cls: type[BaseModel], prefix: str = "") -> list[Issue]:
    issues = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith(("function-", "model-", "union-"))))
        path = _loc_to_path(prefix, loc)
        if e["type"] == "extra_forbidden":
            allowed = _fields_at(model_cls, loc[:-1])
            hint = did_you_mean(loc[-1], allowed)
            msg = f"unknown key{hint}; allowed: {', '.join(allowed)}" if allowed else f"unknown key{hint}"
        else:
            msg = e["msg"].removeprefix("Value error, ")
            if e["type"] not in ("missing",) and "input" in e and not isinstance(e["input"], dict) and "got " not in msg:
                msg += f" (got {short(e['input'])})"   # validators that already name the value are not repeated
        issues.append(Issue(path, msg))
    return issues


def _validate_stage(name: str, raw: Any, path: str, issues: list[Issue]):
    cls = STAGES[name].config_cls
    try:
        return cls.model_validate(raw or {})
    except ValidationError as err:
        issues.extend(pydantic_issues(err, cls, path))
        return None


class ValidatedRecipe:
    """A recipe whose every section has been validated; stage configs are their typed models."""

    def __init__(self, recipe: Recipe, distill, branches: dict[str, list[tuple[str, BaseModel]]], evaluate, raw: dict,
                 branch_from: dict[str, str] | None = None, drafter_build: tuple[str, BaseModel] | None = None):
        self.recipe, self.distill, self.branches, self.evaluate, self.raw = recipe, distill, branches, evaluate, raw
        self.drafter_build = drafter_build     # (stage, config) of the stage that builds the drafter, or None
        self.branch_from = branch_from or {}   # branch -> the earlier branch whose model and dataset it starts from
        self.drafter_kind = drafter_kind(recipe, drafter_build)
        self.kinds = step_kinds(self.drafter_kind, branches, self.branch_from)

    @property
    def name(self) -> str:
        return self.recipe.name

    @property
    def has_drafter(self) -> bool:
        """Whether the recipe has a drafter (given or built); without one, every branch builds its own model."""
        return self.drafter_build is not None or self.recipe.drafter is not None

    def resolved(self) -> dict:
        """The recipe as it will run, with every default filled in (written to the run folder)."""
        out = self.recipe.model_dump(mode="json", exclude_none=True)
        out["target"] = self.recipe.target.model_dump(mode="json", exclude_none=True, exclude_defaults=True)
        if self.drafter_build is not None:
            out["drafter"] = build_ref(*self.drafter_build)
        elif self.recipe.drafter is not None:   # none: left out, as the recipe left it out
            out["drafter"] = self.recipe.drafter.model_dump(mode="json", exclude_none=True, exclude_defaults=True)
        if self.distill is not None:
            out["distill"] = self.distill.model_dump(mode="json")
        out["branches"] = {b: ([{"from": self.branch_from[b]}] if b in self.branch_from else [])
                           + [{s: c.model_dump(mode="json")} for s, c in steps] for b, steps in self.branches.items()}
        if self.evaluate is not None:
            out["evaluate"] = self.evaluate.model_dump(mode="json")
        return out


def validate_recipe(data: Any, source: str | None = None) -> ValidatedRecipe:
    check_env()  # a malformed SD2_AUTO_DTYPE would change what every precision field means
    issues: list[Issue] = []
    if not isinstance(data, dict):
        raise RecipeError([Issue("", f"a recipe must be a YAML mapping, got {type(data).__name__}")], source)
    build_raw = data.get("drafter")
    # a build (derive, head), or a mapping that is no model reference either ({}, a misspelt key): parse_build
    # names all five ways to give a drafter
    build_raw = build_raw if isinstance(build_raw, dict) and (BUILDS.keys() & build_raw.keys()
                                                              or not {"hub", "path", "gguf"} & build_raw.keys()) else None
    try:
        recipe = Recipe.model_validate({**data, "drafter": None} if build_raw is not None else data)
    except ValidationError as err:
        issues.extend(pydantic_issues(err, Recipe))
        recipe = None

    # Stage sections are validated even when the top level has problems, so all errors show at once.
    distill, evaluate = (_validate_stage(s, data[s], s, issues) if isinstance(data.get(s), dict) else None
                         for s in ("distill", "evaluate"))
    drafter_build = parse_build(build_raw, distill, issues, _validate_stage) if build_raw is not None else None
    no_drafter = recipe is not None and recipe.drafter is None and build_raw is None   # optional: read below

    branches: dict[str, list[tuple[str, BaseModel]]] = {}
    branch_from: dict[str, str] = {}
    step_sections: list[tuple[str, BaseModel]] = []     # (field path, config) of every branch step
    broken: set[str] = set()    # branches with a step that failed its own validation
    raw_branches = data.get("branches") or {}
    if isinstance(raw_branches, dict):
        for bname, steps in raw_branches.items():
            bpath = f"branches.{bname}"
            if not NAME_RE.match(str(bname)):
                issues.append(Issue(bpath, f"branch names must match {NAME_RE.pattern}"))
            elif bname in RESERVED_NAMES:
                issues.append(Issue(bpath, f"'{bname}' is reserved (evaluate names the un-branched drafter '{RAW}' "
                                           f"and the baseline '{TARGET}'); pick another name"))
            if not isinstance(steps, list):
                continue  # reported by the top-level model
            parsed, before = [], len(issues)
            for i, step in enumerate(steps):
                spath = f"{bpath}[{i}]"
                if not isinstance(step, dict) or len(step) != 1:
                    issues.append(Issue(spath, f"each step is a mapping with one stage name, e.g. {{finetune: {{epochs: 1}}}}; got {short(step)}"))
                    continue
                (sname, sconf), = step.items()
                if sname == "from":      # {from: <earlier branch>}: start from that branch's model and dataset
                    earlier = [str(b) for b in list(raw_branches)[:list(raw_branches).index(bname)]]
                    if i != 0:
                        issues.append(Issue(f"{spath}.from", "from: only goes first in a branch"))
                    elif sconf not in earlier:
                        issues.append(Issue(f"{spath}.from", f"must name an earlier branch{did_you_mean(str(sconf), earlier)}"
                                                             f" ({', '.join(earlier) or 'there is none'}); got {short(sconf)}"))
                    else:
                        branch_from[str(bname)] = str(sconf)
                    continue
                if sname not in STAGES or not STAGES[sname].in_branch:
                    issues.append(Issue(f"{spath}.{sname}", f"unknown stage{did_you_mean(sname, BRANCH_STAGES)}; stages allowed in a branch: {', '.join(BRANCH_STAGES)}"))
                    continue
                if sconf is not None and not isinstance(sconf, dict):
                    issues.append(Issue(f"{spath}.{sname}", f"stage config must be a mapping, got {short(sconf)}"))
                    continue
                cfg = _validate_stage(sname, sconf, f"{spath}.{sname}", issues)
                if cfg is not None:
                    parsed.append((sname, cfg))
                    step_sections.append((f"{spath}.{sname}", cfg))
            branches[str(bname)] = parsed
            if len(issues) > before:
                broken.add(str(bname))

    if recipe is not None:
        build_cfg = drafter_build[1] if drafter_build is not None else None
        issues.extend(check_prompt_files([("drafter", build_cfg), ("distill", distill), ("evaluate", evaluate)]
                                          + step_sections))
        path_issues = check_model_paths(recipe)
        issues.extend(path_issues)
        # Checks across steps read each branch as a sequence; a branch with a broken step (or one that starts
        # from such a branch: `from:` names an earlier one) is left out, since its sequence is unknown: its own
        # errors come first.
        for b in branches:   # in order, so that a chain of them is followed
            if branch_from.get(b) in broken:
                broken.add(b)
        intact = {b: steps for b, steps in branches.items() if b not in broken}
        issues.extend(_check_cross(recipe, intact, branch_from))
        issues.extend(_check_builders(intact, branch_from))
        issues.extend(_check_eagle3(recipe, drafter_build, intact, branch_from))
        issues.extend(check_evaluated(evaluate, data.get("evaluate"), list(branches)))
        if no_drafter:
            issues.extend(_check_no_drafter(distill, data.get("distill"), evaluate, data.get("evaluate"), intact,
                                            branches, branch_from))
        if build_raw is None or drafter_build is not None:   # a broken drafter build: its kind is unknown
            issues.extend(_check_layers(recipe, drafter_build, intact, branch_from))
            # a missing drafter's kind is unknown too (no drafter:, or a drafter.path that is not there): the
            # branches that start from it are left out
            unknown = no_drafter or any(i.path == "drafter.path" for i in path_issues)
            orphans = set(on_drafter(intact, branch_from)) if unknown else set()
            issues.extend(check_kinds(drafter_kind(recipe, drafter_build),
                                      {b: s for b, s in intact.items() if b not in orphans}, branch_from))
    if issues:
        raise RecipeError(issues, source)
    return ValidatedRecipe(recipe, distill, branches, evaluate, data, branch_from, drafter_build)


def _check_no_drafter(distill, distill_raw, evaluate, evaluate_raw, intact: dict, branches: dict,
                      branch_from: dict) -> list[Issue]:
    """A recipe without `drafter:` is one where nothing reads it: every branch starts with a step that
    builds a new model (``- head:``) or from: such a branch, distill is not on-policy, and evaluate does
    not time the un-branched drafter. Else one issue names each reader and how to give the drafter."""
    readers = needs(distill, distill_raw, intact, branch_from)
    raw = needs_raw(evaluate, evaluate_raw, list(branches))
    readers += [raw] if raw else []
    if not readers:
        return []
    return [Issue("drafter", f"not given, but the recipe reads it: {'; '.join(readers)}. Give the drafter's weights "
                             f"(hub, path or gguf) or how to build it (derive: target, or head: eagle | fspad)")]


def _check_layers(recipe: Recipe, build, branches: dict, branch_from: dict) -> list[Issue]:
    """Layer counts, where they are known before any model loads (a local folder's config.json, a
    GGUF header, a derived drafter's layers): derive within the target's layers (the derive stage's
    own check, ``layer_problems``), and each branch's layer-pruning steps within the layers the
    drafter has at that step."""
    target_layers = known_layer_count(recipe.target)
    start = None
    if build is not None and build[0] == "derive":
        derive, cfg = STAGES["derive"].load(), build[1]
        if target_layers is not None:
            issues = [Issue(f"drafter.{f}", msg) for f, msg in derive.layer_problems(cfg, target_layers)]
            if issues:
                return issues
        start = cfg.keep_layers if cfg.keep_layers is not None else len(cfg.layers)
    elif recipe.drafter is not None:
        start = known_layer_count(recipe.drafter)
    issues = []
    prune = STAGES["prune"].load()
    ends: dict[str, int | None] = {}   # each branch's layer count after its last step (a `from:` branch starts there)
    for bname, steps in branches.items():
        n = ends.get(branch_from[bname], start) if bname in branch_from else start
        for i, (sname, cfg) in enumerate(steps):
            if n is None or sname == "head":   # a head has no decoder layers to count (check_kinds refuses layer pruning)
                n = None
                break
            if sname == "prune" and getattr(cfg, "method", None) == "layer":
                n_remove, problem = prune.layer_request(n, cfg)
                if problem:
                    field = next(f for f in ("keep_layers", "n_remove", "match_sparsity") if getattr(cfg, f, None) is not None)
                    issues.append(Issue(f"{step_path(bname, i, branch_from)}.prune.{field}", problem))
                    n = None
                    break
                n = None if n_remove is None else n - n_remove
        ends[bname] = n
    return issues


def _check_builders(branches: dict, branch_from: dict) -> list[Issue]:
    """A step that builds a new model from the target (``- head:``; its stage consumes no model:
    ``builds_anew``) goes first in a branch without ``from:``: anywhere else it would silently discard
    the steps before it (or the branch it starts ``from:``)."""
    issues = []
    for bname, steps in branches.items():
        for i, (sname, cfg) in enumerate(steps):
            if not builds_anew(sname) or (i == 0 and bname not in branch_from):
                continue
            discarded = f"branch '{branch_from[bname]}'" if i == 0 else "the steps before it"
            issues.append(Issue(f"{step_path(bname, i, branch_from)}.{sname}",
                                f"{sname} builds a new drafter from the target, so it would discard {discarded}: "
                                f"make it the first step of a branch without from:"))
    return issues


def _check_eagle3(recipe: Recipe, build, branches: dict, branch_from: dict) -> list[Issue]:
    """EAGLE-3 heads (docs/eagle3.md): built in a branch (their draft vocabulary comes from the
    distilled answers), aux_layers within the target's layers and K within its vocabulary where
    those are known before any model loads, and no trim_vocab after one (it has its own K rows)."""
    if build is not None and build[0] == "head" and build[1].type == "eagle3":
        return [Issue("drafter.head", "an eagle3 head chooses its draft vocabulary from the distilled answers, so it is "
                                      "built in a branch after distill: branches: {e3: [{head: {type: eagle3, "
                                      "draft_vocab_size: K}}, {finetune: {...}}]}")]
    n, v = known_layer_count(recipe.target), known_vocab_size(recipe.target)
    issues, ends = [], {}
    for bname, steps in branches.items():
        eagle3 = ends.get(branch_from.get(bname), False)
        for i, (sname, cfg) in enumerate(steps):
            at = f"{step_path(bname, i, branch_from)}.{sname}"
            if sname == "head":
                eagle3 = cfg.type == "eagle3"
                if eagle3 and n is not None:
                    from sd2.heads.eagle3.model import resolve_aux_layers   # the head stage's own check

                    try:
                        resolve_aux_layers(cfg.aux_layers, n)
                    except ValueError as e:
                        issues.append(Issue(f"{at}.aux_layers", str(e)))
                if eagle3 and v is not None and cfg.draft_vocab_size > v:
                    issues.append(Issue(f"{at}.draft_vocab_size", f"must be at most the target's vocabulary size {v} "
                                                                  f"(got {cfg.draft_vocab_size})"))
            elif sname == "trim_vocab" and eagle3:
                from sd2.heads.eagle3.drafter import TRIM_REFUSED

                issues.append(Issue(at, TRIM_REFUSED))
        ends[bname] = eagle3
    return issues


def _check_cross(recipe: Recipe, branches: dict, branch_from: dict) -> list[Issue]:
    issues = []
    data_at_end: dict[str, bool] = {}
    for bname, steps in branches.items():
        start = branch_from.get(bname)
        has_data = data_at_end.get(start, False) if start else recipe.distill is not None
        for i, (sname, cfg) in enumerate(steps):
            k = getattr(cfg, "k", None) if sname == "trim_vocab" else None
            vocab = known_vocab_size(recipe.drafter or recipe.target) if k is not None else None   # a built drafter reads the target's
            if vocab is not None and k > vocab:
                issues.append(Issue(f"{step_path(bname, i, branch_from)}.trim_vocab.k",
                                    f"must be at most the drafter's vocabulary size {vocab} (got {k})"))
            if sname == "distill":
                has_data = True
            elif "dataset" in consumed_inputs(STAGES[sname], cfg) and not has_data:
                issues.append(Issue(f"{step_path(bname, i, branch_from)}.{sname}", "needs a distilled dataset: add a top-level `distill:` section or a distill step before it"))
        data_at_end[bname] = has_data
    if not branches and recipe.evaluate is None and recipe.distill is None:
        issues.append(Issue("", "the recipe does nothing: add distill, branches or evaluate"))
    return issues


def read_yaml(path: str | Path) -> Any:
    """The parsed YAML of a recipe file. Anything that is not a readable UTF-8 YAML text file (a
    folder, no permission, binary bytes, YAML that does not parse) is a RecipeError naming the file."""
    p = Path(path)
    if p.is_dir():
        raise RecipeError([Issue("", f"{p} is a folder; give the recipe's .yaml file")], str(p))
    if not p.exists():
        raise RecipeError([Issue("", f"recipe file not found: {p}")])
    try:
        text = p.read_bytes().decode("utf-8")
    except OSError as e:
        raise RecipeError([Issue("", f"cannot read the recipe file: {e.strerror or e}; check its permissions")],
                          str(p)) from None
    except UnicodeDecodeError as e:
        raise RecipeError([Issue("", f"not a text file: byte {e.start} is not UTF-8; a recipe is a YAML text "
                                     f"file (see recipes/ for examples)")], str(p)) from None
    try:
        # yaml names a str source "<unicode string>"; a named stream makes its marks name the file
        stream = io.StringIO(text)
        stream.name = str(p)
        data = yaml.safe_load(stream)
    except yaml.YAMLError as e:
        raise RecipeError([Issue("", f"not valid YAML: {e}")], str(p)) from None
    except RecursionError:
        raise RecipeError([Issue("", "not valid YAML: nested too deeply")], str(p)) from None
    return {} if data is None else data


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> ValidatedRecipe:
    data = read_yaml(path)
    if overrides:
        data = apply_overrides(data, overrides)
    return validate_recipe(data, str(path))
