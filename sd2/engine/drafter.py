"""The standalone drafter: a small causal LM with the target's tokenizer (full or trimmed vocabulary).

Each round it drafts a main chain of up to ``max_depth`` tokens with its own KV cache. With
``width`` > 1 the draft is a tree: at every depth of the main chain the drafter's next-token
distribution also yields ``width - 1`` sibling leaves (greedy: its next most likely tokens; sampling:
further independent draws from the same q). The siblings cost no drafter forward; the target
verifies all nodes in one forward and a sibling that matches saves the round when the main token
does not. (EAGLE-2-style dynamic trees that extend siblings need drafter forwards over a tree; the
round loop verifies any tree, so such a proposer is a new file, not a new loop.)

A trimmed drafter (``sd2.vocab``, K-row lm_head + d2t map) proposes ``map[argmax]``; its q over the
target's vocabulary is zero outside the kept tokens. The drafter stops a branch after an EOS.
"""

from __future__ import annotations

from typing import Callable

import torch

from sd2.engine.cached import CachedLM
from sd2.engine.proposer import Context, Draft, Sampling
from sd2.engine.sampling import DraftVocab


def chain_with_siblings(logits: torch.Tensor, step: Callable[[int], torch.Tensor], max_depth: int, width: int,
                        vocab: DraftVocab, eos: set[int], sampling: Sampling, gen: torch.Generator | None) -> Draft:
    """The tree every model drafter makes: a main chain of up to ``max_depth`` tokens and, at each
    depth, ``width - 1`` sibling leaves from the same distribution (greedy: the next most likely
    tokens; sampling: further independent draws, with replacement, from the same filtered q).

    ``logits`` [V_draft] are the drafter's logits for depth 1; ``step(token)`` feeds the main token
    of a depth and returns the logits for the next depth (one drafter forward; never called after the
    last depth or after an EOS main token, which ends the draft). Used by the standalone drafter and
    the feature-level heads (sd2/heads/proposer.py), so both branch the same way."""
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    tokens: list[int] = []
    parents: list[int] = []
    qs: list[torch.Tensor] = []
    parent = -1
    for depth in range(max_depth):
        if sampling.greedy:
            cands = vocab.top(logits, width) if width > 1 else [vocab.greedy(logits)]
        else:
            cands, q = vocab.sample(logits, sampling, gen, width)
            qs.extend([q] * len(cands))
        main = len(tokens)
        tokens.extend(cands)
        parents.extend([parent] * len(cands))
        if cands[0] in eos or depth == max_depth - 1:
            break
        parent, logits = main, step(cands[0])
    return Draft(tokens, parents, torch.stack(qs) if qs else None)


class DrafterProposer:
    wants_features = False

    def __init__(self, name: str, lm: CachedLM, vocab: DraftVocab, eos: set[int], width: int = 1):
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        self.name, self.lm, self.vocab, self.eos, self.width = name, lm, vocab, set(eos), int(width)

    def reset(self) -> None:
        self.lm.reset()

    def propose(self, ctx: Context, max_depth: int, sampling: Sampling, gen: torch.Generator | None) -> Draft:
        if max_depth < 1:
            return Draft()
        first = self.lm.forward(self.lm.sync_to(ctx.tokens))[-1]
        return chain_with_siblings(first, lambda tok: self.lm.forward([tok])[-1], max_depth, self.width,
                                   self.vocab, self.eos, sampling, gen)
