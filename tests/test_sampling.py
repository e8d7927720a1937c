"""Speculative sampling is lossless in distribution: on a tiny-vocabulary model, the first tokens
sampled by the engine follow the target's exact distribution (chi-square test, fixed seeds), and a
deliberately wrong acceptance rule fails the same test (negative control)."""

from __future__ import annotations

import copy
import itertools
import math
from collections import Counter

import pytest
import torch

from sd2.engine import sampling
from sd2.engine.cached import CachedLM
from sd2.engine.drafter import DrafterProposer
from sd2.engine.lookup import PromptLookupProposer
from sd2.engine.loop import generate
from sd2.engine.proposer import Draft, Sampling
from sd2.engine.sampling import DraftVocab, accept_greedy
from tiny import chi2_pvalue, tiny_llama

V, N_NEW, GAMMA, PROMPT = 6, 3, 2, [1, 2]


@pytest.fixture(scope="module")
def pair():
    return tiny_llama(V, 0, 0.6), tiny_llama(V, 1, 0.6)


@torch.inference_mode()
def _exact(target) -> dict[tuple, float]:
    """The target's exact distribution over its first N_NEW tokens (temperature 1)."""
    dist = {}
    for seq in itertools.product(range(V), repeat=N_NEW):
        logits = target(input_ids=torch.tensor([PROMPT + list(seq[:-1])])).logits[0, len(PROMPT) - 1:]
        p = torch.softmax(logits.float(), -1)
        dist[seq] = math.prod(float(p[i, t]) for i, t in enumerate(seq))
    return dist


def _sample(target, drafter, n: int, seed: int, s: Sampling = Sampling(1.0), width: int = 1) -> tuple[Counter, float]:
    T, D = CachedLM(target), DrafterProposer("d", CachedLM(drafter), DraftVocab(V), set(), width)
    gen = torch.Generator().manual_seed(seed)
    counts, rounds, tokens = Counter(), 0, 0
    for _ in range(n):
        out = generate(T, D, PROMPT, GAMMA, N_NEW, set(), s, gen)
        counts[tuple(out.tokens)] += 1
        rounds += len(out.rounds)
        tokens += len(out.tokens)
    return counts, tokens / rounds


def test_speculative_sampling_matches_the_target_distribution(pair, monkeypatch):
    target, drafter = pair
    dist = _exact(target)
    assert abs(sum(dist.values()) - 1) < 1e-5
    n = 1000
    counts, mal = _sample(target, drafter, n, seed=0)
    assert 1.1 < mal < GAMMA + 1   # drafts are accepted often, and rejected often: both paths are exercised
    p_ok = chi2_pvalue(counts, dist, n)
    assert p_ok > 1e-3, p_ok

    # Negative control: after a rejection, resample from p instead of norm(max(0, p - q)).
    monkeypatch.setattr(sampling, "residual_distribution", lambda p, q: p)
    bad, _ = _sample(target, drafter, n, seed=0)
    p_bad = chi2_pvalue(bad, dist, n)
    assert p_bad < 1e-6, p_bad


def test_drafter_equal_to_target_never_rejects_when_sampling(pair):
    target, _ = pair
    counts, mal = _sample(target, target, 50, seed=1)
    assert mal == N_NEW          # one round commits all N_NEW tokens: p == q accepts every draft


def test_accept_greedy_counts_the_matching_prefix():
    assert accept_greedy([5, 6, 7, 8], Draft.chain([5, 6, 9])) == ([0, 1], 7)
    assert accept_greedy([5, 6, 7, 8], Draft.chain([5, 6, 7])) == ([0, 1, 2], 8)
    assert accept_greedy([4, 6], Draft.chain([5])) == ([], 4)
    assert accept_greedy([4], Draft()) == ([], 4)
    # a tree: root children 5 (node 0) and 6 (node 1); node 0 has child 7 (node 2), node 1 child 9 (node 3)
    tree = Draft([5, 6, 7, 9], [-1, -1, 0, 1])
    assert accept_greedy([6, 0, 9, 0, 2], tree) == ([1, 3], 2)   # the sibling branch matches, then its child
    assert accept_greedy([5, 8, 0, 0, 0], tree) == ([0], 8)


def test_residual_distribution_is_normalised_positive_part():
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.6, 0.2])
    torch.testing.assert_close(sampling.residual_distribution(p, q), torch.tensor([1.0, 0.0, 0.0]))


# --- trees with siblings, filtered sampling, trimmed vocabulary, deterministic drafts -------------------

