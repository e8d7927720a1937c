"""Stand-in stages for testing the runner's mechanics (skip, invalidation, force, lock) in milliseconds.

Each writes a file recording its inputs, and appends its id to CALLS so tests can see what ran.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict

CALLS: list[str] = []


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    value: int = 0
    fail: bool = False


def run(config: Config, inputs, out_dir: Path, ctx) -> dict:
    CALLS.append(ctx.stage_id)
    (out_dir / "partial-work").write_text("x")
    if config.fail:
        raise RuntimeError("simulated crash")
    record = {"value": config.value, "model": inputs.model.ref if inputs.model else None,
              "dataset": str(inputs.dataset) if inputs.dataset else None,
              "drafters": {k: v.ref for k, v in inputs.drafters.items()}}
    (out_dir / "record.json").write_text(json.dumps(record))
    (out_dir / "config.json").write_text("{}")  # looks like a model folder to downstream stages
    ctx.log_metrics(value=config.value)
    return {"value": config.value}
