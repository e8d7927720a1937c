"""Stage head: a fresh feature-level drafter (EAGLE or FSPAD head) for the recipe's target.

Planned as ``drafter.head`` when the recipe says ``drafter: {head: eagle | fspad, num_layers: N}``, or
as a branch step ``- head: {type: eagle | fspad}``. The head reads
the target's last hidden state and the next token's embedding, runs ``num_layers`` decoder layer(s),
and reuses the target's embeddings and lm_head (shared, frozen, not stored). Its branches train it
with ``finetune`` (on the target's features, computed on the fly), and may ``prune`` and
``trim_vocab`` it. User documentation: docs/heads.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from sd2.core.fields import renamed


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["eagle", "fspad"] = Field(description="eagle (EAGLE-1/2) or fspad (feature sampling + partial alignment)")
    num_layers: int = renamed("layers", 1, ge=1, le=8, description="decoder layers in the head")


def run(config: Config, inputs, out_dir: Path, ctx) -> dict:
    from sd2 import drafters

    drafter = drafters.kind_module("head").build(config.type, config.num_layers, inputs.target, ctx.seed)
    drafter.save(Path(out_dir))
    macs = drafter.macs()
    params = sum(p.numel() for p in drafter.module.parameters())
    ctx.log.info("built a %s head over the target: %d layer(s), %.2f M parameters, %.1f M MACs/token (lm_head %.1f M)",
                 config.type, config.num_layers, params / 1e6, macs.effective / 1e6, macs.lm_head / 1e6)
    return {"head": config.type, "layers": config.num_layers, "parameters": params, "macs_per_token": macs.effective}
