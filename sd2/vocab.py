"""Trimmed-vocabulary drafters (FR-Spec; EAGLE-3's draft-to-target token map).

A small drafter spends much of its compute in lm_head (SmolLM2: 49152 x 576 = 28 M MACs per token,
half of an 8-layer drafter's). A trimmed drafter keeps only the K tokens the target actually
emits: its lm_head has K rows, its input embeddings keep all V rows (so it reads any target token),
and ``draft_to_target`` maps draft ids to target ids. The target still verifies over its full
vocabulary, so speculative decoding stays lossless; only acceptance depends on K.

On disk: a save_pretrained folder whose lm_head.weight has K rows, ``config.json`` holding
``"sd2_vocab": {"draft_vocab_size": K, "full_vocab_size": V}`` (and tie_word_embeddings false),
and ``draft_to_target.json`` (the K target ids, ascending).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

CONFIG_KEY = "sd2_vocab"
MAP_FILE = "draft_to_target.json"
_ATTR = "sd2_draft_to_target"


def draft_to_target(model) -> torch.Tensor | None:
    """The LongTensor[K] of target ids for a trimmed drafter, or None for a full-vocabulary model."""
    return getattr(model, _ATTR, None)


def trim_lm_head(model, keep_ids) -> nn.Module:
    """Replace the model's lm_head by the rows ``keep_ids`` (ascending target ids), in place.

    Untied from the input embeddings, which keep all V rows. A model that is already trimmed is
    trimmed further: ``keep_ids`` are then target ids that must all be in its current map."""
    keep = torch.as_tensor(sorted(set(int(i) for i in keep_ids)), dtype=torch.long)
    head = model.get_output_embeddings()
    old_map = draft_to_target(model)
    full_v = model.config.sd2_vocab["full_vocab_size"] if old_map is not None else head.weight.shape[0]
    if keep.numel() == 0 or int(keep.max()) >= full_v or int(keep.min()) < 0:
        raise ValueError(f"token ids to keep must be in [0, {full_v})")
    if old_map is not None:
        pos = {int(t): i for i, t in enumerate(old_map.tolist())}
        missing = [int(t) for t in keep.tolist() if int(t) not in pos]
        if missing:
            raise ValueError(f"{len(missing)} ids are not in the drafter's current vocabulary, e.g. {missing[:5]}")
        rows = torch.tensor([pos[int(t)] for t in keep.tolist()], dtype=torch.long)
    else:
        rows = keep
    new = nn.Linear(head.in_features, keep.numel(), bias=head.bias is not None,
                    dtype=head.weight.dtype, device=head.weight.device)
    with torch.no_grad():
        new.weight.copy_(head.weight[rows])
        if head.bias is not None:
            new.bias.copy_(head.bias[rows])
    from sd2.modeling import untie_lm_head

    untie_lm_head(model, new)   # a trimmed head must never be re-tied to the full embeddings
    setattr(model.config, CONFIG_KEY, {"draft_vocab_size": int(keep.numel()), "full_vocab_size": int(full_v)})
    setattr(model, _ATTR, keep)
    return model


def save_map(model, folder: str | Path) -> None:
    ids = draft_to_target(model)
    if ids is not None:
        (Path(folder) / MAP_FILE).write_text(json.dumps(ids.tolist()))


def attach_trimmed_head(model, folder: str | Path) -> nn.Module:
    """Called by the loader for a trimmed folder: install the K-row lm_head saved there and the map."""
    from safetensors import safe_open

    folder = Path(folder)
    ids = torch.tensor(json.loads((folder / MAP_FILE).read_text()), dtype=torch.long)
    weight = None
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            key = next((k for k in sf.keys() if k.endswith("lm_head.weight")), None)
            if key is not None:
                weight = sf.get_tensor(key)
                break
    if weight is None or weight.shape[0] != ids.numel():
        raise ValueError(f"{folder}: lm_head.weight with {ids.numel()} rows not found next to {MAP_FILE}")
    head = model.get_output_embeddings()
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=head.weight.dtype, device=head.weight.device)
    with torch.no_grad():
        new.weight.copy_(weight.to(head.weight.dtype))
    from sd2.modeling import untie_lm_head

    untie_lm_head(model, new)   # as trim_lm_head left it: never re-tied to the full embeddings
    setattr(model, _ATTR, ids)
    return model


def token_counts(dataset, vocab_size: int) -> torch.Tensor:
    """How often the target emitted each token: counts over input_ids where loss_mask is 1."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for ids, mask in zip(dataset["input_ids"], dataset["loss_mask"]):
        ids_t = torch.as_tensor(ids, dtype=torch.long)
        sel = ids_t[torch.as_tensor(mask, dtype=torch.bool)]
        counts += torch.bincount(sel, minlength=vocab_size)[:vocab_size]
    return counts


def heldout_split(n: int, heldout: float, seed: int) -> tuple[list[int], list[int]]:
    """(rows to count on, rows held apart) of n rows: a seeded shuffle, ``heldout`` of them apart
    (none of a single row). trim_vocab's and an EAGLE-3 head's draft vocabulary split."""
    import random

    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    n_held = int(round(n * heldout)) if n > 1 else 0
    return sorted(idx[n_held:]), sorted(idx[:n_held])


def coverage(counts: torch.Tensor, keep) -> float:
    """The share of the counted tokens (``token_counts``) that the kept ids ``keep`` cover."""
    total = int(counts.sum())
    return float(counts[keep].sum()) / total if total else 0.0
