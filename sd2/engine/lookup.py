"""Prompt lookup decoding: n-gram drafting from the prompt and the output so far, training-free.

The Spec-Bench "PLD" baseline (Saxena 2023, github.com/apoorvumang/prompt-lookup-decoding), also
transformers' ``prompt_lookup_num_tokens`` and vLLM's ``ngram`` method. Each round, for n from
``max_ngram`` down to ``min_ngram``: find earlier occurrences of the last n committed tokens; the
tokens that followed an occurrence are the draft (up to ``max_depth``, cut after an EOS). The first
n that matches wins; no match gives an empty draft (the round is a plain decode step).

Which occurrence: the most recent one (the nearest context; transformers takes the earliest). With
``width`` > 1 the continuations of up to ``width`` distinct occurrences (most recent first) are
merged into a tree (a trie: shared prefixes become one path), and the target verifies them all in
one forward. Drafts are deterministic (q = None), so sampling accepts a draft with probability p(d).
"""

from __future__ import annotations

import torch

from sd2.engine.proposer import Context, Draft, Sampling


def _trie(conts: list[list[int]]) -> Draft:
    tokens: list[int] = []
    parents: list[int] = []
    index: dict[tuple[int, int], int] = {}   # (parent node, token) -> node
    for cont in conts:
        parent = -1
        for t in cont:
            node = index.get((parent, t))
            if node is None:
                node = len(tokens)
                tokens.append(t)
                parents.append(parent)
                index[(parent, t)] = node
            parent = node
    return Draft(tokens, parents)


class PromptLookupProposer:
    wants_features = False

    def __init__(self, name: str = "prompt_lookup", eos: set[int] = frozenset(), max_ngram: int = 3,
                 min_ngram: int = 1, width: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        self.name, self.eos = name, set(eos)
        self.max_ngram, self.min_ngram, self.width = int(max_ngram), int(min_ngram), int(width)

    def reset(self) -> None:
        pass

    def _continuation(self, toks: list[int], start: int, max_depth: int) -> list[int]:
        cont = toks[start: start + max_depth]
        cut = next((i for i, t in enumerate(cont) if t in self.eos), None)
        return cont if cut is None else cont[: cut + 1]

    def propose(self, ctx: Context, max_depth: int, sampling: Sampling, gen: torch.Generator | None) -> Draft:
        toks = ctx.tokens
        L = len(toks)
        for n in range(min(self.max_ngram, L - 1), self.min_ngram - 1, -1):
            pat = toks[L - n:]
            last = pat[-1]
            conts: list[list[int]] = []
            # occurrences ending at i (pattern toks[i-n+1 : i+1]) with at least one token after, newest first
            for i in range(L - 2, n - 2, -1):
                if toks[i] == last and toks[i - n + 1: i + 1] == pat:
                    cont = self._continuation(toks, i + 1, max_depth)
                    if cont not in conts:
                        conts.append(cont)
                        if len(conts) == self.width:
                            break
            if conts:
                return Draft.chain(conts[0]) if len(conts) == 1 else _trie(conts)
        return Draft()
