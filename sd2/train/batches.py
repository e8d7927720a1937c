"""The distilled data as training batches: load and check, hold out a validation split, order, collate.

- Rows (docs/CONTRACTS.md): input_ids, loss_mask (1 on the target's tokens), optional topk_ids and
  topk_logits, where entry t predicts input_ids[t + 1].
- Labels: position t is trained to predict input_ids[t + 1] exactly where loss_mask[t + 1] == 1, so
  the loss falls only on the assistant's (target-generated) tokens, incl. its end-of-turn token.
- Order: a pure function of (seed, epoch), so a resumed run skips to its saved step and sees the
  same batches. Length bucketing: rows are shuffled, sorted by length inside windows of
  ``BUCKET_WINDOW`` global batches, cut into global batches, and the batches shuffled again;
  a batch then pads to similar lengths. The last incomplete global batch of an epoch is dropped
  (every process must get rows at every step).
- A global batch is split into grad_accum x world micro-batches: micro-step m on rank r gets
  rows [(m * world + r) * batch_size, ... + batch_size), the same rows for any process count.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from sd2.core.errors import Sd2Error

from sd2.train.losses import IGNORE

BUCKET_WINDOW = 16


@dataclass
class Rows:
    """The columns training needs, as Python lists (each row cut to its last max_length positions)."""

    input_ids: list[list[int]]
    loss_mask: list[list[int]]
    topk_ids: list[list[list[int]]] | None
    topk_logits: list[list[list[float]]] | None
    category: list[str]

    def __len__(self) -> int:
        return len(self.input_ids)

    def subset(self, idx: list[int]) -> "Rows":
        pick = (lambda col: [col[i] for i in idx] if col is not None else None)
        return Rows(pick(self.input_ids), pick(self.loss_mask), pick(self.topk_ids), pick(self.topk_logits),
                    pick(self.category))


def load_rows(folder: Path, tokenizer, vocab_size: int, max_length: int, need_topk: bool) -> tuple[Rows, dict]:
    """Load the distilled data and check it against the drafter's tokenizer and vocabulary."""
    from sd2.data.dataset import load_distilled

    folder = Path(folder)
    meta_path = folder / "distill.json"
    if not meta_path.is_file():
        raise Sd2Error(f"{folder}: no distill.json; finetune reads the distill stage's folder (docs/CONTRACTS.md)")
    meta = json.loads(meta_path.read_text())
    check_tokenizer(meta, meta_path, tokenizer)
    data = load_distilled(folder)
    has_topk = "topk_ids" in data.column_names and "topk_logits" in data.column_names
    if need_topk and not has_topk:
        raise Sd2Error(f"finetune.teacher = 'topk' needs cached top-k logits, but {folder}/dataset has none; "
                       "distill with topk set, or use teacher: online (a target forward per batch)")
    # A row longer than max_length keeps its LAST max_length positions: the loss tokens (the target's
    # answers) sit at the end, so cutting the end would train on a long prompt and no answer at all.
    cut = (lambda col: [row[-max_length:] for row in data[col]])
    rows = Rows(cut("input_ids"), cut("loss_mask"), cut("topk_ids") if need_topk else None,
                cut("topk_logits") if need_topk else None,
                list(data["category"]) if "category" in data.column_names else ["none"] * len(data))
    top = max((max(r) for r in rows.input_ids if r), default=-1)
    if rows.topk_ids is not None:
        top = max([top] + [max(e) for r in rows.topk_ids for e in r if e])
    if top >= vocab_size:
        raise Sd2Error(f"{folder}/dataset holds token id {top}, but the drafter's vocabulary has {vocab_size} tokens "
                       f"(tokenizer '{tokenizer.name_or_path}'): the data was made with another tokenizer; "
                       "distill with the drafter's tokenizer")
    for i, (ids, mask) in enumerate(zip(rows.input_ids, rows.loss_mask)):
        if len(ids) != len(mask):
            raise Sd2Error(f"{folder}/dataset row {i}: input_ids has {len(ids)} tokens but loss_mask {len(mask)}")
    return rows, meta


