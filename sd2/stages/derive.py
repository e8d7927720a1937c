"""Stage derive: a drafter made from the target by keeping a subset of its layers.

This is how sd2 gets a drafter when no smaller sibling exists (Sheared-LLaMA and Minitron start
the same way). A raw derived drafter is a poor drafter; self-distilled fine-tuning makes it useful.

Which layers: ``layers`` names them; ``keep_layers: K`` keeps the first K-2 and the last 2
(``select: first_last``), or removes the contiguous block of L-K layers whose input and output
hidden states are closest in angular distance (``select: angular``; Gromov et al. 2024), with the
same code as layer pruning (sd2/stages/prune/layers.py). The distances are measured on prompts,
because derive runs before distill: the calibration prompts with the target's chat template and
generation prompt applied, ``calibration_samples`` of them drawn with the run's seed, each cut to
``seq_len`` tokens. The recipe's distill prompts are the default (sd2.pipeline.runner.plan).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from sd2.core.errors import Sd2Error
from sd2.data.prompts import Prompts


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keep_layers: int | None = Field(None, ge=1, description="keep K layers (which: see select)")
    layers: list[int] | None = Field(None, min_length=1, description="the exact layer indices to keep")
    select: Literal["first_last", "angular"] = Field(
        "first_last", description="with keep_layers: first_last keeps the first K-2 and the last 2; angular removes "
                                  "the block of L-K layers of least angular distance on the calibration prompts")
    calibration: Prompts | None = Field(None, description="select angular: the prompts the distances are measured on")
    calibration_samples: int = Field(64, ge=1, description="select angular: prompts drawn from calibration")
    seq_len: int = Field(256, ge=8, description="select angular: tokens kept from the start of each prompt")

    @model_validator(mode="after")
    def _one(self) -> "Config":
        if (self.keep_layers is None) == (self.layers is None):
            raise ValueError("give exactly one of keep_layers or layers")
        if self.select == "angular" and self.keep_layers is None:
            raise ValueError("select: angular chooses which keep_layers layers to keep; it does not go with layers")
        if self.select == "angular" and self.calibration is None:
            raise ValueError("select: angular needs calibration prompts")
        if self.calibration is not None and self.select != "angular":
            raise ValueError("calibration prompts are for select: angular")
        return self


def layer_problems(config: Config, n: int) -> list[tuple[str, str]]:
    """(field, message) when the layers asked for do not fit a target of ``n`` decoder layers; checked
    by ``sd2 validate`` where the target's layer count is known, and at run time."""
    if config.keep_layers is not None and config.keep_layers > n:
        return [("keep_layers", f"must be in [1, {n}]: the target has {n} decoder layers (got {config.keep_layers})")]
    keep = config.layers
    if keep is not None and (list(keep) != sorted(set(keep)) or not all(0 <= i < n for i in keep)):
        return [("layers", f"layer indices must be distinct, increasing and in [0, {n - 1}]: the target has {n} "
                           f"decoder layers (got {keep})")]
    return []


def run(config: Config, inputs, out_dir: Path, ctx) -> dict:
    import json

    from sd2.core.models import load_model, load_tokenizer, save_model
    from sd2.macs import count_macs
    from sd2.modeling import decoder_layers, first_last_layers, keep_layers

    model = load_model(inputs.target, device="cpu")
    tok = load_tokenizer(inputs.target)
    n = len(decoder_layers(model)[2])
    info: dict = {"source_layers": n, "select": config.select if config.layers is None else "layers"}
    for field, problem in layer_problems(config, n):
        raise Sd2Error(f"drafter.{field}: {problem}")
    if config.layers is not None:
        keep = config.layers
    elif config.select == "angular" and config.keep_layers < n:
        from sd2.stages.prune.layers import prune_layers

        samples = _calibration(config, tok, ctx.seed)
        found = prune_layers(model, samples, n - config.keep_layers, ctx)   # removes the block in place
        keep = found["kept_layers"]
        info.update(calibration_samples=len(samples), angular_distances=found["angular_distances"])
    else:
        keep = first_last_layers(n, config.keep_layers)
    if config.select != "angular" or config.layers is not None:
        keep_layers(model, keep)
    save_model(model, tok, out_dir)
    removed = [i for i in range(n) if i not in keep]
    info.update(kept=keep, removed=removed)
    (out_dir / "derive.json").write_text(json.dumps(info, indent=2))
    macs = count_macs(model)
    ctx.log.info("derived a %d-layer drafter from the %d-layer target (kept %s)", len(keep), n, keep)
    return {"layers": len(keep), "kept": keep, "macs_per_token": macs.effective}


def _calibration(config: Config, tok, seed: int) -> list[list[int]]:
    """Token ids of the calibration prompts: the first user turn with the chat template and the
    generation prompt (as distill starts them), drawn with ``seed`` and cut to ``seq_len``."""
    from sd2.data.prompts import load_prompts
    from sd2.stages.distill.chat import ChatFormat
    from sd2.stages.prune.calibration import draw

    fmt = ChatFormat(tok, ())
    convs = [c for c in load_prompts(config.calibration) if c.turns]
    out = draw(convs, lambda c: fmt.start(c).ids, config.calibration_samples, config.seq_len, seed)
    if not out:
        raise Sd2Error("drafter.calibration selected no prompt of 2 tokens or more to measure layer distances on")
    return out
