"""A standalone causal LM's training task for the one loop (sd2/train/loop.py): its loss is CE on
the target's tokens and/or a DistillSpec divergence from the target's distribution (cached top-k
logits or an online target forward), on its logits at the label positions.

Validation: eval loss, top-1 agreement with the target, and the exact teacher-forced greedy MAL.
One drafter forward per validation batch gives its argmax at every response position, given the
target's prefix. ``top1`` is the share of response tokens where that argmax is the target's token;
``mal`` pools ``sd2.mal.teacher_forced_rounds`` over every assistant turn (each contiguous run of
loss positions is one request), which is the greedy speculative-decoding MAL exactly
(docs/design.md, "Greedy MAL without drafting"), if the data holds the target's greedy output.
For a trimmed drafter the argmax is mapped to a target id, and a target token outside the kept set
is never matched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from sd2.mal import MalStats, teacher_forced_rounds
from sd2.sparsity import decoder_linears
from sd2.train.batches import Rows, collate
from sd2.train.losses import IGNORE, cross_entropy, divergence, map_labels, teacher_from_logits, teacher_from_topk
from sd2.train.mask import SparsityMask


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


class LogitsAtPositions(nn.Module):
    """Wraps a causal LM: forward(input_ids, attention_mask, positions) -> logits at the flattened
    ``positions`` ([N, V']). The lm_head runs only on loss positions (prompt tokens skip it: for a
    small drafter lm_head is about half the MACs). DDP wraps this module, so its hooks see the
    whole forward.

    Models whose logits are post-processed (Gemma's soft-capping, Cohere's logit scale) take the
    plain full forward instead."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        cfg = model.config
        self.fast = (getattr(model, "base_model", None) is not None and model.base_model is not model
                     and not getattr(cfg, "final_logit_softcapping", None) and getattr(cfg, "logit_scale", None) is None)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.fast:
            hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                           use_cache=False).last_hidden_state
            return self.model.get_output_embeddings()(hidden[positions])
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return logits[positions]


def _spans(positions: torch.Tensor) -> list[tuple[int, int, int]]:
    """(row, start, end) for each contiguous run of True in a [B, L] mask; start and end index the
    row-major flattening ``tensor[positions]``."""
    out, base = [], 0
    for r in range(positions.shape[0]):
        cols = positions[r].nonzero().flatten().tolist()
        start = 0
        for j in range(1, len(cols) + 1):
            if j == len(cols) or cols[j] != cols[j - 1] + 1:
                out.append((r, base + start, base + j))
                start = j
        base += len(cols)
    return out


@torch.no_grad()
def validate(forward, loss_sums, rows: Rows, batch_size: int, pad_id: int, gamma: int, draft_to_target,
             ce_weight: float, kd_weight: float) -> dict:
    """Metrics over ``rows``. ``forward(batch) -> logits at the label positions`` and
    ``loss_sums(batch, logits) -> (ce sum, ce count, kd sum, kd count)`` are the trainer's own;
    val_loss is the training objective, ce_weight * mean CE + kd_weight * mean KD."""
    stats = MalStats()
    totals = torch.zeros(4, dtype=torch.float64)
    matched = counted = 0
    for s in range(0, len(rows), batch_size):
        idx = list(range(s, min(s + batch_size, len(rows))))
        batch = collate(rows, idx, pad_id)
        logits = forward(batch)
        totals += torch.tensor([float(v) for v in loss_sums(batch, logits)], dtype=torch.float64)
        positions = batch["labels"] != IGNORE
        labels = batch["labels"][positions]
        pred = logits.argmax(-1).cpu()
        if draft_to_target is not None:
            pred = draft_to_target.cpu()[pred]
        match = (pred == labels).tolist()
        matched += sum(match)
        counted += len(match)
        for r, a, b in _spans(positions):
            stats.add_request(teacher_forced_rounds(match[a:b], gamma), rows.category[idx[r]])
    ce_sum, ce_n, kd_sum, kd_n = totals.tolist()
    summary = stats.summary(gamma)
    out = {"val_ce": ce_sum / ce_n if ce_n else None, "val_kd": kd_sum / kd_n if kd_n else None,
           "val_top1": matched / counted if counted else 0.0, "val_mal": summary["mal"],
           "val_acceptance_rate": summary["acceptance_rate"], "val_tokens": counted}
    out["val_loss"] = ce_weight * (out["val_ce"] or 0.0) + kd_weight * (out["val_kd"] or 0.0)
    return out


class LMTask:
    """The loop's Task (sd2.train.loop) for a causal LM: ``module`` is the model wrapped to return
    logits at the label positions; the terms are (ce, kd), each averaged over its own tokens."""

    name = "finetune"
    terms = ("ce", "kd")

    def __init__(self, model, objective: Objective, rows_val: Rows, cfg, pad_id: int, teacher_model=None):
        self.model, self.objective, self.rows_val, self.cfg, self.pad_id = model, objective, rows_val, cfg, pad_id
        self.teacher_model = teacher_model
        self.module = LogitsAtPositions(model)
        self.mask = SparsityMask.of(decoder_linears(model) if cfg.hold_mask else [])
        self.weights = (objective.ce_weight, objective.kd_weight)
        self.accelerator = None

    def prepare(self, accelerator, out_dir, ctx) -> None:
        self.accelerator = accelerator
        if self.teacher_model is not None:
            self.teacher_model.to(accelerator.device).eval()
            t_wrap = LogitsAtPositions(self.teacher_model)

            def teacher_forward(batch):
                with torch.no_grad():
                    b = {k: v.to(accelerator.device) for k, v in batch.items()}
                    return t_wrap(b["input_ids"], b["attention_mask"], b["labels"] != IGNORE)
            self.objective.teacher_forward = teacher_forward

    def counts(self, rows, batch: dict) -> tuple[int, int]:
        return self.objective.counts(batch)

    def _logits(self, module, batch: dict) -> torch.Tensor:
        b = {k: v.to(self.accelerator.device) for k, v in batch.items()}
        return module(b["input_ids"], b["attention_mask"], b["labels"] != IGNORE)

    def sums(self, module, rows, batch: dict):
        ce_sum, _, kd_sum, _ = self.objective.sums(batch, self._logits(module, batch))
        return ce_sum, kd_sum

    def validate(self, module, step: int) -> dict:
        if not len(self.rows_val):
            return {}
        obj = self.objective
        with self.accelerator.autocast():
            return validate(lambda b: self._logits(module, b), obj.sums, self.rows_val, self.cfg.batch_size,
                            self.pad_id, self.cfg.mal_gamma, obj.draft_to_target, obj.ce_weight, obj.kd_weight)
