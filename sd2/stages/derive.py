"""Stage derive: a drafter made from the target by keeping a subset of its layers.

This is how sd2 gets a drafter when no smaller sibling exists (Sheared-LLaMA and Minitron start
the same way). A raw derived drafter is a poor drafter; self-distilled fine-tuning makes it useful.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keep_layers: int | None = Field(None, ge=1, description="keep the first K-2 and the last 2 layers")
    layers: list[int] | None = Field(None, description="the exact layer indices to keep")

    @model_validator(mode="after")
    def _one(self) -> "Config":
        if (self.keep_layers is None) == (self.layers is None):
            raise ValueError("give exactly one of keep_layers or layers")
        return self


def run(config: Config, inputs, out_dir: Path, ctx) -> dict:
    import json

    from sd2.macs import count_macs
    from sd2.modeling import decoder_layers, first_last_layers, keep_layers
    from sd2.core.models import load_model, load_tokenizer, save_model

    model = load_model(inputs.target, device="cpu")
    tok = load_tokenizer(inputs.target)
    n = len(decoder_layers(model)[2])
    keep = config.layers if config.layers is not None else first_last_layers(n, config.keep_layers)
    keep_layers(model, keep)
    save_model(model, tok, out_dir)
    removed = [i for i in range(n) if i not in keep]
    (out_dir / "derive.json").write_text(json.dumps({"source_layers": n, "kept": keep, "removed": removed}, indent=2))
    macs = count_macs(model)
    ctx.log.info("derived a %d-layer drafter from the %d-layer target (kept %s)", len(keep), n, keep)
    return {"layers": len(keep), "kept": keep, "macs_per_token": macs.effective}
