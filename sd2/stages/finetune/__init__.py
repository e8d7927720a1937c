"""Stage finetune: fine-tune a drafter (dense or pruned) on the distilled data, the sparsity mask held exactly.

SD²'s recovery step: sparse fine-tuning on self-distilled data wins back the acceptance lost to
pruning. The loss is CE on the target's tokens, or a DistillSpec divergence (fkl, rkl, jsd, tvd)
against the target's distribution, from the cached top-k logits or an online target forward, or a
weighted mix of CE and one divergence. User documentation: docs/finetune.md.

The training loop is sd2/train/ (shared by every drafter kind); the drafter kind brings its loss.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationInfo, field_validator, model_validator

from sd2.core.fields import Autocast, added, precision_field


HEADS = {"requires": "feature_level"}   # options only a feature-level head has (sd2.drafters.requires)
LMS = {"requires": "causal_lm"}        # options only a standalone causal LM has


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    loss: Literal["ce", "fkl", "rkl", "jsd", "tvd"] = Field(
        "ce", description="ce: cross-entropy on the target's tokens; fkl/rkl/jsd/tvd: a divergence from the target's distribution")
    ce_weight: float = Field(0.0, ge=0.0, le=1.0, description="with a divergence: the share of CE mixed in "
                             "(loss = ce_weight * CE + (1 - ce_weight) * divergence); leave unset with loss: ce",
                             json_schema_extra=LMS)
    teacher: Literal["topk", "online"] = Field(
        "topk", description="the target's distribution: the distilled data's cached top-k logits (renormalised) "
                            "or an online target forward on every batch (a head always reads the target online)",
        json_schema_extra=LMS)
    temperature: float = Field(1.0, gt=0.0, le=100.0, description="divides teacher and student logits in the divergence")
    jsd_beta: float = Field(0.5, gt=0.0, lt=1.0, description="JSD(beta) mixture weight of the target's distribution")
    lr: float = Field(2e-4, gt=0.0, le=1.0, description="peak AdamW learning rate")
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="AdamW decoupled weight decay")
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0, description="share of the steps spent in linear warm-up")
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="the cosine decays to lr * min_lr_ratio")
    max_grad_norm: float = Field(1.0, ge=0.0, description="gradient clipping norm; 0 disables clipping")
    batch_size: int = Field(8, ge=1, description="conversations per micro-batch, per process")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step (global batch = batch_size x grad_accum x processes)")
    epochs: float = Field(1, gt=0, description="passes over the training split (a fraction allowed); ignored when max_steps is set")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps to run; overrides epochs")
    max_length: int = Field(1024, ge=8, description="a longer conversation keeps its last max_length tokens "
                            "(where the answers are); the start of its prompt is dropped")
    bucket: StrictBool = Field(True, description="length bucketing: batch conversations of similar length, to pad less")
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="share of conversations held out for validation")
    val_rows: int | None = Field(None, ge=0, description="or: exactly this many conversations held out")
    eval_every: int = Field(0, ge=0, description="validate every N steps (0: only at the start and the end)")
    mal_gamma: int = Field(4, ge=1, le=64, description="draft length gamma for the validation's teacher-forced greedy MAL")
    log_every: int = Field(10, ge=1, description="write a training row to metrics.jsonl every N steps")
    checkpoint_every: int = Field(50, ge=0, description="save a resumable checkpoint every N steps (0: never)")
    hold_mask: StrictBool = Field(True, description="keep every zero weight of the decoder's Linear layers at exactly zero "
                                              "(only acts when the model has zeros)")
    freeze_embeddings: StrictBool = Field(False, description="do not train the input embeddings (with tied embeddings "
                                                             "this also freezes lm_head, unless untie_embeddings)",
                                          json_schema_extra=LMS)
    untie_embeddings: StrictBool = Field(False, description="give lm_head its own trainable copy of tied embeddings "
                                                            "(the saved model is then untied: one more V x d matrix)",
                                         json_schema_extra=LMS)
    precision: Autocast = precision_field("training precision")
    # Feature-level heads only (docs/heads.md; sd2 validate refuses them on a causal LM). The logit part
    # is `loss` (ce, or a divergence from the target's distribution: fkl is EAGLE/FSPAD's soft CE).
    feature_weight: float = Field(1.0, ge=0.0, json_schema_extra=HEADS,
                                  description="heads: weight of the SmoothL1 regression onto the target's next feature")
    logit_weight: float = Field(0.1, ge=0.0, json_schema_extra=HEADS,
                                description="heads: weight of the logit loss (`loss`) on the head's output")
    feature_noise: float = Field(0.0, ge=0.0, json_schema_extra=HEADS,
                                 description="heads: uniform noise U(-a, a) added to the input features (EAGLE: 0.1-0.2)")
    unroll: int = Field(0, ge=0, le=8, description="heads: extra passes on the head's own predicted features "
                                                  "(training-time test, as in HASS / EAGLE-3), weighted 0.8^i",
                       json_schema_extra=HEADS)
    ttt_depth: int | None = added(
        None, since="2026-12-02", ge=1, le=16, json_schema_extra=HEADS,
        description="eagle3 heads: the training-time test's depth D, draft steps per anchor, each after the first "
                    "fed the head's own output (unset: 3; EAGLE-3 uses 7; choose by measurement)")
    ttt_decay: float = added(0.8, since="2026-12-02", gt=0.0, le=1.0, json_schema_extra=HEADS,
                             description="eagle3 heads: step i of the training-time test weighs ttt_decay^i (EAGLE-3: 0.8)")
    feature_cache_mb: float | None = Field(
        None, gt=0, description="heads: compute the target's features of every conversation once, store them in the "
                                "run folder (feature_cache/) and train from them, refusing if they need more than this "
                                "many MB of disk (read from it per batch, memory-mapped); unset: computed on the fly every step",
        json_schema_extra=HEADS)
    feature_cache_dtype: Literal["bf16", "fp32"] | None = added(
        None, since="2026-12-03", json_schema_extra=HEADS,
        description="heads, with feature_cache_mb: store the cached features in this dtype (unset: the dtype the "
                    "target's forward gave, fp32 on CPU); bf16 halves the cache. An eagle3 head trained in bf16 "
                    "without feature_noise trains bit-identically from a bf16 cache (its fc rounds them to bf16 "
                    "anyway); other heads regress the features, which are then rounded")

    @field_validator("feature_cache_dtype")
    @classmethod
    def _dtype_needs_the_cache(cls, value, info: ValidationInfo):
        """Reported at feature_cache_dtype (feature_cache_mb is declared before it, so it is in info.data)."""
        if value is not None and not info.data.get("feature_cache_mb"):
            raise ValueError(f"feature_cache_dtype = {value} sets how the feature cache stores the target's features; "
                             "it needs feature_cache_mb (the cache's size cap in MB) set too")
        return value

    @model_validator(mode="after")
    def _check(self) -> "Config":
        if self.loss == "ce" and self.ce_weight not in (0.0, 1.0):
            raise ValueError(f"ce_weight mixes CE into a divergence; with loss: ce it must stay unset, got {self.ce_weight}")
        if self.loss != "ce" and self.ce_weight == 1.0:
            raise ValueError("ce_weight = 1 leaves no divergence; use loss: ce")
        return self


def consumes(config: Config) -> tuple[str, ...]:
    """The target is read only for an online teacher, so other changes to it do not rerun this stage."""
    if config.loss != "ce" and config.teacher == "online":
        return ("model", "dataset", "target")
    return ("model", "dataset")


def run(config: Config, inputs, out_dir: Path, ctx) -> dict:
    import json
    import shutil

    import torch

    from sd2 import drafters
    from sd2.core.context import rank_world
    from sd2.core.errors import Sd2Error
    from sd2.train import checkpoint, loop
    from sd2.train.batches import load_rows, split_rows

    out_dir = Path(out_dir)
    if inputs.model is None or inputs.dataset is None:
        raise Sd2Error("finetune needs a model and a distilled dataset (a distill stage before it)")
    drafters.check("finetune", config, inputs.model.kind)
    drafter = drafters.load(inputs.model, inputs.target)
    tok = drafter.tokenizer
    rows, meta = load_rows(Path(inputs.dataset), tok, drafter.vocab_size, config.max_length,
                           need_topk=drafter.wants_topk(config))
    train_idx, val_idx = split_rows(len(rows), config.val_fraction, config.val_rows, ctx.seed)
    rows_train, rows_val = rows.subset(train_idx), rows.subset(val_idx)
    rank, world = rank_world()
    if len(rows_train) < config.batch_size * config.grad_accum * world:
        raise Sd2Error(f"the training split has {len(rows_train)} conversations, fewer than one global batch "
                       f"({config.batch_size} x {config.grad_accum} x {world} processes); lower finetune.batch_size "
                       "or distill more prompts")
    pad_id = tok.pad_token_id or 0
    task = drafter.training_task(config, rows_train, rows_val, pad_id, inputs.target, ctx)
    config_json = config.model_dump(mode="json") | {"seed": ctx.seed, "world_size": world}
    metrics = loop.train(config, task, rows_train, pad_id, out_dir, ctx, config_json)
    if not metrics.get("mask_exact", True):
        raise Sd2Error(f"finetune broke the sparsity mask: {metrics['mask_violations']} pruned entries are nonzero")

    if rank == 0:
        record = {"config": config.model_dump(mode="json"), "dataset": str(inputs.dataset),
                  "distill": meta, "train_rows": len(rows_train), "val_rows": len(rows_val), "metrics": metrics}
        drafter.save(out_dir, {"finetune.json": json.dumps(record, indent=2, default=float)})
        src = Path(inputs.model.ref) / "sparsity.json"
        if src.is_file():  # the mask is unchanged, so the input's sparsity report still describes the weights
            shutil.copy(src, out_dir / "sparsity.json")
        checkpoint.remove(out_dir)
    if world > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()  # the other processes return once the model is on disk
    return {k: v for k, v in metrics.items() if v is None or isinstance(v, (bool, int, float, str))}
