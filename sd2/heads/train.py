"""Training a head on the distilled data, the target's features computed batch by batch.

Invoked by the finetune stage when its input model is a head folder (so a branch reads
``- finetune: {...}`` for heads and causal LMs alike). It reuses finetune's machinery: the rows,
split and batch order (batches.py), AdamW and the schedule (train.py), the mask held exactly
(mask.py), checkpoint/resume (checkpoint.py) and accelerate (distributed.py).

Loss at every response position (docs/heads.md):
  feature_weight * SmoothL1(predicted f_{t+1}, f_{t+1})  +  logit_weight * L_logits,
where L_logits is CE on the target's token (``loss: ce``) or a divergence from the target's
distribution softmax(lm_head(f_{t+1})) (``loss: fkl`` is the soft cross-entropy of EAGLE/FSPAD, up
to the target's entropy). Options: uniform noise U(-a, a) on the input features (EAGLE), and
``unroll`` extra passes that feed the head its own predicted features (a training-time test, as in
HASS and EAGLE-3), weighted 0.8^i.
"""

from __future__ import annotations

import contextlib
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sd2.heads.features import chain_rounds, head_inputs, target_features
from sd2.heads.model import Head
from sd2.mal import MalStats
from sd2.stages.finetune import checkpoint
from sd2.stages.finetune.batches import Rows, collate, epoch_batches, micro_rows
from sd2.stages.finetune.distributed import global_sum, make_accelerator
from sd2.stages.finetune.losses import IGNORE, cross_entropy, divergence, map_labels, teacher_from_logits
from sd2.stages.finetune.mask import SparsityMask
from sd2.stages.finetune.train import lr_factor, make_adamw


def head_mask(head: Head) -> SparsityMask:
    """The zeros of every head Linear layer (fc, feature sampling, decoder layers) to hold."""
    return SparsityMask({name: mod.weight for name, mod in head.linears()
                         if mod.weight.requires_grad and bool((mod.weight.detach() == 0).any())})


class HeadLoss(torch.nn.Module):
    """forward(batch) -> (feature-loss sum, logit-loss sum, positions) over one micro-batch.
    Wrapped by accelerate (DDP), so it holds the head and the frozen target."""

    def __init__(self, head: Head, target, cfg, t2d):
        super().__init__()
        self.head = head
        object.__setattr__(self, "target", target)   # frozen, not part of the trained module
        self.cfg = cfg
        self.t2d = t2d

    def forward(self, input_ids, attention_mask, labels):
        cfg, head = self.cfg, self.head
        feats = target_features(self.target, input_ids, attention_mask)
        ids_h, feats_in, pos = head_inputs(input_ids, feats)
        where = labels[:, 1:] != IGNORE                     # head position t predicts x_{t+2}
        want_f = feats[:, 1:][where]
        teacher = None
        if cfg.loss != "ce":
            with torch.no_grad():
                teacher = teacher_from_logits(self.target.get_output_embeddings()(want_f), cfg.temperature, head.d2t)
        f_sum = l_sum = feats.new_zeros(())
        inputs = feats_in
        for i in range(1 + cfg.unroll):
            hl, hf = head(ids_h, inputs, pos, feature_noise=cfg.feature_noise if i == 0 else 0.0)
            w = 0.8 ** i
            f_sum = f_sum + w * F.smooth_l1_loss(hf[where], want_f, reduction="none").mean(-1).sum()
            logits = head.logits(hl[where])
            if cfg.loss == "ce":
                lab = map_labels(labels[:, 1:][where], self.t2d)
                l_sum = l_sum + w * cross_entropy(logits, lab).sum()
            else:
                l_sum = l_sum + w * divergence(cfg.loss, logits, teacher, cfg.temperature, cfg.jsd_beta).sum()
            # next pass: position t reads the head's own prediction of f_t (made at position t-1)
            inputs = torch.cat([feats_in[:, :1], hf[:, :-1]], dim=1)
        return f_sum, l_sum, int(where.sum())


@torch.no_grad()
def validate_head(head: Head, target, rows: Rows, batch_size: int, pad_id: int, gamma: int) -> dict:
    """Teacher-forced top-1 and the exact chain MAL (``features.chain_rounds``) on held-out rows."""
    stats = MalStats()
    matched = counted = 0
    for s in range(0, len(rows), batch_size):
        idx = list(range(s, min(s + batch_size, len(rows))))
        batch = collate(rows, idx, pad_id)
        feats = target_features(target, batch["input_ids"], batch["attention_mask"])
        for r, i in enumerate(idx):
            ids = rows.input_ids[i]
            mask = rows.loss_mask[i]
            spans = _spans(mask)
            if not spans:
                continue
            per = chain_rounds(head, ids, feats[r, : len(ids)], spans, gamma)
            for rounds in per:
                stats.add_request(rounds, rows.category[i])
                matched += sum(1 for rd in rounds if rd.accepted > 0)
                counted += len(rounds)
    summary = stats.summary(gamma)
    return {"val_mal": summary["mal"], "val_acceptance_rate": summary["acceptance_rate"],
            "val_acceptance_1": summary["acceptance_per_position"][0] if summary["acceptance_per_position"] else None,
            "val_tokens": summary["tokens"]}


