"""Mean accepted length (MAL) accounting, shared by the evaluate engine and finetune's validation.

Definitions (pinned; the field argues about them):
- MAL = tokens committed / target forwards, pooled over every verification round of every request.
  A round commits its accepted draft tokens plus one correction or bonus token (fewer at EOS or the
  length limit). DistillSpec calls it block efficiency; EAGLE calls it tau.
- acceptance rate = accepted draft tokens / drafted tokens (tree nodes count as drafted tokens, so a
  tree's rate is low by construction: at most one node per depth can be accepted).
- acceptance_per_position[i-1] is defined on depth: among rounds whose draft reached depth i, the
  fraction in which the accepted path reached depth i; position 1 is the first-token rate. For a
  chain, depth i is draft token i. It need not fall with i: rounds near the end of a response (or
  the length limit) draft less deep and drop out of the later positions' denominators.
  tests/test_mal.py counts [2/3, 1.0, 0.5] by hand for one response.
- mal_per_request = the mean over requests of each request's own MAL.

Greedy MAL needs no drafting: one drafter forward over prompt + the target's greedy response gives
the drafter's argmax at every position; a round starting at response position j accepts the run of
consecutive matches, up to gamma, because while drafts match, the drafter's context is exactly the
target's prefix (``teacher_forced_rounds``).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Sequence


@dataclass(frozen=True)
class Round:
    drafted: int     # draft tokens (tree nodes) proposed this round
    accepted: int    # accepted depth: the length of the accepted path (a prefix, for a chain)
    committed: int   # tokens committed this round: accepted + 1, fewer at EOS or the length limit
    depth: int = -1  # the draft's depth (its longest path); -1 means a chain: depth = drafted

    def __post_init__(self):
        if self.depth < 0:
            object.__setattr__(self, "depth", self.drafted)


def draft_length(gamma: int, done: int, left: int, budget: int | None = None) -> int:
    """Draft tokens the engine asks for in a round that starts after ``done`` response tokens, with
    ``left`` tokens of the response still to come. With ``budget`` (the request's max_new_tokens) it
    is the engine's own rule, min(gamma, budget - done - 1), so that the round's committed tokens stay
    within the budget (sd2.engine.loop); without it, min(gamma, left)."""
    return min(gamma, budget - done - 1) if budget is not None else min(gamma, left)


def teacher_forced_rounds(match: Sequence[bool], gamma: int, budget: int | None = None) -> list[Round]:
    """Exact greedy speculative-decoding rounds over a response of len(match) tokens.

    ``match[t]`` is True when the drafter's argmax, given the target's prefix, equals the target's
    response token t. The target commits the accepted run plus one token. Without ``budget`` the
    drafter drafts gamma tokens, fewer only when fewer remain to the end of the response. With
    ``budget`` (the max_new_tokens the response was generated under) it drafts what the engine asks
    for (``draft_length``), and a draft that matches the rest of an answer ended by EOS stops there,
    as drafters do at EOS; then the rounds, drafted counts included, are the engine's, except when a
    drafter would have drafted an EOS of its own after a mismatch (it stops early; teacher forcing
    cannot see that token). MAL, accepted and committed tokens are exact either way.
    """
    def run(j: int, k: int) -> int:
        a = 0
        while a < k and match[j + a]:
            a += 1
        return a

    return greedy_rounds(len(match), gamma, run, budget)


def greedy_rounds(n: int, gamma: int, accepted: Callable[[int, int], int], budget: int | None = None) -> list[Round]:
    """The rounds of a greedy chain drafter over a response of ``n`` tokens, the one rule every
    simulation uses (``teacher_forced_rounds``; a head's ``sd2.heads.features.chain_rounds``): a round
    starting after ``j`` committed tokens drafts ``draft_length`` tokens; ``accepted(j, k)`` says how
    many of its first ``k = min(drafted, n - j)`` drafts the target accepts; the target then commits
    those plus one token. A draft matching the rest of the answer (its EOS) stops drafting there."""
    if gamma < 1:
        raise ValueError(f"gamma must be >= 1, got {gamma}")
    rounds, j = [], 0
    while j < n:
        drafted = draft_length(gamma, j, n - j, budget)
        a = accepted(j, min(drafted, n - j)) if drafted > 0 else 0
        if a == n - j:
            drafted = a                 # matched to the answer's last token (its EOS): drafting stopped there
        committed = min(a + 1, n - j)
        rounds.append(Round(drafted, a, committed))
        j += committed
    return rounds


@dataclass
class MalStats:
    """Accumulates rounds per request (and category) and summarises them."""

    requests: list[tuple[str, list[Round]]] = field(default_factory=list)

    def add_request(self, rounds: list[Round], category: str = "none") -> None:
        self.requests.append((category, list(rounds)))

    @staticmethod
    def _pool(rounds: list[Round]) -> tuple[int, int]:
        return sum(r.committed for r in rounds), len(rounds)

    def summary(self, gamma: int) -> dict:
        every = [r for _, rs in self.requests for r in rs]
        tokens, forwards = self._pool(every)
        drafted = sum(r.drafted for r in every)
        accepted = sum(r.accepted for r in every)
        per_position = []
        for i in range(1, gamma + 1):
            eligible = [r for r in every if r.depth >= i]
            per_position.append(sum(r.accepted >= i for r in eligible) / len(eligible) if eligible else 0.0)
        per_request = [self._pool(rs) for _, rs in self.requests if rs]
        by_cat: dict[str, list[Round]] = defaultdict(list)
        for cat, rs in self.requests:
            by_cat[cat].extend(rs)
        return {
            "mal": tokens / forwards if forwards else 0.0,
            "mal_per_request": sum(t / f for t, f in per_request) / len(per_request) if per_request else 0.0,
            "acceptance_rate": accepted / drafted if drafted else 0.0,
            "acceptance_per_position": per_position,
            "mal_per_category": {c: (lambda t, f: t / f if f else 0.0)(*self._pool(rs)) for c, rs in sorted(by_cat.items())},
            "tokens": tokens,
            "target_forwards": forwards,
            "drafted": drafted,
            "accepted": accepted,
            "drafted_depth": sum(r.depth for r in every),
            "requests": len(self.requests),
        }


def teacher_forced_stats(requests, greedy_ref: dict, gammas: list[int], rounds_for) -> dict[int, "MalStats"]:
    """{gamma: MalStats} of simulated greedy rounds over the requests the target answered (non-empty
    ``greedy_ref[req.id]``): ``rounds_for(req, response)`` does the request's one forward and returns
    a function gamma -> its rounds. Shared by a causal LM's and a head's teacher forcing."""
    stats = {g: MalStats() for g in gammas}
    for req in requests:
        resp = greedy_ref[req.id]
        if resp:
            rounds = rounds_for(req, resp)
            for g in gammas:
                stats[g].add_request(rounds(g), req.category)
    return stats
