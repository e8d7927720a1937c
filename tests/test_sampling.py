"""Speculative sampling is lossless in distribution: on a tiny-vocabulary model, the first tokens
sampled by the engine follow the target's exact distribution (chi-square test, fixed seeds), and a
deliberately wrong acceptance rule fails the same test (negative control)."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest
import torch

from sd2.engine import sampling
from sd2.engine.cached import CachedLM
from sd2.engine.drafter import DrafterProposer
from sd2.engine.loop import generate
from sd2.engine.proposer import Draft, Sampling
from sd2.engine.sampling import DraftVocab, accept_greedy

V, N_NEW, GAMMA, PROMPT = 6, 3, 2, [1, 2]




def _tiny(seed: int, scale: float):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=32, bos_token_id=None, eos_token_id=None,
                      pad_token_id=None)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, scale)
    return model


@pytest.fixture(scope="module")
def pair():
    return _tiny(0, 0.6), _tiny(1, 0.6)


@torch.inference_mode()
def _exact(target) -> dict[tuple, float]:
    """The target's exact distribution over its first N_NEW tokens (temperature 1)."""
    dist = {}
    for seq in itertools.product(range(V), repeat=N_NEW):
        logits = target(input_ids=torch.tensor([PROMPT + list(seq[:-1])])).logits[0, len(PROMPT) - 1:]
        p = torch.softmax(logits.float(), -1)
        dist[seq] = math.prod(float(p[i, t]) for i, t in enumerate(seq))
    return dist


def _chi2_pvalue(counts: Counter, dist: dict, n: int) -> float:
    """Pearson chi-square with bins of expected count < 5 pooled; p-value by Wilson-Hilferty."""
    stat, dof, pool_o, pool_e = 0.0, -1, 0, 0.0
    for key, p in dist.items():
        e = n * p
        if e < 5:
            pool_o, pool_e = pool_o + counts.get(key, 0), pool_e + e
            continue
        stat += (counts.get(key, 0) - e) ** 2 / e
        dof += 1
    if pool_e > 0:
        stat += (pool_o - pool_e) ** 2 / pool_e
        dof += 1
    z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


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
    p_ok = _chi2_pvalue(counts, dist, n)
    assert p_ok > 1e-3, p_ok

    # Negative control: after a rejection, resample from p instead of norm(max(0, p - q)).
    monkeypatch.setattr(sampling, "residual_distribution", lambda p, q: p)
    bad, _ = _sample(target, drafter, n, seed=0)
    p_bad = _chi2_pvalue(bad, dist, n)
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
