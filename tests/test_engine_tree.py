"""Tree drafts on tiny models: the tree forward, greedy losslessness with branches and EOS, the
greedy path found anywhere in a tree, and the target's cache after a tree round."""

from __future__ import annotations

import copy

import pytest
import torch

from tiny import random_prompts
from sd2.core.models import load_model
from sd2.engine.cached import CachedLM, tree_mask, tree_positions
from sd2.engine.drafter import DrafterProposer
from sd2.engine.lookup import PromptLookupProposer
from sd2.engine.loop import generate, target_generate
from sd2.engine.proposer import Draft
from sd2.engine.sampling import DraftVocab


@pytest.fixture(scope="module")
def models(tiny_target, tiny_drafter):
    return load_model(tiny_target), load_model(tiny_drafter)


def test_tree_mask_and_positions():
    parents = [-1, -1, 0, 2]            # root -> a, root -> b, a -> c, c -> d
    m = tree_mask(parents, past=2, dtype=torch.float32, device="cpu")[0, 0]
    seen = (m == 0).int().tolist()
    assert seen == [[1, 1, 1, 0, 0, 0, 0],
                    [1, 1, 1, 1, 0, 0, 0],
                    [1, 1, 1, 0, 1, 0, 0],
                    [1, 1, 1, 1, 0, 1, 0],
                    [1, 1, 1, 1, 0, 1, 1]]
    assert tree_positions(parents, 2) == [2, 3, 3, 4, 5]


def test_a_tree_forward_with_a_cache_equals_each_paths_causal_forward(models):
    """transformers 5.x takes a 4D additive attention_mask as given (masking_utils returns a 4D mask
    as-is), also with a KV cache and explicit position_ids: the logits at every tree node equal a plain
    causal forward over prefix + that node's path."""
    target, _ = models
    prefix = [5, 9, 14, 3, 22]
    tokens, parents = [7, 8, 11, 12, 13], [-1, -1, 0, 2, 0]
    T = CachedLM(target)
    with torch.inference_mode():
        T.prefill(prefix[:-1])
        logits, _ = T.verify([prefix[-1]] + tokens, parents)
        for i in range(len(tokens)):
            path, j = [], i
            while j >= 0:
                path.insert(0, tokens[j])
                j = parents[j]
            ref = target(input_ids=torch.tensor([prefix + path])).logits[0, -1]
            torch.testing.assert_close(logits[1 + i], ref, atol=1e-4, rtol=1e-4)


def _eos_case(T, prompt, n=20):
    free = target_generate(T, prompt, n, set()).tokens
    pos = next(i for i in range(4, n) if free[i] not in free[:i])
    eos = {free[pos]}
    ref = target_generate(T, prompt, n, eos).tokens
    assert ref == free[: pos + 1]
    return eos, ref


def test_greedy_trees_are_lossless_for_gamma_1_to_6_with_eos(models):
    target, drafter = models
    T = CachedLM(target)
    V = target.config.vocab_size
    for prompt in random_prompts(2, V, seed=4):
        eos, ref = _eos_case(T, prompt)
        for gamma in range(1, 7):
            for prop in (DrafterProposer("d", CachedLM(drafter), DraftVocab(V), eos, width=3),
                         DrafterProposer("s", CachedLM(copy.deepcopy(target)), DraftVocab(V), eos, width=2),
                         PromptLookupProposer(eos=eos, max_ngram=2, width=3)):
                out = generate(T, prop, prompt, gamma, 20, eos)
                assert out.tokens == ref, (gamma, prop.name)
                assert sum(r.committed for r in out.rounds) == len(ref)


class Oracle:
    """Knows the target's greedy answer ``ref`` and builds a tree that hides it off the main line:
    at every depth the first child is a wrong token (whose own child continues wrongly) and the true
    token is the second child, which carries the rest of the true path. ``eos_leaf``: the true token
    at the last depth is a sibling leaf."""
    wants_features = False
    name = "oracle"

    def __init__(self, ref, prompt_len, wrong):
        self.ref, self.n0, self.wrong = ref, prompt_len, wrong

    def reset(self):
        pass

    def propose(self, ctx, max_depth, sampling, gen):
        j = len(ctx.tokens) - self.n0
        truth = self.ref[j: j + max_depth]
        tokens, parents, parent = [], [], -1
        for d, t in enumerate(truth):
            tokens += [self.wrong, t]
            parents += [parent, parent]
            parent = len(tokens) - 1
            if d + 1 < len(truth):                  # a wrong grandchild under the wrong child
                tokens.append(self.wrong)
                parents.append(len(tokens) - 3)
        return Draft(tokens, parents)


def test_a_tree_holding_the_greedy_path_off_its_main_line_commits_it(models):
    target, _ = models
    T = CachedLM(target)
    V = target.config.vocab_size
    prompt = random_prompts(1, V, seed=8)[0]
    ref = target_generate(T, prompt, 4 * 4, set()).tokens
    wrong = next(t for t in range(3, V) if t not in ref)
    out = generate(T, Oracle(ref, len(prompt), wrong), prompt, 3, 16, set())
    assert out.tokens == ref
    assert [(r.accepted, r.committed, r.depth) for r in out.rounds] == [(3, 4, 3)] * 4   # MAL = gamma + 1
    # EOS inside a branch: the target's EOS is a sibling, accepted, and nothing follows it
    eos, ref_e = _eos_case(T, prompt, 16)
    out = generate(T, Oracle(ref_e, len(prompt), wrong), prompt, 3, 16, eos)
    assert out.tokens == ref_e and out.rounds[-1].committed == out.rounds[-1].accepted


def test_the_cache_after_tree_rounds_equals_a_fresh_prefill(models):
    target, drafter = models
    V = target.config.vocab_size
    T = CachedLM(target)
    prompt = random_prompts(1, V, seed=3)[0]
    ref = target_generate(T, prompt, 15, set()).tokens
    wrong = next(t for t in range(3, V) if t not in ref)
    # the oracle's accepted path is every second node: the cache must gather, not crop
    out = generate(T, Oracle(ref, len(prompt), wrong), prompt, 4, 15, set())
    assert out.tokens == ref and all(r.accepted == r.depth > 1 for r in out.rounds[:-1])
    seq = prompt + out.tokens
    assert T.held == seq[:-1]
    fresh = CachedLM(target)
    with torch.inference_mode():
        fresh.prefill(seq[:-1])
    for a, b in zip(T.cache.layers, fresh.cache.layers):   # keys and values, position by position
        torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=1e-4)