def _spans(loss_mask: list[int]) -> list[tuple[int, int]]:
    """Contiguous runs of response tokens (a, b), a >= 1."""
    out, a = [], None
    for j, m in enumerate(loss_mask + [0]):
        if m and a is None:
            a = max(j, 1)
        elif not m and a is not None:
            if j > a:
                out.append((a, j))
            a = None
    return out


def train_head(cfg, head: Head, target, rows_train: Rows, rows_val: Rows, pad_id: int, out_dir: Path, ctx,
               config_json: dict, t2d=None) -> dict:
    """Train ``head`` in place against the frozen ``target``; returns the final metrics."""
    import numpy as np

    accelerator, precision = make_accelerator(cfg.precision, ctx.device)
    main, world, rank = accelerator.is_main_process, accelerator.num_processes, accelerator.process_index
    torch.manual_seed(ctx.seed)
    random.seed(ctx.seed)
    np.random.seed(ctx.seed)
    target.to(accelerator.device).eval()
    for p in target.parameters():
        p.requires_grad_(False)

    mask = head_mask(head) if cfg.hold_mask else SparsityMask({})
    loss_mod = HeadLoss(head, target, cfg, t2d)
    wrapped = accelerator.prepare(loss_mod)
    params = [p for p in head.parameters() if p.requires_grad]
    optimizer = make_adamw(params, cfg.lr, cfg.weight_decay)
    global_batch = cfg.batch_size * cfg.grad_accum * world
    per_epoch = len(rows_train) // global_batch
    total = cfg.max_steps if cfg.max_steps is not None else max(1, int(round(cfg.epochs * per_epoch)))
    warmup = int(round(cfg.warmup_ratio * total))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, total, cfg.min_lr_ratio))

    def run_validation(step: int) -> dict:
        out = {}
        if main and len(rows_val):
            head.eval()
            out = validate_head(head, target, rows_val, cfg.batch_size, pad_id, cfg.mal_gamma)
            head.train()
            ctx.log_metrics(step=step, **out)
            ctx.log.info("step %d: val_mal %.4f (gamma %d), acceptance at position 1 %.4f", step, out["val_mal"],
                         cfg.mal_gamma, out["val_acceptance_1"] or 0.0)
        accelerator.wait_for_everyone()
        return out

    step = 0
    found = checkpoint.find(out_dir)
    if found is not None:
        step = checkpoint.load(found, accelerator, wrapped, optimizer, scheduler, config_json)["step"]
        ctx.log.info("resumed from %s at step %d of %d", found, step, total)
    last_val = run_validation(0) if step == 0 else {}
    head.train()
    bar = ctx.progress(total=total, initial=step, desc="finetune head", unit="step", disable=not main)
    train_seconds, tokens_seen, order, order_epoch = 0.0, 0, None, -1
    while step < total:
        started = time.perf_counter()
        epoch, index = divmod(step, per_epoch)
        if epoch != order_epoch:
            order, order_epoch = epoch_batches([len(r) for r in rows_train.input_ids], global_batch, ctx.seed, epoch,
                                               cfg.bucket), epoch
        micro = [collate(rows_train, micro_rows(order[index], m, rank, world, cfg.batch_size), pad_id)
                 for m in range(cfg.grad_accum)]
        local = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro)
        (n_pos,) = global_sum(accelerator, local)
        sums = torch.zeros(3, dtype=torch.float64)
        for m, batch in enumerate(micro):
            sync = accelerator.no_sync(wrapped) if m < cfg.grad_accum - 1 else contextlib.nullcontext()
            with sync:
                b = {k: v.to(accelerator.device) for k, v in batch.items()}
                f_sum, l_sum, _ = wrapped(b["input_ids"], b["attention_mask"], b["labels"])
                loss = (cfg.feature_weight * f_sum + cfg.logit_weight * l_sum) / max(n_pos, 1) * world
                accelerator.backward(loss)
            sums += torch.tensor([f_sum.item(), l_sum.item(), float(batch["attention_mask"].sum())], dtype=torch.float64)
        mask.mask_grads()
        if cfg.max_grad_norm:
            accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        f_tot, l_tot, toks = global_sum(accelerator, *sums.tolist())
        train_seconds += time.perf_counter() - started
        tokens_seen += int(toks)
        f_mean, l_mean = f_tot / max(n_pos, 1), l_tot / max(n_pos, 1)
        bar.update(1)
        bar.set_postfix(feat=f"{f_mean:.4f}", logit=f"{l_mean:.3f}")
        if main and (step % cfg.log_every == 0 or step == total):
            ctx.log_metrics(step=step, epoch=epoch, feature_loss=f_mean, logit_loss=l_mean,
                            loss=cfg.feature_weight * f_mean + cfg.logit_weight * l_mean,
                            lr=scheduler.get_last_lr()[0], tokens_per_s=tokens_seen / train_seconds)
        if cfg.eval_every and step % cfg.eval_every == 0 and step < total:
            last_val = run_validation(step)
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total:
            held = mask.verify(optimizer)
            if not held["mask_exact"]:
                from sd2.core.errors import Sd2Error
                raise Sd2Error(f"finetune broke the head's sparsity mask at step {step}: "
                               f"{held['mask_violations']} pruned entries are nonzero")
            checkpoint.save(out_dir, accelerator, wrapped, optimizer, scheduler, step,
                            {"epoch": epoch, "batch": index + 1}, config_json)
    bar.close()
    if total:
        last_val = run_validation(step) or last_val
    head.eval()
    metrics = {"steps": step, "total_steps": total, "epochs": round(step / per_epoch, 3) if per_epoch else 0.0,
               "global_batch": global_batch, "world_size": world, "precision": precision,
               "tokens_per_s": round(tokens_seen / train_seconds, 2) if train_seconds else None,
               "train_seconds": round(train_seconds, 3), "masked_weights": mask.pruned, "mask_held": bool(mask),
               **mask.verify(optimizer), **last_val}
    accelerator.wait_for_everyone()
    return metrics


