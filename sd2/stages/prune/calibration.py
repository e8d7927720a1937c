"""Calibration samples for pruning, drawn from the distilled dataset.

Each sample is the first ``seq_len`` tokens of one conversation (its ``input_ids``: the prompt
with the chat template and the target's own answer), so the statistics SparseGPT, Wanda and the
layer-distance search gather are those of the text the drafter will have to predict.
"""

from __future__ import annotations

import random
from pathlib import Path


def calibration_samples(folder: Path, samples: int, seq_len: int, seed: int, ctx=None) -> list[list[int]]:
    """``samples`` conversations chosen with ``seed``, each cut to its first ``seq_len`` tokens."""
    from sd2.data.dataset import load_distilled  # checks the folder and the columns (docs/CONTRACTS.md)
    from sd2.core.errors import Sd2Error

    data = load_distilled(folder)
    out = draw(range(len(data)), lambda i: data[i]["input_ids"], samples, seq_len, seed)
    if not out:
        raise Sd2Error(f"the distilled dataset in {folder} has no conversation of 2 tokens or more to calibrate on")
    if len(out) < samples and ctx is not None:
        ctx.log.warning("calibration: asked for %d samples, the distilled dataset has %d usable", samples, len(out))
    return out


def draw(items, to_ids, samples: int, seq_len: int, seed: int) -> list[list[int]]:
    """Up to ``samples`` of ``items``, in an order shuffled with ``seed``, each as the first ``seq_len``
    tokens of ``to_ids(item)``; one under 2 tokens is passed over (it has no next token to measure)."""
    items = list(items)
    random.Random(seed).shuffle(items)
    out = []
    for item in items:
        ids = list(to_ids(item))[:seq_len]
        if len(ids) >= 2:
            out.append(ids)
        if len(out) == samples:
            break
    return out
