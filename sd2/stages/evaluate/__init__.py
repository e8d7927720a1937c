"""Stage evaluate: lossless speculative decoding of every drafter against the target.

Measures, per drafter and per (gamma, temperature): MAL (pooled and per request), acceptance rate,
acceptance per position, MAL per category, wall-clock speedup over target-only decoding, measured c,
theoretical and MAC-based speedups, MACs and sparsity, and losslessness; then writes report.json,
report.md and plots. Metric definitions: docs/evaluate.md and sd2/mal.py.

The decoding itself is sd2.engine (one round loop over proposers: drafters, cross-tokenizer
drafters, prompt lookup). Modules here: measure (timing protocol, c, v(n), teacher-forced MAL),
collect (load, measure, assemble), report (report.json/.md, snippets), plots, vllm (engine: vllm).
The commands `sd2 eval` and `sd2 compare` (the CI gate) live in sd2.pipeline.commands/compare.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, StrictBool, model_validator

from sd2.core.fields import DType, added, dtype_field
from sd2.data.prompts import Prompts


class PromptLookup(BaseModel):
    """Prompt lookup decoding (n-gram drafting from the prompt and the output, training-free; the
    Spec-Bench PLD baseline) evaluated as one more drafter named ``name``."""
    model_config = ConfigDict(extra="forbid")

    name: str = Field("prompt_lookup", pattern=r"^[A-Za-z0-9_.-]+$", description="its name in the report")
    max_ngram: int = Field(3, ge=1, le=16, description="longest n-gram matched (tried first)")
    min_ngram: int = Field(1, ge=1, le=16, description="shortest n-gram matched")

    @model_validator(mode="after")
    def _order(self):
        if self.min_ngram > self.max_ngram:
            raise ValueError(f"prompt_lookup.min_ngram ({self.min_ngram}) must be <= max_ngram ({self.max_ngram})")
        return self


def _in_range(v, lo, hi, what: str):
    """A sweepable setting (one value or a non-empty list): every value in [lo, hi], else ``what``."""
    vals = v if isinstance(v, list) else [v]
    if not vals or any(x < lo or x > hi for x in vals):
        raise ValueError(f"{what}, got {v}")
    return v


def mal_only_conflicts(temperature, gamma, width, prompt_lookup, flag: str = "") -> list[str]:
    """The settings that MAL only (``decode: false``, teacher-forced greedy chain rounds) cannot simulate,
    each as what it needs instead: ``evaluate``'s check with the values, and ``sd2 eval --mal-only``'s
    (``flag="--"``: the options' names, no values). Each setting is one value or a list."""
    as_list = lambda v: v if isinstance(v, list) else [v]  # noqa: E731
    values = not flag
    out = []
    if {float(t) for t in as_list(temperature)} != {0.0}:
        out.append(f"{flag}temperature 0 only" + (f" (temperature is {temperature})" if values else ""))
    if "auto" in as_list(gamma):
        out.append(f"a fixed {flag}gamma, not auto" + (" (gamma is 'auto')" if values else ""))
    if set(as_list(width)) != {1}:
        out.append(f"{flag}width 1" + (f" (width is {width})" if values else ""))
    if prompt_lookup:
        out.append("no prompt_lookup (prompt_lookup is set)" if values else "no prompt lookup drafter")
    return out


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompts: Prompts = Field(
        description="evaluation prompts (sd2.data.prompts); hold them apart from training prompts with skip")
    gamma: int | list[int] | Literal["auto"] = Field(
        4, description="draft length (tree depth) per round; a list is a sweep; 'auto' picks, per drafter, the "
                       "depth (1..max_gamma) and width (among `width`) of highest modeled speedup from measured "
                       "costs and pilot acceptance (sd2.engine.shape)")
    max_gamma: int = Field(8, ge=1, le=64, description="gamma: auto searches depths 1..max_gamma")
    pilot_prompts: int = Field(2, ge=1, le=64, description="gamma: auto measures acceptance on the first N prompts "
                                                           "(greedy), before the timed passes")
    width: int | list[int] = Field(1, description="tree width: nodes per depth for proposers that branch (a drafter's "
                                                  "top-k siblings, prompt lookup's distinct matches); 1 = chain; a list is a sweep")
    temperature: float | list[float] = Field(0.0, description="0 = greedy (checked lossless token for token); a list is a sweep")
    top_k: int = Field(0, ge=0, description="sampling: keep the k most likely tokens (0 = off); target and drafters alike")
    top_p: float = Field(1.0, gt=0, le=1, description="sampling: nucleus mass (1 = off); target and drafters alike")
    min_p: float = Field(0.0, ge=0, lt=1, description="sampling: drop tokens below min_p x the top probability (0 = off)")
    prompt_lookup: PromptLookup | None = Field(None, description="also evaluate prompt lookup decoding (training-free baseline)")
    max_new_tokens: int = Field(128, ge=1, le=8192, description="new tokens per request")
    turns: int = Field(1, ge=1, description="evaluate the first N user turns of each conversation; later turns "
                                            "see the target's greedy answers as history")
    repeats: int = Field(1, ge=1, le=20, description="timed passes over the prompts; wall-clock is the median")
    warmup: int = Field(1, ge=0, le=10, description="untimed warm-up runs before timing")
    teacher_forced: StrictBool = Field(True, description="also compute greedy MAL by teacher forcing (one drafter forward per prompt)")
    decode: StrictBool = Field(True, description="false: MAL only, no speculative decoding. The target's greedy answers are "
                                           "generated (timed: the baseline) and each drafter's greedy chain rounds at "
                                           "each gamma are simulated exactly by teacher forcing, one drafter forward per "
                                           "prompt. No wall-clock speedup, c or losslessness check; needs temperature 0, "
                                           "width 1, a fixed gamma and no prompt_lookup")
    dtype: DType = dtype_field("dtype of both models", exact=True)
    drafters: list[str] | None = added(None, since="2026-12-03", description="in a recipe: the drafters to "
                                       "evaluate, by branch name (and 'raw', the un-branched drafter), in the run's order; "
                                       "unset: every branch's final model and 'raw' (where the recipe has a "
                                       "`drafter:`). sd2 eval takes --drafter instead")
    engine: Literal["sd2", "vllm"] = added("sd2", since="2026-12-02", description="sd2: sd2's engine; vllm: vLLM serves "
                                           "the target and each drafter (draft_model, eagle, ngram; docs/vllm.md)")

    @field_validator("gamma", mode="before")
    @classmethod
    def _gamma(cls, v):
        """One sentence for the shapes and values the union would otherwise answer with three raw lines."""
        if isinstance(v, list) and "auto" in v:
            raise ValueError(f"gamma: auto picks the depth itself; give it alone (gamma: auto), not in a list "
                             f"with fixed depths, got {v}")
        bad = lambda x: isinstance(x, bool) or not isinstance(x, int)  # noqa: E731
        if v != "auto" and (bad(v) if not isinstance(v, list) else any(map(bad, v))):
            raise ValueError(f"gamma must be an integer in [1, 64], a non-empty list of them, or 'auto', got {v!r}")
        return v if v == "auto" else _in_range(v, 1, 64, "gamma must be an integer in [1, 64], a non-empty list of "
                                                         "them, or 'auto'")

    @field_validator("drafters", mode="before")
    @classmethod
    def _drafters(cls, v):
        if isinstance(v, str):
            raise ValueError(f"give a list of branch names, e.g. drafters: [{v}]")
        if isinstance(v, list) and not v:
            raise ValueError("an empty list evaluates no drafter; leave drafters out to evaluate every one")
        return v

    @field_validator("width")
    @classmethod
    def _width(cls, v):
        return _in_range(v, 1, 16, "width must be an integer in [1, 16] or a non-empty list of them")

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v):
        return _in_range(v, 0, 10, "temperature must be in [0, 10] or a non-empty list of such")

    @model_validator(mode="after")
    def _mal_only(self):
        bad = [] if self.decode else mal_only_conflicts(self.temperature, self.gamma, self.width, self.prompt_lookup)
        if bad:
            raise ValueError("decode: false measures greedy chain MAL by teacher forcing, so it needs "
                             + ", ".join(bad) + "; set decode: true (the default) to run speculative decoding")
        return self

    @model_validator(mode="after")
    def _vllm(self):
        if self.engine == "vllm":
            from sd2.serve.evaluate import conflicts

            if bad := conflicts(self):
                raise ValueError("engine: vllm needs " + "; ".join(bad))
        return self

    @property
    def auto(self) -> bool:
        return self.gamma == "auto"

    @property
    def gammas(self) -> list[int]:
        """The fixed depths; with gamma: auto, 1..max_gamma (the depths it may choose)."""
        if self.auto:
            return list(range(1, self.max_gamma + 1))
        return sorted(set(self.gamma if isinstance(self.gamma, list) else [self.gamma]))

    @property
    def widths(self) -> list[int]:
        return sorted(set(self.width if isinstance(self.width, list) else [self.width]))

    def samplings(self):
        from sd2.engine.proposer import Sampling

        return [Sampling(t, self.top_k, self.top_p, self.min_p) for t in self.temperatures]

    @property
    def temperatures(self) -> list[float]:
        return sorted(set(float(t) for t in (self.temperature if isinstance(self.temperature, list) else [self.temperature])))


def run(config: Config, inputs, out_dir: Path, ctx) -> dict:
    from sd2.stages.evaluate.collect import evaluate_and_report

    if config.engine == "vllm":
        from sd2.stages.evaluate.vllm import evaluate_in_vllm

        return evaluate_in_vllm(config, inputs, Path(out_dir), ctx)

    return evaluate_and_report(config, inputs, Path(out_dir), ctx)
