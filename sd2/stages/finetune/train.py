"""The training loop: AdamW with warm-up and cosine decay, clipping, accumulation, the mask held
exactly, validation, checkpoints and resume, under accelerate.

Its pieces stand apart so other trainers (e.g. feature heads) can reuse them: ``Schedule`` (steps),
``Batches`` (data iteration by step), ``Trainer.step`` (one optimizer step), ``Trainer.validate``,
``Trainer.save`` / ``Trainer.resume`` (checkpoints); ``train`` strings them together.

Loss normalisation: every micro-batch's summed token losses are divided by the token count of the
whole global batch (all micro-batches of all processes, one small all-reduce per step before the
forward passes), and multiplied by the world size to undo DDP's gradient averaging. So the
gradient is that of the mean token loss over the global batch, whatever the split into processes
and micro-batches, and 2 processes reproduce 1 process with the same global batch.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint
from .batches import Rows, collate, epoch_batches, micro_rows
from .distributed import LogitsAtPositions, global_sum, make_accelerator
from .evaluation import validate
from .losses import IGNORE, cross_entropy, divergence, map_labels, teacher_from_logits, teacher_from_topk
from .mask import SparsityMask


def make_adamw(params: list, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """torch's AdamW, fused (one kernel per tensor) wherever every parameter is a float tensor on CPU or CUDA.

    Measured on a 2-core CPU (torch 2.13; benchmarks/finetune_throughput.py): the default foreach
    AdamW spends most of a sparse model's step in ``exp_avg_sq.sqrt()``, because torch's vectorised
    CPU sqrt runs ~3.6x slower on a tensor that is half exact zeros, which is exactly what a held
    mask leaves in the optimizer state. That made mask-held training 0.86x as fast as plain training,
    though the mask's own pass is 2% of a step. The fused kernel does one pass per element with no
    such slow path: its step took 13 ms on 24 SmolLM2-sized matrices, with or without zeros, against
    37 ms (no zeros) and 94 ms (half zeros) for foreach. The arithmetic is AdamW's, so pruned
    positions stay exactly zero (mask.py)."""
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999), fused=fused or None)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class Objective:
    """ce_weight * CE + kd_weight * divergence, as token-loss sums and counts."""

    kd: str | None                  # fkl, rkl, jsd, tvd, or None for CE only
    ce_weight: float
    kd_weight: float
    temperature: float
    beta: float
    teacher: str                    # "topk" or "online"
    teacher_forward: object = None  # online: batch -> target logits at the label positions
    draft_to_target: torch.Tensor | None = None
    target_to_draft: torch.Tensor | None = None

    def counts(self, batch: dict) -> tuple[int, int]:
        """(CE tokens, KD tokens) of a batch, known before the forward pass."""
        positions = batch["labels"] != IGNORE
        ce_n = int((map_labels(batch["labels"][positions], self.target_to_draft) != IGNORE).sum()) if self.ce_weight else 0
        if not (self.kd and self.kd_weight):
            return ce_n, 0
        if self.teacher == "online":
            return ce_n, int(positions.sum())
        return ce_n, int(self._topk_teacher(batch, positions).rows_with_support().sum())

    def _topk_teacher(self, batch: dict, positions: torch.Tensor):
        return teacher_from_topk(batch["topk_ids"][positions], batch["topk_logits"][positions], self.temperature,
                                 self.target_to_draft)

    def sums(self, batch: dict, logits: torch.Tensor) -> tuple[torch.Tensor, int, torch.Tensor, int]:
        """(CE sum, CE count, KD sum, KD count) for the logits at the batch's label positions."""
        device = logits.device
        positions = batch["labels"] != IGNORE
        zero = logits.sum() * 0.0
        ce_sum, ce_n, kd_sum, kd_n = zero, 0, zero, 0
        if self.ce_weight:
            labels = map_labels(batch["labels"][positions], self.target_to_draft).to(device)
            ce_sum, ce_n = cross_entropy(logits, labels).sum(), int((labels != IGNORE).sum())
        if self.kd and self.kd_weight:
            if self.teacher == "online":
                teacher = teacher_from_logits(self.teacher_forward(batch), self.temperature, self.draft_to_target)
            else:
                teacher = self._topk_teacher(batch, positions)
            teacher.logp = teacher.logp.to(device)
            teacher.ids = teacher.ids.to(device) if teacher.ids is not None else None
            per_pos = divergence(self.kd, logits, teacher, self.temperature, self.beta)
            has = teacher.rows_with_support()
            kd_sum, kd_n = per_pos[has].sum(), int(has.sum())
        return ce_sum, ce_n, kd_sum, kd_n


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def seed_everything(seed: int) -> None:
    import numpy as np

    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


