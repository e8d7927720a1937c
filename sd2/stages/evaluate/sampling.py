"""Proposals and the acceptance rule: greedy match, or speculative sampling (Leviathan et al. 2023;
Chen et al. 2023), which leaves the target's output distribution exactly unchanged.

Speculative sampling, per draft position i with target distribution p_i and drafter distribution q_i:
- the draft token d_i ~ q_i is accepted with probability min(1, p_i(d_i) / q_i(d_i));
- at the first rejection the token is resampled from norm(max(0, p_i - q_i)) and the round ends;
- if every draft is accepted, a bonus token is sampled from the target's next distribution.

The drafter's vocabulary is mapped onto the target's by ``DraftVocab``: a trimmed drafter
(sd2/vocab.py) proposes ``map[argmax]`` and its q is zero outside the kept set; a drafter whose
lm_head has a few more or fewer rows than the target's (padding) is cut or padded to the target's V.
"""

from __future__ import annotations

import torch


class DraftVocab:
    """Turns drafter logits into (target token id, q over the target's vocabulary)."""

    def __init__(self, target_vocab: int, draft_to_target: torch.Tensor | None = None):
        self.v = int(target_vocab)
        self.map = draft_to_target

    def to(self, device) -> "DraftVocab":
        if self.map is not None:
            self.map = self.map.to(device)
        return self

    def cut(self, logits: torch.Tensor) -> torch.Tensor:
        # A full-vocabulary drafter with extra (padding) rows must never propose an id the target lacks.
        return logits[..., : self.v] if self.map is None and logits.shape[-1] > self.v else logits

    def greedy(self, logits: torch.Tensor) -> int:
        idx = int(torch.argmax(self.cut(logits)))
        return int(self.map[idx]) if self.map is not None else idx

    def sample(self, logits: torch.Tensor, temperature: float, gen: torch.Generator) -> tuple[int, torch.Tensor]:
        """Draw a draft token; return it with q over the target's full vocabulary."""
        q_small = probs(self.cut(logits), temperature)
        idx = int(torch.multinomial(q_small, 1, generator=gen))
        if self.map is not None:
            q = torch.zeros(self.v, dtype=q_small.dtype, device=q_small.device)
            q.scatter_(0, self.map, q_small)
            return int(self.map[idx]), q
        if q_small.shape[-1] < self.v:
            q_small = torch.nn.functional.pad(q_small, (0, self.v - q_small.shape[-1]))
        return idx, q_small


def probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(logits.float() / temperature, dim=-1)


def sample(p: torch.Tensor, gen: torch.Generator) -> int:
    return int(torch.multinomial(p, 1, generator=gen))


def accept_greedy(target_argmax: list[int], drafts: list[int]) -> tuple[int, int]:
    """(accepted, next token): the longest prefix of drafts equal to the target's argmax, then the
    target's own token at the first mismatch (or the bonus token after the last draft)."""
    n = 0
    while n < len(drafts) and drafts[n] == target_argmax[n]:
        n += 1
    return n, target_argmax[n]


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)): where to resample after a rejection."""
    r = torch.clamp(p - q, min=0.0)
    total = r.sum()
    # Only reachable with p == q up to rounding, where a rejection has probability ~0: fall back to p.
    return r / total if total > 0 else p


def accept_sampling(p: torch.Tensor, q: list[torch.Tensor], drafts: list[int],
                    gen: torch.Generator) -> tuple[int, int]:
    """Speculative sampling over one round. ``p`` is [len(drafts)+1, V] target probabilities, ``q``
    the drafter's distribution for each draft (over the same V). Returns (accepted, next token)."""
    k = len(drafts)
    if k:
        d = torch.tensor(drafts, device=p.device)
        qd = torch.stack([q[i][drafts[i]] for i in range(k)])
        pd = p[torch.arange(k, device=p.device), d]
        u = torch.rand(k, generator=gen, device=p.device)
        ok = (u * qd < pd).tolist()   # u < p/q  <=>  accept with probability min(1, p/q)
        n = 0
        while n < k and ok[n]:
            n += 1
        if n < k:
            return n, sample(residual_distribution(p[n], q[n]), gen)
    return k, sample(p[k], gen)


def accept_onehot(p: torch.Tensor, drafts: list[int], gen: torch.Generator) -> tuple[int, int]:
    """Speculative sampling for deterministic drafts (q = one-hot at the draft), as used for
    cross-tokenizer drafts: accept with probability p(d); after a rejection sample from p with d
    removed. Exact for any draft sequence that does not depend on the target's random draws."""
    k = len(drafts)
    for i in range(k):
        pd = float(p[i, drafts[i]])
        if float(torch.rand(1, generator=gen, device=p.device)) < pd:
            continue
        onehot = torch.zeros_like(p[i])
        onehot[drafts[i]] = 1.0
        return i, sample(residual_distribution(p[i], onehot), gen)
    return k, sample(p[k], gen)