def check_tokenizer(meta: dict, meta_path: Path, tokenizer) -> None:
    """distill.json's tokenizer must be the drafter's: same vocabulary size and, when the named
    tokenizer is a local folder, the same vocabulary."""
    from sd2.core.models import load_tokenizer, same_tokenizer

    name, size = meta.get("tokenizer"), meta.get("vocab_size")
    mine = f"'{tokenizer.name_or_path}' ({len(tokenizer)} tokens)"
    if size is not None and int(size) != len(tokenizer):
        raise Sd2Error(f"tokenizer mismatch: {meta_path} says the data was tokenized with '{name}' ({size} tokens), "
                       f"but the drafter's tokenizer is {mine}; distill with the drafter's tokenizer")
    if isinstance(name, str) and Path(name).is_dir() and (Path(name) / "tokenizer_config.json").is_file():
        if not same_tokenizer(load_tokenizer(name), tokenizer):
            raise Sd2Error(f"tokenizer mismatch: {meta_path} names '{name}', whose vocabulary differs from the "
                           f"drafter's tokenizer {mine}; distill with the drafter's tokenizer")


def split_rows(n: int, val_fraction: float, val_rows: int | None, seed: int) -> tuple[list[int], list[int]]:
    """(train, validation) row indices: a seeded, deterministic hold-out."""
    idx = list(range(n))
    random.Random(f"val-{seed}").shuffle(idx)
    n_val = val_rows if val_rows is not None else int(round(n * val_fraction))
    n_val = min(n_val, max(n - 1, 0))
    return sorted(idx[n_val:]), sorted(idx[:n_val])


def epoch_batches(lengths: list[int], global_batch: int, seed: int, epoch: int, bucket: bool) -> list[list[int]]:
    """The global batches of one epoch (row indices): a pure function of (seed, epoch)."""
    rng = random.Random(f"order-{seed}-{epoch}")
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    if bucket:
        window = global_batch * BUCKET_WINDOW
        idx = [i for s in range(0, len(idx), window)
               for i in sorted(idx[s:s + window], key=lambda j: lengths[j])]
    batches = [idx[s:s + global_batch] for s in range(0, len(idx) - global_batch + 1, global_batch)]
    if bucket:
        rng.shuffle(batches)
    return batches


def micro_rows(batch: list[int], micro: int, rank: int, world: int, batch_size: int) -> list[int]:
    start = (micro * world + rank) * batch_size
    return batch[start:start + batch_size]


def collate(rows: Rows, idx: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors: input_ids, attention_mask, labels (next token or IGNORE), and, with
    cached top-k, topk_ids (-1 padded) and topk_logits, all [B, L(, k)]."""
    seqs = [rows.input_ids[i] for i in idx]
    length = max(len(s) for s in seqs)
    b = len(seqs)
    input_ids = torch.full((b, length), pad_id, dtype=torch.long)
    attention = torch.zeros((b, length), dtype=torch.long)
    labels = torch.full((b, length), IGNORE, dtype=torch.long)
    for r, (i, s) in enumerate(zip(idx, seqs)):
        n = len(s)
        ids = torch.tensor(s, dtype=torch.long)
        input_ids[r, :n] = ids
        attention[r, :n] = 1
        mask = torch.tensor(rows.loss_mask[i][1:n], dtype=torch.bool)
        labels[r, : n - 1] = torch.where(mask, ids[1:], torch.full_like(ids[1:], IGNORE))
    out = {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
    if rows.topk_ids is not None:
        k = max((len(e) for i in idx for e in rows.topk_ids[i]), default=1) or 1
        tid = torch.full((b, length, k), -1, dtype=torch.long)
        tlog = torch.zeros((b, length, k), dtype=torch.float32)
        for r, i in enumerate(idx):
            for t, (e_ids, e_log) in enumerate(zip(rows.topk_ids[i], rows.topk_logits[i])):
                if e_ids:
                    tid[r, t, : len(e_ids)] = torch.tensor(e_ids, dtype=torch.long)
                    tlog[r, t, : len(e_log)] = torch.tensor(e_log, dtype=torch.float32)
        out["topk_ids"], out["topk_logits"] = tid, tlog
    return out
