"""Distributions and the acceptance rules: greedy tree walk, and speculative sampling over a tree
(recursive rejection over the children of each accepted node), which leaves the target's output
distribution exactly unchanged.

Filtering (``filtered_probs``): temperature, then top-k, top-p (nucleus), min-p, applied to the
target's and the drafter's logits alike. A draft's q is exactly the filtered distribution it was
drawn from.

Acceptance with siblings (multi-draft speculative sampling; SpecInfer, Miao et al. 2024, and the
multi-draft analysis of Chen et al. 2023/2024). At an accepted node with target distribution p, the
children c_1..c_m are tried in order; child j (token x_j drawn from q_j independently of the others)
is accepted with probability min(1, p(x_j) / q_j(x_j)); on rejection p <- norm(max(0, p - q_j)) and
the next child is tried against the new p. Each step is one single-draft speculative-sampling step
whose output is distributed as its p, so the whole walk is: if no child is accepted, the token is
drawn from the last residual. A chain is the case m = 1 (Leviathan et al. 2023; Chen et al. 2023).
A deterministic draft (q = None: greedy, prompt lookup, cross-tokenizer) is q_j = one-hot(x_j):
accept with probability p(x_j), else remove x_j from p. Applying the chain rule to each sibling
against the unchanged p is NOT lossless; tests/test_sampling.py uses it as the negative control.

The drafter's vocabulary is mapped onto the target's by ``DraftVocab``: a trimmed drafter
(sd2/vocab.py) proposes ``map[argmax]`` and its q is zero outside the kept set; a drafter whose
lm_head has a few more or fewer rows than the target's (padding) is cut or padded to the target's V.
"""

from __future__ import annotations

import torch

from sd2.engine.proposer import Draft, Sampling


def filtered_probs(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """softmax(logits / T) restricted by top-k, then top-p, then min-p, renormalised; [..., V] float32.
    top-p keeps the smallest set of most likely tokens whose mass reaches p (at least one token);
    min-p keeps tokens with probability >= min_p * the largest probability (Nguyen et al. 2024)."""
    x = logits.float() / s.temperature
    if s.top_k and s.top_k < x.shape[-1]:
        kth = torch.topk(x, s.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    p = torch.softmax(x, dim=-1)
    if s.top_p < 1.0:
        sp, order = torch.sort(p, dim=-1, descending=True)
        before = torch.cumsum(sp, dim=-1) - sp          # mass strictly before each token
        drop_sorted = before >= s.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        p = p.masked_fill(drop, 0.0)
    if s.min_p > 0.0:
        p = p.masked_fill(p < s.min_p * p.amax(dim=-1, keepdim=True), 0.0)
    if s.top_p < 1.0 or s.min_p > 0.0:
        p = p / p.sum(dim=-1, keepdim=True)
    return p


def sample(p: torch.Tensor, gen: torch.Generator | None) -> int:
    return int(torch.multinomial(p, 1, generator=gen))


class DraftVocab:
    """Turns drafter logits into target token ids (and q over the target's vocabulary)."""

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

    def _ids(self, idx: torch.Tensor) -> list[int]:
        return (self.map[idx] if self.map is not None else idx).tolist()

    def greedy_ids(self, logits: torch.Tensor) -> torch.Tensor:
        """[...]: the target id of the most likely drafter row at every position of logits [..., V or K]."""
        top = torch.argmax(self.cut(logits), dim=-1)
        return self.map[top] if self.map is not None else top

    def greedy(self, logits: torch.Tensor) -> int:
        return int(self.greedy_ids(logits.reshape(-1)))

    def top(self, logits: torch.Tensor, k: int) -> list[int]:
        """The k most likely target ids, best first (greedy tree branching)."""
        c = self.cut(logits)
        return self._ids(torch.topk(c, min(k, c.shape[-1])).indices)

    def full(self, q_small: torch.Tensor) -> torch.Tensor:
        """A distribution over the drafter's rows as one over the target's vocabulary."""
        if self.map is not None:
            q = torch.zeros(self.v, dtype=q_small.dtype, device=q_small.device)
            return q.scatter_(0, self.map, q_small)
        if q_small.shape[-1] < self.v:
            return torch.nn.functional.pad(q_small, (0, self.v - q_small.shape[-1]))
        return q_small

    def sample(self, logits: torch.Tensor, s: Sampling, gen: torch.Generator | None,
               n: int = 1) -> tuple[list[int], torch.Tensor]:
        """Draw n target ids independently (with replacement) from the filtered drafter distribution;
        return them with that distribution q over the target's vocabulary [V_target]."""
        q_small = filtered_probs(self.cut(logits), s)
        idx = torch.multinomial(q_small, n, replacement=True, generator=gen)
        return self._ids(idx), self.full(q_small)


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)): where to go after a rejection."""
    r = torch.clamp(p - q, min=0.0)
    total = r.sum()
    # Only reachable with p == q up to rounding, where a rejection has probability ~0: fall back to p.
    return r / total if total > 0 else p


def children(draft: Draft) -> dict[int, list[int]]:
    """Node index -> its children in draft order; the root is -1."""
    out: dict[int, list[int]] = {-1: []}
    for i, p in enumerate(draft.parents):
        out.setdefault(p, []).append(i)
        out.setdefault(i, [])
    return out


def accept_greedy(target_argmax: list[int], draft: Draft) -> tuple[list[int], int]:
    """Walk the tree along the target's argmax. ``target_argmax[j]`` is the target's argmax after input
    j of the verify forward (0 = the root, 1 + i = node i). Returns (accepted path as node indices,
    the target's next token after the path: the correction or the bonus token)."""
    kids = children(draft)
    node, path = -1, []
    while True:
        t = target_argmax[node + 1]
        nxt = next((c for c in kids[node] if draft.tokens[c] == t), None)
        if nxt is None:
            return path, t
        path.append(nxt)
        node = nxt


def accept_sampling(p: torch.Tensor, draft: Draft, gen: torch.Generator | None) -> tuple[list[int], int]:
    """Speculative sampling over a tree (see the module docstring). ``p`` is [n+1, V] target
    probabilities (row 0 the root, row 1 + i node i), ``draft.q`` [n, V] or None (deterministic).
    Returns (accepted path as node indices, the next token)."""
    kids = children(draft)
    node, path = -1, []
    while True:
        pr = p[node + 1]
        accepted = None
        for c in kids[node]:
            x = draft.tokens[c]
            if draft.q is None:
                qc = torch.zeros_like(pr)
                qc[x] = 1.0
            else:
                qc = draft.q[c]
            u = float(torch.rand(1, generator=gen, device=p.device))
            if u * float(qc[x]) < float(pr[x]):   # u < p/q  <=>  accept with probability min(1, p/q)
                accepted = c
                break
            pr = residual_distribution(pr, qc)
        if accepted is None:
            return path, sample(pr, gen)
        path.append(accepted)
        node = accepted
