"""The head proposer: a feature-level head drafting on the engine's proposer protocol.

Each round (sd2/engine/proposer.py): ``ctx.features`` holds the target's final-norm hidden state at
every committed position but the last. Head position t pairs committed token x_{t+1} with the
target's real feature f_t, so every committed token but the first has a real head position. The
proposer keeps a KV cache of those real positions and, each round:
1. keeps the cached prefix whose tokens are still committed, and runs the head on the rest with
   the target's REAL features (this replaces the features the head predicted for drafted tokens
   in the previous round: the drafted positions are never kept);
2. drafts a chain: the last real position's output gives draft 1 and a predicted feature; each
   further step feeds the drafted token with the head's own predicted feature.
Greedy picks the argmax; sampling draws from the filtered distribution and returns it as ``q``.
A trimmed head's ids map through ``d2t``; its q is zero outside the kept tokens.
"""

from __future__ import annotations

import time

import torch

from sd2.engine.proposer import Context, Draft, Sampling
from sd2.heads.model import Head, cache_len, crop_cache


def filtered_probs(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """softmax(logits / T) after top-k, top-p and min-p, in that order ([..., V] -> [..., V])."""
    p = torch.softmax(logits.float() / s.temperature, dim=-1)
    if s.top_k and s.top_k < p.shape[-1]:
        kth = torch.topk(p, s.top_k, dim=-1).values[..., -1:]
        p = torch.where(p >= kth, p, torch.zeros_like(p))
        p = p / p.sum(-1, keepdim=True)
    if s.top_p < 1.0:
        sp, si = torch.sort(p, dim=-1, descending=True)
        before = sp.cumsum(-1) - sp            # mass strictly before each token: keep while < top_p
        keep = torch.zeros_like(p, dtype=torch.bool).scatter(-1, si, before < s.top_p)
        p = torch.where(keep, p, torch.zeros_like(p))
        p = p / p.sum(-1, keepdim=True)
    if s.min_p > 0.0:
        p = torch.where(p >= s.min_p * p.max(-1, keepdim=True).values, p, torch.zeros_like(p))
        p = p / p.sum(-1, keepdim=True)
    return p


class HeadProposer:
    """Proposer protocol over a ``Head``; counts its forwards and their seconds (for c)."""

    wants_features = True

    def __init__(self, head: Head, eos: set[int] | None = None, name: str = "head"):
        self.head = head
        self.name = name
        self.eos = set(eos or ())
        self.device = next(head.parameters()).device
        self.vocab = head.target_lm_head.weight.shape[0]
        self.forwards = 0
        self.seconds = 0.0
        self.step_times: list[float] = []
        self.reset()

    def reset(self) -> None:
        self.cache = self.head.new_cache()
        self.ids: list[int] = []          # token of each cached (real) head position

    def _run(self, ids: list[int], feats: torch.Tensor, start: int, cache: list):
        t0 = time.perf_counter()
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        pos = torch.arange(start, start + len(ids), device=self.device)[None]
        hl, hf = self.head(x, feats[None].to(self.device, self.head.model.fc.weight.dtype), pos, cache=cache)
        logits = self.head.logits(hl[0, -1])
        dt = time.perf_counter() - t0
        self.forwards += 1
        self.seconds += dt
        if len(ids) == 1:
            self.step_times.append(dt)
        return logits, hf[0, -1]

    def _pick(self, logits: torch.Tensor, sampling: Sampling, gen) -> tuple[int, torch.Tensor | None]:
        d2t = self.head.d2t
        if sampling.greedy:
            i = int(torch.argmax(logits))
            return (int(d2t[i]) if d2t is not None else i), None
        p = filtered_probs(logits, sampling)
        if d2t is not None:
            p = torch.zeros(self.vocab, dtype=p.dtype, device=p.device).index_copy_(0, d2t, p)
        tok = int(torch.multinomial(p, 1, generator=gen))
        return tok, p

    @torch.inference_mode()
    def propose(self, ctx: Context, max_depth: int, sampling: Sampling, gen: torch.Generator | None) -> Draft:
        if ctx.features is None:
            raise ValueError("HeadProposer needs the target's features (Context.features); the loop provides "
                             "them when the proposer's wants_features is True")
        toks = ctx.tokens
        n_real = len(toks) - 1                       # head positions with a real feature
        if n_real < 1 or max_depth < 1:
            return Draft()
        keep = 0
        lim = min(len(self.ids), n_real)
        while keep < lim and self.ids[keep] == toks[keep + 1]:
            keep += 1
        if keep == n_real:                           # the last real position must be re-run for its output
            keep -= 1
        crop_cache(self.cache, keep)
        del self.ids[keep:]
        new_ids = toks[keep + 1: n_real + 1]
        logits, feat = self._run(new_ids, ctx.features[keep:n_real], keep, self.cache)
        self.ids.extend(new_ids)
        assert cache_len(self.cache) == n_real
        # drafted positions go into a view of the cache that the next round drops
        local = [[kv[0], kv[1]] for kv in self.cache]
        tokens, qs = [], []
        for depth in range(max_depth):
            tok, q = self._pick(logits, sampling, gen)
            tokens.append(tok)
            if q is not None:
                qs.append(q)
            if tok in self.eos or depth == max_depth - 1:
                break
            logits, feat = self._run([tok], feat[None], n_real + depth, local)
        return Draft.chain(tokens, torch.stack(qs) if qs else None)
