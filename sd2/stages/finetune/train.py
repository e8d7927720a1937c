"""The training loop: AdamW with warm-up and cosine decay, clipping, accumulation, the mask held
exactly, validation, checkpoints and resume, under accelerate.

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


def train(cfg, model, rows_train: Rows, rows_val: Rows, pad_id: int, out_dir: Path, ctx, objective: Objective,
          config_json: dict, teacher_model=None, on_step=None) -> dict:
    """Train ``model`` in place; returns the final metrics. ``on_step(step)`` is called after each
    completed optimizer step (and its checkpoint), on every process."""
    import numpy as np

    accelerator, precision = make_accelerator(cfg.precision, ctx.device)
    main, world, rank = accelerator.is_main_process, accelerator.num_processes, accelerator.process_index
    torch.manual_seed(ctx.seed)
    random.seed(ctx.seed)
    np.random.seed(ctx.seed)

    mask = SparsityMask.from_model(model) if cfg.hold_mask else SparsityMask({})
    wrapped = accelerator.prepare(LogitsAtPositions(model))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_adamw(params, cfg.lr, cfg.weight_decay)

    global_batch = cfg.batch_size * cfg.grad_accum * world
    per_epoch = len(rows_train) // global_batch
    total = cfg.max_steps if cfg.max_steps is not None else max(1, int(round(cfg.epochs * per_epoch)))
    warmup = int(round(cfg.warmup_ratio * total))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup, total, cfg.min_lr_ratio))

    if teacher_model is not None:
        teacher_model.to(accelerator.device).eval()
        t_wrap = LogitsAtPositions(teacher_model)

        def teacher_forward(batch):
            with torch.no_grad():
                b = _to(batch, accelerator.device)
                return t_wrap(b["input_ids"], b["attention_mask"], b["labels"] != IGNORE)
        objective.teacher_forward = teacher_forward

    def student_forward(batch, module=wrapped):
        b = _to(batch, accelerator.device)
        return module(b["input_ids"], b["attention_mask"], b["labels"] != IGNORE)

    def run_validation(step: int) -> dict:
        if not len(rows_val):
            return {}
        out = {}
        if main:
            model.eval()
            bare = accelerator.unwrap_model(wrapped)  # no DDP collectives in an eval-only forward
            with accelerator.autocast():
                out = validate(lambda b: student_forward(b, bare), objective.sums, rows_val, cfg.batch_size, pad_id,
                               cfg.mal_gamma, objective.draft_to_target, objective.ce_weight, objective.kd_weight)
            model.train()
            ctx.log_metrics(step=step, **out)
            ctx.log.info("step %d: val_loss %.4f, val_top1 %.4f, val_mal %.4f", step, out["val_loss"],
                         out["val_top1"], out["val_mal"])
        accelerator.wait_for_everyone()
        return out

    step = 0
    found = checkpoint.find(out_dir)
    if found is not None:
        state = checkpoint.load(found, accelerator, wrapped, optimizer, scheduler, config_json)
        step = state["step"]
        ctx.log.info("resumed from %s at step %d of %d", found, step, total)
    if step == 0:
        run_validation(0)

    model.train()
    bar = ctx.progress(total=total, initial=step, desc="finetune", unit="step", disable=not main)
    train_seconds, mask_seconds, tokens_seen, last_val, order, order_epoch = 0.0, 0.0, 0, {}, None, -1
    while step < total:
        started = time.perf_counter()
        epoch, index = divmod(step, per_epoch)
        if epoch != order_epoch:
            order, order_epoch = epoch_batches([len(r) for r in rows_train.input_ids], global_batch, ctx.seed, epoch,
                                               cfg.bucket), epoch
        micro = [collate(rows_train, micro_rows(order[index], m, rank, world, cfg.batch_size), pad_id)
                 for m in range(cfg.grad_accum)]
        local = [objective.counts(b) for b in micro]
        n_ce, n_kd = global_sum(accelerator, sum(c for c, _ in local), sum(k for _, k in local))
        sums = torch.zeros(3, dtype=torch.float64)
        for m, batch in enumerate(micro):
            sync = contextlib.nullcontext() if m == cfg.grad_accum - 1 else accelerator.no_sync(wrapped)
            with sync:
                ce_sum, _, kd_sum, _ = objective.sums(batch, student_forward(batch))
                loss = (objective.ce_weight * ce_sum / max(n_ce, 1) + objective.kd_weight * kd_sum / max(n_kd, 1)) * world
                accelerator.backward(loss)
            sums += torch.tensor([ce_sum.item(), kd_sum.item(), float(batch["attention_mask"].sum())], dtype=torch.float64)
        t_mask = time.perf_counter()
        mask.mask_grads()
        mask_seconds += time.perf_counter() - t_mask
        if cfg.max_grad_norm:
            accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        ce_tot, kd_tot, toks = global_sum(accelerator, *sums.tolist())
        ce_mean, kd_mean = ce_tot / max(n_ce, 1), kd_tot / max(n_kd, 1)
        loss_value = objective.ce_weight * ce_mean + objective.kd_weight * kd_mean
        train_seconds += time.perf_counter() - started
        tokens_seen += int(toks)
        tok_s = tokens_seen / train_seconds if train_seconds else 0.0
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tok_s:.0f}")
        if main and (step % cfg.log_every == 0 or step == total):
            ctx.log_metrics(step=step, epoch=epoch, loss=loss_value, ce=ce_mean if n_ce else None,
                            kd=kd_mean if n_kd else None, lr=scheduler.get_last_lr()[0], tokens_per_s=tok_s)
        if cfg.eval_every and step % cfg.eval_every == 0 and step < total:
            last_val = run_validation(step)
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total:
            held = mask.verify(optimizer)   # never checkpoint a broken mask: fail at the first checkpoint
            if not held["mask_exact"]:
                from sd2.core.errors import Sd2Error
                raise Sd2Error(f"finetune broke the sparsity mask at step {step}: "
                               f"{held['mask_violations']} pruned entries are nonzero")
            checkpoint.save(out_dir, accelerator, wrapped, optimizer, scheduler, step,
                            {"epoch": epoch, "batch": index + 1}, config_json)
        if on_step is not None:
            on_step(step)
    bar.close()

    last_val = run_validation(step) if total else last_val
    metrics = {"steps": step, "total_steps": total, "epochs": round(step / per_epoch, 3) if per_epoch else 0.0,
               "global_batch": global_batch, "world_size": world, "precision": precision,
               "tokens_per_s": round(tokens_seen / train_seconds, 2) if train_seconds else None,
               "train_seconds": round(train_seconds, 3), "mask_seconds": round(mask_seconds, 3),
               "masked_weights": mask.pruned, "mask_held": bool(mask),
               **mask.verify(optimizer), **{k: v for k, v in last_val.items()}}
    accelerator.wait_for_everyone()
    return metrics
