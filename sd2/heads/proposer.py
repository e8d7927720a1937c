"""The head proposer: a feature-level head (EAGLE-1, FSPAD, EAGLE-3) drafting on the engine's proposer protocol.

Each round (sd2/engine/proposer.py): ``ctx.features`` holds the target's features at every committed
position but the last, from the target's own prefill and verify forwards: its final-norm hidden
state for EAGLE-1 / FSPAD, the hidden states after its aux layers for EAGLE-3 (the proposer's
``feature_layers``; sd2/heads/drafting.py says, per head type, what the head reads and feeds back).
Head position t pairs committed token x_{t+1} with the target's real features at t, so every
committed token but the first has a real head position. The proposer keeps a KV cache of those
real positions and, each round:
1. keeps the cached prefix whose tokens are still committed, and runs the head on the rest with
   the target's REAL features (EAGLE-3: fused by its fc); this replaces the hidden states the head
   fed itself for drafted tokens in the previous round: the drafted positions are never kept;
2. drafts a main chain: the last real position's output gives depth 1 and a hidden state to feed
   back (EAGLE-1 / FSPAD: its predicted feature; EAGLE-3: its ``prenorm``); each further depth
   feeds the main token with the head's own hidden state of the depth before;
3. with ``width`` > 1 the draft is a tree, made exactly as the standalone drafter makes it
   (``sd2.engine.drafter.chain_with_siblings``): at every depth ``width - 1`` sibling leaves from the
   same head distribution (greedy: the next most likely tokens; sampling: further independent draws
   from the same filtered q). Siblings cost no head forward; a branch ends at an EOS main token.
Token choice, filtering (top-k / top-p / min-p) and the map of a head's own K-row output layer (a
trimmed head's ``d2t``, an EAGLE-3 head's draft vocabulary) are the engine's ``DraftVocab``
(sd2/engine/sampling.py), so a head's q is exactly the distribution its tokens were drawn from, over
the target's vocabulary (zero outside the head's K tokens): speculative sampling stays lossless.
"""

from __future__ import annotations

import time

import torch

from sd2.engine.drafter import chain_with_siblings
from sd2.engine.packed import pack_linears
from sd2.engine.proposer import Context, Draft, ForwardCounter, Sampling
from sd2.heads.model import cache_len, crop_cache
from sd2.heads.drafting import drafting


class HeadProposer(ForwardCounter):
    """Proposer protocol over a head of any type (``Head`` or ``Eagle3Head``); counts its forwards and
    their seconds (for c). ``feature_layers`` tells the engine which target features to hand over.

    ``width``: nodes per depth (1 = a chain), as for ``DrafterProposer``; evaluate sets it per run."""

    wants_features = True

    def __init__(self, head, eos: set[int] | None = None, name: str = "head", width: int = 1):
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        self.head = head
        self.packed = pack_linears(head)   # CPU fp32: prepacked oneDNN weights (sd2/engine/packed.py)
        self.drafting = drafting(head)
        self.feature_layers = self.drafting.feature_layers
        self.name = name
        self.eos = set(eos or ())
        self.width = int(width)
        self.device = self.drafting.device
        self.vocab = self.drafting.vocab
        self.start_counting()
        self.reset()

    def reset(self) -> None:
        self.cache = self.head.new_cache()
        self.ids: list[int] = []          # token of each cached (real) head position

    def _run(self, ids: list[int], hidden: torch.Tensor, start: int, cache: list, real: bool = False):
        """Feed ``ids`` at positions start.. with ``hidden`` [T, H] (``real``: the target's features
        [T, F], turned into the head's hidden input here); return (logits [rows] of the last position,
        the hidden [H] it feeds back)."""
        t0 = time.perf_counter()
        d = self.drafting
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        pos = torch.arange(start, start + len(ids), device=self.device)[None]
        h = d.hidden(hidden) if real else hidden
        out, back = d.forward(x, h[None], pos, cache)
        logits = d.logits(out[0, -1])
        self.count(len(ids), time.perf_counter() - t0)
        return logits, back[0, -1]

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
        logits, feat = self._run(new_ids, ctx.features[keep:n_real], keep, self.cache, real=True)
        self.ids.extend(new_ids)
        assert cache_len(self.cache) == n_real
        # drafted positions go into a view of the cache that the next round drops
        local = [[kv[0], kv[1]] for kv in self.cache]
        pos = n_real

        def step(tok: int) -> torch.Tensor:          # feed a depth's main token with the hidden fed back
            nonlocal feat, pos
            out, feat = self._run([tok], feat[None], pos, local)
            pos += 1
            return out

        return chain_with_siblings(logits, step, max_depth, self.width, self.vocab, self.eos, sampling, gen)
