"""The proposer protocol: what the round loop asks of every way of drafting tokens.

A round (one per target forward) is: propose, verify in one target forward, accept, commit, roll
back both caches. The loop, the acceptance rules and the accounting live once; a proposer only turns
"what has been committed (and the target's features)" into a draft. This follows transformers'
``CandidateGenerator`` (``get_candidates``) and vLLM v1's per-file proposers (``propose``).

Shapes and vocabularies:
- Every token id a proposer returns is in the TARGET's vocabulary (a trimmed or cross-tokenizer
  drafter maps its own ids first).
- A draft is a tree of n nodes in topological order. ``parents[i]`` is the index of node i's parent,
  or -1 when its parent is the root: the last committed token, which the target has not yet seen.
  A chain is ``parents == [-1, 0, 1, ..., n-2]``. Depth of a node = 1 + depth of its parent (root 0).
- ``q`` (sampling only) is [n, V_target] float32: row i is exactly the distribution node i was drawn
  from, after the same top-k / top-p / min-p filtering the target's distribution gets. ``None`` means
  the draft is deterministic given the committed tokens (greedy, prompt lookup, cross-tokenizer),
  which the acceptance rule treats as one-hot q.

Target features (for feature-level heads, EAGLE/FSPAD/EAGLE-3): a proposer that sets
``wants_features`` gets the target's features at every committed position the target has processed,
which is every committed position but the last; they come from the target forwards the loop runs
anyway (the prefill and each round's verify), never from another target pass. Which features is the
proposer's optional ``feature_layers``:
- None (or absent): the target's last hidden state, the one its lm_head reads (after the final
  norm), [len(tokens) - 1, d_target] (EAGLE-1, FSPAD);
- a tuple of ids k (0 <= k < N decoder layers): the hidden state after k decoder layers, before the
  final norm, concatenated in that order, [len(tokens) - 1, len(ids) * d_target] (EAGLE-3's
  auxiliary states, as ``sd2.heads.eagle3.model.target_aux`` defines them).
``Context.features`` is that buffer, or None when the proposer does not set ``wants_features``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class Sampling:
    """How the target's (and the draft's) next-token distribution is formed.

    temperature 0 is greedy. The filters apply in the order top-k, top-p, min-p, to the target and
    the drafter alike; 0 / 1.0 / 0.0 disable them.
    """
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class ForwardCounter:
    """Counts a drafting model's forwards and their seconds (the proposer's cost); ``step_times`` holds
    the single-token forwards (decode steps), which the cost ratio c compares. Shared by ``CachedLM``
    and proposers that run their own model (a head)."""

    def start_counting(self) -> None:
        self.forwards = 0
        self.seconds = 0.0
        self.step_times: list[float] = []

    def count(self, n_ids: int, seconds: float) -> None:
        self.forwards += 1
        self.seconds += seconds
        if n_ids == 1:
            self.step_times.append(seconds)


@dataclass
class Draft:
    """A chain or a tree of draft tokens (target vocabulary). See the module docstring."""
    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    q: torch.Tensor | None = None          # [n, V_target], or None for deterministic drafts

    @classmethod
    def chain(cls, tokens: list[int], q: torch.Tensor | None = None) -> "Draft":
        return cls(list(tokens), list(range(-1, len(tokens) - 1)), q)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def is_chain(self) -> bool:
        return self.parents == list(range(-1, len(self.tokens) - 1))

    def depths(self) -> list[int]:
        d: list[int] = []
        for p in self.parents:
            d.append(1 if p < 0 else d[p] + 1)
        return d


@dataclass
class Context:
    """What a proposer is given each round."""
    tokens: list[int]                       # every committed token, prompt included
    prompt_len: int                         # the first prompt_len tokens are the prompt
    features: torch.Tensor | None = None    # [len(tokens) - 1, F] the target's features (module docstring)


@runtime_checkable
class Proposer(Protocol):
    """Owns its model (if any) and its cache; counts its own forwards for the cost c. A proposer that
    wants the target's features may also set ``feature_layers`` (module docstring; None when absent)."""
    name: str
    wants_features: bool

    def reset(self) -> None:
        """Forget the previous request (called before each new prompt)."""

    def propose(self, ctx: Context, max_depth: int, sampling: Sampling,
                gen: torch.Generator | None) -> Draft:
        """A draft whose depth is at most ``max_depth`` (>= 1). Stop a branch after an EOS token.
        The proposer syncs its own cache to ``ctx.tokens`` (keeping the longest valid prefix); the
        drafted nodes it cached last round are not committed unless they appear in ctx.tokens."""