def _ref_filter(p: list[float], k: int, top_p: float, min_p: float) -> list[float]:
    """top-k, then top-p, then min-p, written out plainly (independent of sd2.engine.sampling)."""
    order = sorted(range(len(p)), key=lambda i: -p[i])
    q = {i: p[i] for i in (order[:k] if k else order)}
    z = sum(q.values())
    q = {i: v / z for i, v in q.items()}
    if top_p < 1:
        kept, acc = {}, 0.0
        for i in order:
            if i in q:
                kept[i] = q[i]
                acc += q[i]
                if acc >= top_p:
                    break
        q = kept
    if min_p > 0:
        m = max(q.values())
        q = {i: v for i, v in q.items() if v >= min_p * m}
    z = sum(q.values())
    return [q.get(i, 0.0) / z for i in range(len(p))]


@torch.inference_mode()
def _exact_filtered(target, prompt: list[int], n_new: int, s: Sampling) -> dict[tuple, float]:
    dist = {}
    for seq in itertools.product(range(V), repeat=n_new):
        logits = target(input_ids=torch.tensor([prompt + list(seq[:-1])])).logits[0, len(prompt) - 1:]
        rows = [_ref_filter(torch.softmax(l.float() / s.temperature, -1).tolist(), s.top_k, s.top_p, s.min_p)
                for l in logits]
        dist[seq] = math.prod(rows[i][t] for i, t in enumerate(seq))
    return dist


def _run(target, proposer, prompt, n_new, n, seed, s):
    T = CachedLM(target)
    gen = torch.Generator().manual_seed(seed)
    counts, rounds, accepted_deep = Counter(), 0, 0
    for _ in range(n):
        out = generate(T, proposer, prompt, GAMMA, n_new, set(), s, gen)
        counts[tuple(out.tokens)] += 1
        rounds += len(out.rounds)
        accepted_deep += sum(r.accepted for r in out.rounds)
    return counts, accepted_deep / rounds


def _trimmed(drafter, keep):
    from sd2.vocab import trim_lm_head

    return trim_lm_head(copy.deepcopy(drafter), keep)


CASES = {
    # name: (proposer factory, prompt, filters); the wrong rule must fail every case
    "tree_siblings": (lambda t, d: DrafterProposer("d", CachedLM(d), DraftVocab(V), set(), width=3),
                      [1, 2], Sampling(1.0)),
    "filtered_topk_topp_minp": (lambda t, d: DrafterProposer("d", CachedLM(d), DraftVocab(V), set(), width=2),
                                [1, 2], Sampling(1.0, top_k=4, top_p=0.9, min_p=0.1)),
    "trimmed_vocabulary": (lambda t, d: DrafterProposer("d", CachedLM(_trimmed(d, [0, 1, 3, 4])), DraftVocab(V, torch.tensor([0, 1, 3, 4])),
                                                        set(), width=2), [1, 2], Sampling(1.0)),
    "deterministic_lookup_tree": (lambda t, d: PromptLookupProposer(max_ngram=1, width=2),
                                  [3, 1, 2, 4, 2], Sampling(1.0)),
}


@pytest.fixture(scope="module")
def sharp(pair):
    """The target with its lm_head doubled: q = softmax(2·logits) is sharper than p, so drafts are
    often accepted (about 0.7 of rounds at depth 1) and often rejected, and the residual matters."""
    d = copy.deepcopy(pair[0])
    with torch.no_grad():
        d.lm_head.weight.mul_(2.0)
    return d


@pytest.mark.parametrize("case", list(CASES))
def test_trees_filters_trimmed_and_deterministic_drafts_match_the_target(pair, sharp, monkeypatch, case):
    """Chi-square against the target's exact (filtered) distribution over its first 2 tokens (the first
    round drafts one level, so siblings decide it); the negative control applies the chain rule to each
    sibling against the unchanged p (no residual after a rejected sibling)."""
    target = pair[0]
    make, prompt, s = CASES[case]
    dist = _exact_filtered(target, prompt, 2, s)
    assert abs(sum(dist.values()) - 1) < 1e-5
    n = 500
    counts, acc = _run(target, make(target, sharp), prompt, 2, n, 0, s)
    assert acc > 0.1                      # drafts are accepted, so the acceptance rule is exercised
    assert chi2_pvalue(counts, dist, n) > 1e-3
    monkeypatch.setattr(sampling, "residual_distribution", lambda p, q: p)
    bad, _ = _run(target, make(target, sharp), prompt, 2, n, 0, s)
    assert chi2_pvalue(bad, dist, n) < 1e-5
