"""The target's features, and the exact teacher-forced chain MAL of a head.

Features: ``target_features`` is one no-grad target forward; it returns the last hidden state
after the final norm (what the target's lm_head reads), [B, L, d]. Training, validation and prune
calibration take each conversation's features from its own forward, unpadded (``row_features``):
padding changes the bits (on CPU in torch 2.13 a row padded from 37 to 48 positions gets features
that differ by ~1e-6 from the unpadded row's; the attention reduces over the padded length), so a
row's features would otherwise depend on the batch it lands in. Unpadded, they are what the target
computes when it decodes that text, and a cache of them (feature_cache.py) trains bit-identically
to computing them on the fly.

Alignment (docs/heads.md): head position t reads token x_{t+1} and feature f_t, and is trained to
predict f_{t+1} and x_{t+2}. For a row of L tokens there are L - 1 head positions.
"""

from __future__ import annotations

import contextlib

import torch

from sd2.heads.drafting import drafting
from sd2.heads.model import cache_len
from sd2.mal import Round, greedy_rounds


@torch.no_grad()
def target_features(target, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """[B, L, d]: the target's final-norm hidden states (its lm_head input) at every position."""
    base = target.base_model if getattr(target, "base_model", None) is not None else target
    out = base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state


@torch.no_grad()
def row_features(target, rows: list[list[int]]) -> list[torch.Tensor]:
    """[L_i, d] per row: each row's features from its own unpadded target forward (module docstring:
    the bits do not depend on which rows share a batch). Call it inside the training's autocast
    context, so the cache and the online path compute the same thing."""
    device = next(target.parameters()).device
    return [target_features(target, torch.tensor([r], dtype=torch.long, device=device))[0] for r in rows]


class StateSource:
    """The target's per-token states [L_i, w] of training rows by index (any head type's: the final-norm
    features, or EAGLE-3's aux states): read from a cache (one tensor per row, e.g.
    feature_cache.CachedRows) or computed now by ``compute(list of token-id rows)`` inside the
    training's ``autocast`` context."""

    def __init__(self, rows, compute, autocast=contextlib.nullcontext, cached=None):
        self.rows, self.compute, self.autocast, self.cached = rows, compute, autocast, cached

    def __call__(self, idx: list[int]) -> list[torch.Tensor]:
        if self.cached is not None:
            return [self.cached[i] for i in idx]
        with self.autocast():
            return self.compute([self.rows.input_ids[i] for i in idx])


def pad_features(feats: list[torch.Tensor], length: int) -> torch.Tensor:
    """[B, length, d]: rows' features right-padded with zeros (as ``collate`` pads the ids)."""
    out = feats[0].new_zeros(len(feats), length, feats[0].shape[-1])
    for i, f in enumerate(feats):
        out[i, : f.shape[0]] = f
    return out


def head_inputs(input_ids: torch.Tensor, features: torch.Tensor):
    """(ids [B, L-1], features [B, L-1, d], positions [B, L-1]) of the head over a batch of rows."""
    b, n = input_ids.shape
    pos = torch.arange(n - 1, device=input_ids.device).expand(b, n - 1)
    return input_ids[:, 1:], features[:, :-1], pos


@torch.no_grad()
def chain_rounds(head, ids: list[int], feats: torch.Tensor, spans: list[tuple[int, int]],
                 gamma: int, budget: int | None = None) -> list[list[Round]]:
    """Exact greedy speculative-decoding rounds of a head (any type) as a chain drafter, one list per span.

    ``ids`` is one row (prompt + the target's response), ``feats`` its target features [L, F] (those
    the engine hands the head: ``drafting(head).target_features``), and each span (a, b) the
    response token indices a..b-1 (a >= 1). A round that starts with tokens x_0..x_{n-1} committed
    drafts from head position n-2 (real features at n-2); each further draft step feeds the head its
    own hidden state (EAGLE-1 / FSPAD: its predicted feature; EAGLE-3: its prenorm), exactly as the
    proposer does (both through sd2.heads.drafting), and the round accepts the drafts that equal the
    data's tokens. This simulates the rounds without the target (the data
    holds the target's output), so it equals the engine's greedy MAL when the data is the target's
    greedy output. ``budget``: the max_new_tokens of each span's generation, for the engine's draft
    lengths (sd2.mal.draft_length and teacher_forced_rounds)."""
    d = drafting(head)
    device = d.device
    x = torch.tensor(ids, dtype=torch.long, device=device)
    n_pos = len(ids) - 1
    vocab = d.vocab
    cache = head.new_cache()
    pos = torch.arange(n_pos, device=device)[None]
    hl, hf = d.forward(x[None, 1:], d.hidden(feats[:-1])[None], pos, cache)
    greedy1 = vocab.greedy_ids(d.logits(hl[0]))           # [L-1]: head position t predicts x_{t+2}

    def accepted(a: int, j: int, k: int) -> int:
        """Drafts accepted, of ``k``, in the round after the span's first ``j`` tokens (x_0..x_{n-1} committed)."""
        n = a + j
        t = n - 2                         # head position of the first draft
        if k == 0 or t < 0 or int(greedy1[t]) != ids[n]:
            return 0
        acc, feat = 1, hf[0, t]
        local = [[kv[0][:, :, : t + 1], kv[1][:, :, : t + 1]] for kv in cache]
        while acc < k:
            step = torch.tensor([[t + acc]], device=device)
            l2, f2 = d.forward(x[None, n + acc - 1: n + acc], feat[None, None], step, local)
            if vocab.greedy(d.logits(l2[0, 0])) != ids[n + acc]:
                break
            acc += 1
            feat = f2[0, 0]
        return acc

    out = [greedy_rounds(b - a, gamma, lambda j, k, a=a: accepted(a, j, k), budget) for a, b in spans]
    assert cache_len(cache) == n_pos
    return out

