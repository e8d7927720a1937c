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

import torch
import torch.nn as nn

from sd2.mal import MalStats, teacher_forced_rounds
from sd2.sparsity import decoder_linears
from sd2.train.batches import Rows, collate
from sd2.train.losses import IGNORE, cross_entropy, divergence, map_labels, teacher_from_logits, teacher_from_topk
from sd2.train.mask import SparsityMask


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
        # FSDP's auto-wrap (TRANSFORMER_BASED_WRAP) reads the decoder layer classes from the module it shards
        self._no_split_modules = list(getattr(model, "_no_split_modules", None) or [])

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


class LMTask:
    """The loop's Task (sd2.train.loop) for a causal LM. ``module`` is the model wrapped to return its
    logits at the label positions; the objective is ce_weight * CE + kd_weight * divergence, each
    term averaged over its own tokens. The teacher is the distilled data's top-k logits, or an
    online target forward (``teacher_model``)."""

    name = "finetune"
    terms = ("ce", "kd")
    shared = ()   # the online teacher is not part of ``module``

    def __init__(self, model, cfg, rows_val: Rows, pad_id: int, d2t=None, t2d=None, teacher_model=None):
        self.cfg, self.rows_val, self.pad_id, self.d2t, self.t2d = cfg, rows_val, pad_id, d2t, t2d
        self.kd = cfg.loss if cfg.loss != "ce" else None
        self.weights = (cfg.ce_weight, 1.0 - cfg.ce_weight) if self.kd else (1.0, 0.0)
        self.module = LogitsAtPositions(model)
        self.mask = SparsityMask.of(decoder_linears(model) if cfg.hold_mask else [])
        self.teacher_model, self.teacher_forward, self.accelerator = teacher_model, None, None

    def prepare(self, accelerator, out_dir, ctx) -> None:
        self.accelerator = accelerator
        if self.teacher_model is not None:
            self.teacher_model.to(accelerator.device).eval()
            from sd2.train import fsdp

            if fsdp.active(accelerator):   # the target sharded too; every process validates, so forwards match
                self.target_layers_sharded = fsdp.shard_frozen(self.teacher_model, accelerator)
            t_wrap = LogitsAtPositions(self.teacher_model)

            def teacher_forward(batch):
                with torch.no_grad():
                    return self._logits(t_wrap, batch)
            self.teacher_forward = teacher_forward

    def _logits(self, module, batch: dict) -> torch.Tensor:
        b = {k: v.to(self.accelerator.device) for k, v in batch.items()}
        return module(b["input_ids"], b["attention_mask"], b["labels"] != IGNORE)

    def _topk_teacher(self, batch: dict, positions: torch.Tensor):
        return teacher_from_topk(batch["topk_ids"][positions], batch["topk_logits"][positions],
                                 self.cfg.temperature, self.t2d)

    def counts(self, rows, batch: dict) -> tuple[int, int]:
        """(CE tokens, KD tokens) of a batch, known before the forward pass."""
        positions = batch["labels"] != IGNORE
        ce_n = int((map_labels(batch["labels"][positions], self.t2d) != IGNORE).sum()) if self.weights[0] else 0
        if not (self.kd and self.weights[1]):
            return ce_n, 0
        if self.teacher_forward is not None:
            return ce_n, int(positions.sum())
        return ce_n, int(self._topk_teacher(batch, positions).rows_with_support().sum())

    def _sums(self, batch: dict, logits: torch.Tensor) -> tuple[torch.Tensor, int, torch.Tensor, int]:
        """(CE sum, CE count, KD sum, KD count) for the logits at the batch's label positions."""
        cfg, device = self.cfg, logits.device
        positions = batch["labels"] != IGNORE
        zero = logits.sum() * 0.0
        ce_sum, ce_n, kd_sum, kd_n = zero, 0, zero, 0
        if self.weights[0]:
            labels = map_labels(batch["labels"][positions], self.t2d).to(device)
            ce_sum, ce_n = cross_entropy(logits, labels).sum(), int((labels != IGNORE).sum())
        if self.kd and self.weights[1]:
            if self.teacher_forward is not None:
                teacher = teacher_from_logits(self.teacher_forward(batch), cfg.temperature, self.d2t)
            else:
                teacher = self._topk_teacher(batch, positions)
            teacher.logp = teacher.logp.to(device)
            teacher.ids = teacher.ids.to(device) if teacher.ids is not None else None
            per_pos = divergence(self.kd, logits, teacher, cfg.temperature, cfg.jsd_beta)
            has = teacher.rows_with_support()
            kd_sum, kd_n = per_pos[has].sum(), int(has.sum())
        return ce_sum, ce_n, kd_sum, kd_n

    def sums(self, module, rows, batch: dict):
        ce_sum, _, kd_sum, _ = self._sums(batch, self._logits(module, batch))
        return ce_sum, kd_sum

    @torch.no_grad()
    def validate(self, module, step: int) -> dict:
        """val_loss (the objective), val_ce, val_kd, val_top1 and the exact teacher-forced greedy MAL."""
        rows, gamma = self.rows_val, self.cfg.mal_gamma
        if not len(rows):
            return {}
        stats = MalStats()
        totals = torch.zeros(4, dtype=torch.float64)
        matched = counted = 0
        for s in range(0, len(rows), self.cfg.batch_size):
            idx = list(range(s, min(s + self.cfg.batch_size, len(rows))))
            batch = collate(rows, idx, self.pad_id)
            with self.accelerator.autocast():
                logits = self._logits(module, batch)
                totals += torch.tensor([float(v) for v in self._sums(batch, logits)], dtype=torch.float64)
            positions = batch["labels"] != IGNORE
            pred = logits.argmax(-1).cpu()
            if self.d2t is not None:
                pred = self.d2t.cpu()[pred]
            match = (pred == batch["labels"][positions]).tolist()
            matched += sum(match)
            counted += len(match)
            for r, a, b in _spans(positions):
                stats.add_request(teacher_forced_rounds(match[a:b], gamma), rows.category[idx[r]])
        ce_sum, ce_n, kd_sum, kd_n = totals.tolist()
        summary = stats.summary(gamma)
        out = {"val_ce": ce_sum / ce_n if ce_n else None, "val_kd": kd_sum / kd_n if kd_n else None,
               "val_top1": matched / counted if counted else 0.0, "val_mal": summary["mal"],
               "val_acceptance_rate": summary["acceptance_rate"], "val_tokens": counted}
        out["val_loss"] = self.weights[0] * (out["val_ce"] or 0.0) + self.weights[1] * (out["val_kd"] or 0.0)
        return out
