"""Stage head: a fresh feature-level drafter (EAGLE, FSPAD or EAGLE-3 head) for the recipe's target.

Planned as ``drafter.head`` when the recipe says ``drafter: {head: eagle | fspad, num_layers: N}``, or
as a branch step ``- head: {type: eagle | fspad | eagle3}``. An eagle/fspad head reads the target's
last hidden state and the next token's embedding, runs ``num_layers`` decoder layer(s), and reuses
the target's embeddings and lm_head (shared, frozen, not stored). An eagle3 head (docs/eagle3.md)
fuses three of the target's hidden states (``aux_layers``) and drafts over its own K-row vocabulary
(``draft_vocab_size``), chosen here from the target's token frequencies on the distilled answers, so
it is built in a branch, after distill, and this stage then reads the dataset. Its branches train it
with ``finetune``, and may ``prune`` it (and ``trim_vocab`` an eagle/fspad head).
User documentation: docs/heads.md, docs/eagle3.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, model_validator

from sd2.core.fields import added, renamed

SINCE = "2026-12-02"



class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["eagle", "fspad", "eagle3"] = Field(
        description="eagle (EAGLE-1/2), fspad (feature sampling + partial alignment) or eagle3 (EAGLE-3: fused "
                    "low/middle/high target states, its own draft vocabulary)")
    num_layers: int = renamed("layers", 1, ge=1, le=8, description="decoder layers in the head")
    aux_layers: list[int] | None = added(
        None, since=SINCE, description="eagle3: the 3 target hidden states fc fuses, as ids k = the state after k "
        "decoder layers, strictly increasing in [1, N-1]; unset: EAGLE-3's default (2, N//2, N-3)")
    draft_vocab_size: int | None = added(
        None, since=SINCE, ge=1, description="eagle3 (required): K, the rows of its own output layer: the K tokens the "
        "target emits most in the distilled answers (EAGLE-3: 32k of Llama-3's 128k)")
    feature_sampling: StrictBool | None = added(
        None, since=SINCE, description="eagle3: FSPAD's feature sampling block on the fused hidden state "
        "(h + down(SiLU(gate(e)) * up(norm(h))), the next token's embedding gating it); unset: false")

    @model_validator(mode="after")
    def _check(self) -> "Config":
        if self.type != "eagle3":
            given = [f for f in ("aux_layers", "draft_vocab_size", "feature_sampling") if getattr(self, f) not in (None, False)]
            if given:
                raise ValueError(f"{', '.join(given)}: options of an eagle3 head, not of {self.type} (an fspad head always "
                                 "samples features; trim an eagle/fspad head's vocabulary with a trim_vocab step)")
        elif self.draft_vocab_size is None:
            raise ValueError("an eagle3 head needs draft_vocab_size: K, the tokens of its own output layer (e.g. 8192 for "
                             "a 49k vocabulary; EAGLE-3 used 32k of 128k)")
        return self


def consumes(config: Config) -> tuple[str, ...]:
    """An eagle3 head reads the distilled answers for its draft vocabulary; the others only the target."""
    return ("target", "dataset") if config.type == "eagle3" else ("target",)


def run(config: Config, inputs, out_dir: Path, ctx) -> dict:
    from sd2 import drafters

    drafter, extra = drafters.kind_module("head").build_from(config, inputs.target, inputs.dataset, ctx)
    drafter.save(Path(out_dir))
    macs = drafter.macs()
    params = sum(p.numel() for p in drafter.module.parameters())
    ctx.log.info("built a %s head over the target: %d layer(s), %.2f M parameters, %.1f M MACs/token (lm_head %.1f M)",
                 config.type, config.num_layers, params / 1e6, macs.effective / 1e6, macs.lm_head / 1e6)
    return {"head": config.type, "layers": config.num_layers, "parameters": params, "macs_per_token": macs.effective,
            **extra}
