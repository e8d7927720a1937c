"""The one training loop, for every drafter kind: AdamW with warm-up and cosine decay, clipping,
accumulation, the mask held exactly, validation, checkpoints and resume, under accelerate.

A drafter kind plugs in a ``Task`` (its loss and where its inputs come from): a standalone causal
LM's is ``sd2.drafters.lm_train.LMTask`` (CE / KD on its logits), a feature-level head's is
``sd2.heads.train.HeadTask`` (feature regression + logit loss on the target's features). The loop
owns everything else, so both kinds resume bit-identically, hold the mask and run under DDP or
FSDP2 the same way (under FSDP the optimizer trains a sharded copy of the task's module and the
weights are gathered back into it to validate and at the end: sd2/train/fsdp.py).

Loss normalisation: each of the task's loss terms sums its token losses over a micro-batch; every
sum is divided by that term's token count over the whole global batch (all micro-batches of all
processes, one small all-reduce per step before the forward passes) and multiplied by the world
size to undo DDP's gradient averaging. So the gradient is that of the mean token loss over the
global batch, whatever the split into processes and micro-batches, and 2 processes reproduce 1
process with the same global batch.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from sd2.train import checkpoint, fsdp
from sd2.train.batches import Rows, collate, epoch_batches, micro_rows
from sd2.train.distributed import global_sum, make_accelerator
from sd2.train.mask import SparsityMask


class Task(Protocol):
    """What a drafter kind gives the loop. ``module`` is what accelerate wraps (DDP), or, under FSDP,
    what a sharded copy of it is made from: its trainable parameters are trained and checkpointed.
    ``shared``: frozen objects ``module`` refers to that the FSDP copy must share, not copy (a
    head's target). ``terms`` names the loss terms and ``weights`` weighs them
    (loss = sum_i weights[i] * mean_i)."""

    name: str                       # the progress bar's label, e.g. "finetune"
    module: torch.nn.Module
    shared: tuple
    mask: SparsityMask
    terms: tuple[str, ...]
    weights: tuple[float, ...]

    def prepare(self, accelerator, out_dir: Path, ctx) -> None:
        """Called once the accelerator exists (move frozen models, build feature sources)."""

    def counts(self, rows: list[int], batch: dict) -> tuple[int, ...]:
        """Tokens each term averages over in this micro-batch, known before the forward pass."""

    def sums(self, module, rows: list[int], batch: dict) -> tuple[torch.Tensor, ...]:
        """Each term's summed token loss on one micro-batch (``batch`` on the accelerator's device;
        ``rows`` are its row indices in the training split)."""

    def validate(self, module, step: int) -> dict:
        """Validation metrics (``val_*``), ``module`` unwrapped and in eval mode: on the main process,
        or under FSDP on every process alike (a sharded target's forwards are collectives)."""


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


def _step(acc, task: Task, wrapped, micro: list[tuple[list[int], dict]], optimizer, scheduler, params, cfg):
    """One optimizer step: forward and backward over the micro-batches (gradients synced on the last),
    the mask applied to the gradients, clipping, AdamW, the schedule. Returns (loss, {term: mean or
    None}, tokens in the global batch, seconds the mask took)."""
    local = [task.counts(rows, b) for rows, b in micro]
    counts = global_sum(acc, *(sum(c[i] for c in local) for i in range(len(task.terms))))
    sums = torch.zeros(len(task.terms) + 1, dtype=torch.float64)
    for m, (rows, batch) in enumerate(micro):
        with contextlib.nullcontext() if m == len(micro) - 1 else acc.no_sync(wrapped):
            term_sums = task.sums(wrapped, rows, {k: v.to(acc.device) for k, v in batch.items()})
            acc.backward(sum(w * s / max(n, 1) for w, s, n in zip(task.weights, term_sums, counts)) * acc.num_processes)
        sums += torch.tensor([s.item() for s in term_sums] + [float(batch["attention_mask"].sum())],
                             dtype=torch.float64)
    t_mask = time.perf_counter()
    task.mask.mask_grads()
    mask_seconds = time.perf_counter() - t_mask
    if cfg.max_grad_norm:
        acc.clip_grad_norm_(params, cfg.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    *totals, toks = global_sum(acc, *sums.tolist())
    means = [t / max(n, 1) for t, n in zip(totals, counts)]
    return (sum(w * x for w, x in zip(task.weights, means)),
            {name: (x if n else None) for name, x, n in zip(task.terms, means, counts)}, int(toks), mask_seconds)


def train(cfg, task: Task, rows_train: Rows, pad_id: int, out_dir: Path, ctx, config_json: dict, on_step=None) -> dict:
    """Train ``task.module`` in place; returns the final metrics. ``cfg`` is finetune's Config.
    ``on_step(step)`` is called after each completed optimizer step (and its checkpoint), on every process."""
    acc, precision = make_accelerator(cfg.precision, ctx.device)
    main, world, rank = acc.is_main_process, acc.num_processes, acc.process_index
    seed_everything(ctx.seed)
    task.prepare(acc, Path(out_dir), ctx)
    sharded = fsdp.active(acc)
    if sharded:   # the plain module validates on the accelerator's device, as a DDP-prepared one would
        task.module.to(acc.device)
    trained = fsdp.trained_copy(task.module, task.shared) if sharded else task.module
    if sharded:
        fsdp.fresh_wrap_policy(acc)
    wrapped = acc.prepare(trained)   # FSDP2 shards ``trained`` in place
    if sharded:
        task.mask.rebind(task.module, trained)
    params = [p for p in trained.parameters() if p.requires_grad]
    optimizer = make_adamw(params, cfg.lr, cfg.weight_decay)
    sched = Schedule.of(cfg, len(rows_train), world)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, sched.warmup, sched.total, cfg.min_lr_ratio))
    orders: dict[int, list] = {}   # the batch order is a pure function of (seed, epoch): a step names its batches

    def micro_batches(step: int):
        epoch, index = divmod(step, sched.per_epoch)
        if epoch not in orders:
            orders.clear()
            orders[epoch] = epoch_batches([len(r) for r in rows_train.input_ids], sched.global_batch, ctx.seed, epoch,
                                          cfg.bucket)
        idx = [micro_rows(orders[epoch][index], m, rank, world, cfg.batch_size) for m in range(cfg.grad_accum)]
        return epoch, index, [(i, collate(rows_train, i, pad_id)) for i in idx]

    def mask_held() -> dict:
        held = task.mask.verify(optimizer)
        if not sharded:
            return held
        bad = int(global_sum(acc, held["mask_violations"])[0])   # each process checked its shards
        return {"mask_exact": bad == 0, "mask_violations": bad}

    def validate(step: int) -> dict:
        out = {}
        if sharded:
            fsdp.pull_full_state(wrapped, task.module)
        if main or sharded:
            task.module.eval()
            out = task.validate(task.module if sharded else acc.unwrap_model(wrapped), step)
            task.module.train()
        if main and out:
            ctx.log_metrics(step=step, **out)
            shown = ", ".join(f"{k} {v:.4f}" for k, v in out.items() if isinstance(v, float))
            ctx.log.info("step %d: %s", step, shown)
        acc.wait_for_everyone()
        return out

    step, found = 0, checkpoint.find(out_dir)
    if found is not None:
        step = checkpoint.load(found, acc, wrapped, optimizer, scheduler, config_json)["step"]
        ctx.log.info("resumed from %s at step %d of %d", found, step, sched.total)
    last_val = validate(0) if step == 0 else {}
    task.module.train()
    trained.train()
    bar = ctx.progress(total=sched.total, initial=step, desc=task.name, unit="step", disable=not main)
    train_seconds, train_cpu, mask_seconds, tokens_seen = 0.0, 0.0, 0.0, 0
    while step < sched.total:
        started, started_cpu = time.perf_counter(), time.process_time()
        epoch, index, micro = micro_batches(step)
        loss, terms, tokens, mask_s = _step(acc, task, wrapped, micro, optimizer, scheduler, params, cfg)
        step += 1
        train_seconds += time.perf_counter() - started
        train_cpu += time.process_time() - started_cpu
        mask_seconds += mask_s
        tokens_seen += tokens
        tok_s = tokens_seen / train_seconds if train_seconds else 0.0
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:.0f}")
        if main and (step % cfg.log_every == 0 or step == sched.total):
            ctx.log_metrics(step=step, epoch=epoch, loss=loss, **terms, lr=scheduler.get_last_lr()[0],
                            tokens_per_s=tok_s)
        if cfg.eval_every and step % cfg.eval_every == 0 and step < sched.total:
            last_val = validate(step)
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < sched.total:
            held = mask_held()   # a broken mask fails at the first checkpoint, not saved
            if not held["mask_exact"]:
                from sd2.core.errors import Sd2Error
                raise Sd2Error(f"finetune broke the sparsity mask at step {step}: "
                               f"{held['mask_violations']} pruned entries are nonzero")
            checkpoint.save(out_dir, acc, wrapped, optimizer, scheduler, step, {"epoch": epoch, "batch": index + 1},
                            config_json)
        if on_step is not None:
            on_step(step)
    bar.close()
    if sched.total:
        last_val = validate(step) or last_val
    elif sharded:
        fsdp.pull_full_state(wrapped, task.module)
    task.module.eval()
    metrics = {"steps": step, "total_steps": sched.total,
               "epochs": round(step / sched.per_epoch, 3) if sched.per_epoch else 0.0,
               "global_batch": sched.global_batch, "world_size": world, "precision": precision, "fsdp": sharded,
               # decoder layers of a frozen target (a head's, an online teacher) sharded under FSDP
               "target_layers_sharded": getattr(task, "target_layers_sharded", 0),
               "tokens_per_s": round(tokens_seen / train_seconds, 2) if train_seconds else None,
               "train_seconds": round(train_seconds, 3),
               # process CPU time of the steps: on a shared machine, tokens / CPU-second is the steadier measure
               "train_cpu_seconds": round(train_cpu, 3), "mask_seconds": round(mask_seconds, 3),
               "masked_weights": task.mask.pruned, "mask_held": bool(task.mask), **mask_held(),
               **last_val}
    acc.wait_for_everyone()
    return metrics