def run_finetune(config, inputs, out_dir: Path, ctx) -> dict:
    """The finetune stage for a head folder: load head and target, train, save the head folder."""
    import json

    from sd2.heads import io
    from sd2.core.errors import Sd2Error
    from sd2.core.models import load_model, load_tokenizer

    from sd2.stages.finetune.batches import load_rows, split_rows
    from sd2.stages.finetune.losses import target_to_draft_map

    out_dir = Path(out_dir)
    hc = io.read_config(inputs.model)
    target = load_model(inputs.target if inputs.target is not None else hc.target, device="cpu")
    head = io.load(inputs.model, target)
    tok = load_tokenizer(inputs.model)
    rows, meta = load_rows(Path(inputs.dataset), tok, hc.vocab_size, config.max_length, need_topk=False)
    train_idx, val_idx = split_rows(len(rows), config.val_fraction, config.val_rows, ctx.seed)
    rows_train, rows_val = rows.subset(train_idx), rows.subset(val_idx)
    from sd2.core.context import rank_world

    rank, world = rank_world()
    if len(rows_train) < config.batch_size * config.grad_accum * world:
        raise Sd2Error(f"the training split has {len(rows_train)} conversations, fewer than one global batch "
                       f"({config.batch_size} x {config.grad_accum} x {world} processes); lower finetune.batch_size "
                       "or distill more prompts")
    t2d = target_to_draft_map(head.d2t, hc.vocab_size)
    ctx.log.info("finetune %s head on %d conversations (%d held out): %s x SmoothL1 + %s x %s, target features online",
                 hc.type, len(rows_train), len(rows_val), config.feature_weight, config.logit_weight, config.loss)
    config_json = config.model_dump(mode="json") | {"seed": ctx.seed, "world_size": world}
    metrics = train_head(config, head, target, rows_train, rows_val, tok.pad_token_id or 0, out_dir, ctx,
                         config_json, t2d)
    if not metrics.get("mask_exact", True):
        raise Sd2Error(f"finetune broke the head's sparsity mask: {metrics['mask_violations']} pruned entries are nonzero")
    if rank == 0:
        record = {"config": config.model_dump(mode="json"), "dataset": str(inputs.dataset), "distill": meta,
                  "train_rows": len(rows_train), "val_rows": len(rows_val), "metrics": metrics}
        io.save(head, out_dir, tok, {"finetune.json": json.dumps(record, indent=2, default=float)})
        src = Path(inputs.model.ref) / "sparsity.json"
        if src.is_file():
            (out_dir / "sparsity.json").write_text(src.read_text())
        checkpoint.remove(out_dir)
    return {k: v for k, v in metrics.items() if v is None or isinstance(v, (bool, int, float, str))}
