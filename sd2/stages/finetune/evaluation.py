"""Validation: eval loss, top-1 agreement with the target, and the exact teacher-forced greedy MAL.

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

from sd2.mal import MalStats, teacher_forced_rounds

from .batches import Rows, collate
from .losses import IGNORE


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
