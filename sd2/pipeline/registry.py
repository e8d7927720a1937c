"""The stage registry: an explicit map from the YAML name to the module that implements it.

Each stage module exposes:
  - ``Config``: a pydantic model with ``extra="forbid"`` (importing the module must stay cheap:
    torch, transformers and llmcompressor are imported inside ``run``, so ``sd2 validate`` is fast);
  - ``run(config, inputs, out_dir, ctx) -> dict``: does the work, writes into ``out_dir`` and
    returns a small dict of key metrics (shown by ``sd2 show`` and stored in the manifest).

The runner, not the stage, decides skipping, fingerprints and manifests.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from sd2.core.errors import Sd2Error, did_you_mean


@dataclass(frozen=True)
class StageSpec:
    name: str
    module: str
    summary: str
    # Inputs the stage reads, from: "target", "model" (the branch's current drafter),
    # "dataset" (the branch's current dataset), "drafters" (every finished drafter; evaluate only).
    # Only these enter the fingerprint, so e.g. prune does not rerun when the target changes.
    consumes: tuple[str, ...]
    # What it writes into its folder: "model" (a save_pretrained folder), "dataset" or "report".
    produces: str
    in_branch: bool = True
    # Runs in every process of a multi-process launch (torchrun / accelerate launch); other stages
    # run on rank 0 alone while the other ranks wait for their manifests.
    distributed: bool = False
    # The drafter kind (sd2.drafters.KINDS) of the model it produces; None: the kind it was given.
    kind: str | None = None

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)

    @property
    def config_cls(self):
        return self.load().Config


STAGES: dict[str, StageSpec] = {
    spec.name: spec
    for spec in [
        StageSpec("derive", "sd2.stages.derive", "derive a drafter from the target by keeping a subset of its layers",
                  consumes=("target",), produces="model", in_branch=False, kind="lm"),
        StageSpec("head", "sd2.stages.head", "build a feature-level head (EAGLE / FSPAD / EAGLE-3) over the target",
                  consumes=("target", "dataset"), produces="model", kind="head"),
        StageSpec("distill", "sd2.stages.distill", "self-data distillation: the target (or drafter, on-policy) answers the prompts",
                  consumes=("target", "model"), produces="dataset"),
        StageSpec("prune", "sd2.stages.prune", "unstructured (SparseGPT, Wanda, magnitude, N:M) or layer pruning",
                  consumes=("model", "dataset"), produces="model"),
        StageSpec("finetune", "sd2.stages.finetune", "fine-tune on distilled data with the sparsity mask held exactly",
                  consumes=("model", "dataset", "target"), produces="model", distributed=True),
        StageSpec("trim_vocab", "sd2.stages.trim_vocab", "shrink the drafter's lm_head to the tokens the target emits",
                  consumes=("model", "dataset"), produces="model"),
        StageSpec("evaluate", "sd2.stages.evaluate", "lossless speculative decoding: MAL, acceptance, MACs, speedup",
                  consumes=("target", "drafters"), produces="report", in_branch=False),
    ]
}

BRANCH_STAGES = [name for name, spec in STAGES.items() if spec.in_branch]


def get_stage(name: str) -> StageSpec:
    try:
        return STAGES[name]
    except KeyError:
        raise Sd2Error(f"unknown stage '{name}'{did_you_mean(name, STAGES)}; valid stages: {', '.join(STAGES)}") from None


def consumed_inputs(spec: StageSpec, config) -> tuple[str, ...]:
    """The inputs this stage reads under this config. A module may narrow its static list with
    ``consumes(config)`` (distill reads the drafter only on-policy; finetune reads the target only
    for online KD), so unrelated upstream changes do not force a rerun."""
    fn = getattr(spec.load(), "consumes", None)
    return tuple(fn(config)) if callable(fn) else spec.consumes