@dataclass
class Schedule:
    """How many optimizer steps a run takes and how the data maps onto them."""

    global_batch: int     # rows per optimizer step, over all micro-batches and processes
    per_epoch: int        # optimizer steps per epoch (a last partial global batch is dropped)
    total: int
    warmup: int

    @classmethod
    def of(cls, cfg, n_rows: int, world: int) -> "Schedule":
        global_batch = cfg.batch_size * cfg.grad_accum * world
        per_epoch = n_rows // global_batch
        total = cfg.max_steps if cfg.max_steps is not None else max(1, int(round(cfg.epochs * per_epoch)))
        return cls(global_batch, per_epoch, total, int(round(cfg.warmup_ratio * total)))


class Batches:
    """Data iteration: this process's micro-batches for an optimizer step. The order is a pure
    function of (seed, epoch), so a step number names its batches exactly, which is what resuming
    from a checkpoint relies on."""

    def __init__(self, rows: Rows, schedule: Schedule, cfg, seed: int, pad_id: int, rank: int, world: int):
        self.rows, self.schedule, self.cfg, self.seed, self.pad_id = rows, schedule, cfg, seed, pad_id
        self.rank, self.world = rank, world
        self._order, self._epoch = None, -1

    def at(self, step: int) -> tuple[int, int, list[dict]]:
        """(epoch, index within the epoch, the grad_accum micro-batches) of optimizer step ``step``."""
        epoch, index = divmod(step, self.schedule.per_epoch)
        if epoch != self._epoch:
            self._order = epoch_batches([len(r) for r in self.rows.input_ids], self.schedule.global_batch,
                                        self.seed, epoch, self.cfg.bucket)
            self._epoch = epoch
        micro = [collate(self.rows, micro_rows(self._order[index], m, self.rank, self.world, self.cfg.batch_size),
                         self.pad_id) for m in range(self.cfg.grad_accum)]
        return epoch, index, micro


@dataclass
class StepResult:
    loss: float                 # the objective's value over the global batch
    ce: float | None            # mean CE over the global batch (None without CE tokens)
    kd: float | None
    tokens: int                 # tokens in the global batch (attention mask)
    mask_seconds: float


class Trainer:
    """The pieces of a training run, usable apart: ``step`` (one optimizer step over micro-batches,
    the mask held), ``validate``, ``save`` and ``resume`` (checkpoints). ``train`` strings them
    together. Builds the accelerator, the held mask, AdamW and the warm-up/cosine schedule."""

    def __init__(self, cfg, model, objective: Objective, ctx, n_train_rows: int, teacher_model=None):
        self.cfg, self.model, self.objective, self.ctx = cfg, model, objective, ctx
        self.accelerator, self.precision = make_accelerator(cfg.precision, ctx.device)
        acc = self.accelerator
        self.main, self.world, self.rank = acc.is_main_process, acc.num_processes, acc.process_index
        seed_everything(ctx.seed)
        self.mask = SparsityMask.from_model(model) if cfg.hold_mask else SparsityMask({})
        self.wrapped = acc.prepare(LogitsAtPositions(model))
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = make_adamw(self.params, cfg.lr, cfg.weight_decay)
        self.schedule = sched = Schedule.of(cfg, n_train_rows, self.world)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, sched.warmup, sched.total, cfg.min_lr_ratio))
        if teacher_model is not None:
            teacher_model.to(acc.device).eval()
            t_wrap = LogitsAtPositions(teacher_model)

            def teacher_forward(batch):
                with torch.no_grad():
                    b = _to(batch, acc.device)
                    return t_wrap(b["input_ids"], b["attention_mask"], b["labels"] != IGNORE)
            objective.teacher_forward = teacher_forward

    def forward(self, batch: dict, module=None) -> torch.Tensor:
        """The student's logits at the batch's label positions ([N, V'])."""
        b = _to(batch, self.accelerator.device)
        return (module or self.wrapped)(b["input_ids"], b["attention_mask"], b["labels"] != IGNORE)

    def step(self, micro: list[dict]) -> StepResult:
        """One optimizer step: forward and backward over the micro-batches (gradients synced on the
        last), the mask applied to the gradients, clipping, AdamW, the schedule."""
        acc, obj, world = self.accelerator, self.objective, self.world
        local = [obj.counts(b) for b in micro]
        n_ce, n_kd = global_sum(acc, sum(c for c, _ in local), sum(k for _, k in local))
        sums = torch.zeros(3, dtype=torch.float64)
        for m, batch in enumerate(micro):
            sync = contextlib.nullcontext() if m == len(micro) - 1 else acc.no_sync(self.wrapped)
            with sync:
                ce_sum, _, kd_sum, _ = obj.sums(batch, self.forward(batch))
                loss = (obj.ce_weight * ce_sum / max(n_ce, 1) + obj.kd_weight * kd_sum / max(n_kd, 1)) * world
                acc.backward(loss)
            sums += torch.tensor([ce_sum.item(), kd_sum.item(), float(batch["attention_mask"].sum())],
                                 dtype=torch.float64)
        t_mask = time.perf_counter()
        self.mask.mask_grads()
        mask_seconds = time.perf_counter() - t_mask
        if self.cfg.max_grad_norm:
            acc.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        ce_tot, kd_tot, toks = global_sum(acc, *sums.tolist())
        ce_mean, kd_mean = ce_tot / max(n_ce, 1), kd_tot / max(n_kd, 1)
        return StepResult(obj.ce_weight * ce_mean + obj.kd_weight * kd_mean, ce_mean if n_ce else None,
                          kd_mean if n_kd else None, int(toks), mask_seconds)

    def validate(self, rows_val: Rows, pad_id: int, step: int) -> dict:
        """Validation metrics (evaluation.validate) on the main process; {} without validation rows."""
        if not len(rows_val):
            return {}
        out = {}
        if self.main:
            self.model.eval()
            bare = self.accelerator.unwrap_model(self.wrapped)  # no DDP collectives in an eval-only forward
            obj = self.objective
            with self.accelerator.autocast():
                out = validate(lambda b: self.forward(b, bare), obj.sums, rows_val, self.cfg.batch_size, pad_id,
                               self.cfg.mal_gamma, obj.draft_to_target, obj.ce_weight, obj.kd_weight)
            self.model.train()
            self.ctx.log_metrics(step=step, **out)
            self.ctx.log.info("step %d: val_loss %.4f, val_top1 %.4f, val_mal %.4f", step, out["val_loss"],
                              out["val_top1"], out["val_mal"])
        self.accelerator.wait_for_everyone()
        return out

    def resume(self, out_dir: Path, config_json: dict) -> int:
        """The step to start from: that of the checkpoint in ``out_dir`` (loaded), else 0."""
        found = checkpoint.find(out_dir)
        if found is None:
            return 0
        state = checkpoint.load(found, self.accelerator, self.wrapped, self.optimizer, self.scheduler, config_json)
        self.ctx.log.info("resumed from %s at step %d of %d", found, state["step"], self.schedule.total)
        return state["step"]

    def save(self, out_dir: Path, step: int, position: dict, config_json: dict) -> None:
        """Checkpoint after ``step``; refuses (Sd2Error) when the mask no longer holds, so a broken
        mask fails at the first checkpoint instead of being saved."""
        held = self.mask.verify(self.optimizer)
        if not held["mask_exact"]:
            from sd2.core.errors import Sd2Error
            raise Sd2Error(f"finetune broke the sparsity mask at step {step}: "
                           f"{held['mask_violations']} pruned entries are nonzero")
        checkpoint.save(out_dir, self.accelerator, self.wrapped, self.optimizer, self.scheduler, step, position,
                        config_json)


def train(cfg, model, rows_train: Rows, rows_val: Rows, pad_id: int, out_dir: Path, ctx, objective: Objective,
          config_json: dict, teacher_model=None, on_step=None) -> dict:
    """Train ``model`` in place; returns the final metrics. ``on_step(step)`` is called after each
    completed optimizer step (and its checkpoint), on every process."""
    t = Trainer(cfg, model, objective, ctx, len(rows_train), teacher_model)
    sched = t.schedule
    batches = Batches(rows_train, sched, cfg, ctx.seed, pad_id, t.rank, t.world)
    step = t.resume(out_dir, config_json)
    if step == 0:
        t.validate(rows_val, pad_id, 0)

    model.train()
    bar = ctx.progress(total=sched.total, initial=step, desc="finetune", unit="step", disable=not t.main)
    train_seconds, mask_seconds, tokens_seen, last_val = 0.0, 0.0, 0, {}
    while step < sched.total:
        started = time.perf_counter()
        epoch, index, micro = batches.at(step)
        res = t.step(micro)
        step += 1
        train_seconds += time.perf_counter() - started
        mask_seconds += res.mask_seconds
        tokens_seen += res.tokens
        tok_s = tokens_seen / train_seconds if train_seconds else 0.0
        bar.update(1)
        bar.set_postfix(loss=f"{res.loss:.4f}", tok_s=f"{tok_s:.0f}")
        if t.main and (step % cfg.log_every == 0 or step == sched.total):
            ctx.log_metrics(step=step, epoch=epoch, loss=res.loss, ce=res.ce, kd=res.kd,
                            lr=t.scheduler.get_last_lr()[0], tokens_per_s=tok_s)
        if cfg.eval_every and step % cfg.eval_every == 0 and step < sched.total:
            last_val = t.validate(rows_val, pad_id, step)
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < sched.total:
            t.save(out_dir, step, {"epoch": epoch, "batch": index + 1}, config_json)
        if on_step is not None:
            on_step(step)
    bar.close()

    last_val = t.validate(rows_val, pad_id, step) if sched.total else last_val
    metrics = {"steps": step, "total_steps": sched.total,
               "epochs": round(step / sched.per_epoch, 3) if sched.per_epoch else 0.0,
               "global_batch": sched.global_batch, "world_size": t.world, "precision": t.precision,
               "tokens_per_s": round(tokens_seen / train_seconds, 2) if train_seconds else None,
               "train_seconds": round(train_seconds, 3), "mask_seconds": round(mask_seconds, 3),
               "masked_weights": t.mask.pruned, "mask_held": bool(t.mask),
               **t.mask.verify(t.optimizer), **last_val}
    t.accelerator.wait_for_everyone()
    return metrics
