"""EAGLE-3 heads in sd2's engine (docs/eagle3.md, "In the engine"): the target's verify forward hands
the head its aux hidden states; chains and trees, greedy and sampling, lossless; the head feeds
itself its own prenorm; teacher-forced MAL equals the engine's; evaluate runs an EAGLE-3 head.

Tolerances: features and logits compared across different forward shapes use rtol/atol 1e-5 (fp32;
float differences between CPU kinds are ~1e-7 relative); bitwise checks compare the same
computation on the same shapes only."""

from __future__ import annotations

import pytest
import torch

from sd2.engine.cached import CachedLM
from sd2.engine.loop import generate, target_generate
from sd2.engine.proposer import Context, Sampling
from sd2.heads.drafter import HeadDrafter
from sd2.heads.eagle3 import DraftVocabMap, build, choose_draft_vocab, target_aux, ttt_unroll
from sd2.heads.features import chain_rounds
from sd2.heads.proposer import HeadProposer
from tests.tiny import random_prompts, tiny_llama

AUX = (1, 2, 3)
V, K = 64, 48


def _llama(vocab: int, hidden: int, scale: float, seed: int = 0):
    """A random 4-layer Llama (three distinct aux layers 1, 2, 3) with every weight matrix ~ N(0, scale²)."""
    return tiny_llama(vocab, seed, scale, hidden=hidden, layers=4, max_positions=128)


def _prompts(n: int, seed: int) -> list[list[int]]:
    return random_prompts(n, V, seed=seed)


@pytest.fixture(scope="module")
def target():
    """V = 64, hidden 64: its greedy answers mix short repeats with new tokens, so a fresh head's drafts
    are often accepted and often rejected."""
    return _llama(V, 64, 0.1)


@pytest.fixture(scope="module")
def head(target):
    """A fresh EAGLE-3 head (sd2.heads.eagle3.build's init) whose draft vocabulary is the 48 of 64 tokens
    the target emits most often in its greedy answers to random prompts: some of the target's tokens
    lie outside it."""
    seqs = [p + target_generate(CachedLM(target), p, 24, set()).tokens for p in _prompts(16, 100)]
    return build(target, choose_draft_vocab(seqs, None, V, K), aux_layers=AUX, seed=0).eval()


class Recorder:
    """Wraps a proposer; keeps (context tokens, context features, max_depth, draft) of every round."""

    wants_features = True

    def __init__(self, proposer):
        self.proposer, self.name, self.rounds = proposer, proposer.name, []
        self.feature_layers = proposer.feature_layers

    def reset(self):
        self.proposer.reset()

    def propose(self, ctx, max_depth, sampling, gen):
        draft = self.proposer.propose(ctx, max_depth, sampling, gen)
        self.rounds.append((list(ctx.tokens), ctx.features.clone(), max_depth, draft))
        return draft


def _main_line(draft) -> list[int]:
    depths = draft.depths()
    return [depths.index(d) for d in range(1, max(depths, default=0) + 1)]


def test_the_engine_hands_over_target_aux_states(target, head):
    """Context.features is [len(tokens) - 1, 3 H]: the target's hidden states after layers 1, 2, 3 at
    every committed position but the last, from the prefill and the verify forwards (no other
    target pass), equal to target_aux over the same tokens; a bad layer id is a named error."""
    T = CachedLM(target)
    rec = Recorder(HeadProposer(head, set(), "e3"))
    assert rec.feature_layers == AUX
    prompt = _prompts(1, seed=3)[0]
    out = generate(T, rec, prompt, 3, 20, set())
    assert T.forwards == 1 + len(out.rounds) and len(rec.rounds) >= len(out.rounds) - 1   # prefill + verifies
    for tokens, feats, _, _ in rec.rounds:
        want = target_aux(target, torch.tensor([tokens[:-1]]), AUX)[0][0]
        assert feats.shape == (len(tokens) - 1, 3 * 64)
        torch.testing.assert_close(feats, want, rtol=1e-5, atol=1e-5)
    # one forward over the same ids: the same hooks' values
    seq = rec.rounds[-1][0]
    T.reset()
    got = T.prefill(seq, features=True, layers=AUX)
    torch.testing.assert_close(got, target_aux(target, torch.tensor([seq]), AUX)[0][0], rtol=1e-5, atol=1e-5)
    T.reset()
    with pytest.raises(ValueError, match=r"feature layers \[1, 2, 4\]: ids \[4\] are outside \[0, 3\]"):
        T.prefill(seq, features=True, layers=(1, 2, 4))


def test_greedy_chains_and_trees_equal_the_target_with_rejections(target, head):
    """Width 1, 2, 3, gamma 1..4, with and without an EOS the target reaches: the engine's output is
    the target's greedy output token for token; drafts are accepted and rejected, siblings are
    accepted where the main token is not, every draft id lies in the head's draft vocabulary, and a
    drafted EOS ends its branch (the third stop set is a token the head drafts)."""
    from test_engine_tree import _eos_case

    T = CachedLM(target)
    kept = set(head.draft_to_target().tolist())
    seen = {"accepted": 0, "rejected": 0, "sibling": 0, "eos_stopped": 0}
    for prompt in _prompts(2, seed=4):
        free = target_generate(T, prompt, 24, set()).tokens
        eos, ref_eos = _eos_case(T, prompt, 24)
        rec = Recorder(HeadProposer(head, set(), "e3"))
        generate(T, rec, prompt, 4, 24, set())
        drafted = {rec.rounds[0][3].tokens[1]}        # an EOS the head drafts in the middle of a chain
        ref_drafted = target_generate(T, prompt, 24, drafted).tokens
        for width in (1, 2, 3):
            for gamma in (1, 2, 4):
                for stop, ref in ((set(), free), (eos, ref_eos), (drafted, ref_drafted)):
                    rec = Recorder(HeadProposer(head, stop, "e3", width))
                    out = generate(T, rec, prompt, gamma, 24, stop)
                    assert out.tokens == ref, (width, gamma, stop)
                    seq = prompt + out.tokens
                    for (toks, _, k, draft), r in zip(rec.rounds, out.rounds):
                        main = _main_line(draft)
                        assert set(draft.tokens) <= kept and len(draft) <= k * width
                        assert all(draft.tokens[i] not in stop for i in main[:-1])
                        seen["eos_stopped"] += len(main) < k and draft.tokens[main[-1]] in stop
                        seen["accepted"] += r.accepted
                        seen["rejected"] += r.accepted < r.depth
                        seen["sibling"] += r.accepted > 0 and draft.tokens[0] != seq[len(toks)]
    # on the Zen 5 EPYC: 90 accepted, 798 rounds with a rejection, 18 sibling hits, 47 drafts stopped at an EOS
    assert seen["accepted"] > 30 and seen["rejected"] > 30 and seen["sibling"] > 3 and seen["eos_stopped"] > 0, seen


def test_teacher_forced_mal_equals_the_engines(target, head):
    """The exact greedy chain rounds by teacher forcing (chain_rounds over target_aux, and
    HeadDrafter.teacher_forced_mal as evaluate calls it) equal the engine's rounds, round by round,
    at gamma 1..4 under the engine's max_new_tokens."""
    from sd2.stages.evaluate.measure import Request

    T = CachedLM(target)
    prompts = _prompts(3, seed=6)
    reqs = [Request(f"r{i}", "none", [], p) for i, p in enumerate(prompts)]
    refs = {r.id: target_generate(T, r.ids, 20, set()).tokens for r in reqs}
    tf = HeadDrafter(head, target, None).teacher_forced_mal(target, reqs, refs, [1, 2, 3, 4], 20)
    for gamma in (1, 2, 3, 4):
        engine = []
        for r in reqs:
            out = generate(T, HeadProposer(head, set(), "e3"), r.ids, gamma, 20, set())
            assert out.tokens == refs[r.id]
            seq = r.ids + out.tokens
            aux = target_aux(target, torch.tensor([seq]), AUX)[0][0]
            sim = chain_rounds(head, seq, aux, [(len(r.ids), len(seq))], gamma, 20)[0]
            assert [(x.drafted, x.accepted, x.committed) for x in sim] == \
                   [(x.drafted, x.accepted, x.committed) for x in out.rounds], gamma
            engine += out.rounds
        s = tf[gamma].summary(gamma)
        assert s["mal"] == sum(x.committed for x in engine) / len(engine)
        assert s["accepted"] == sum(x.accepted for x in engine) > 0
        assert s["accepted"] < s["drafted"]


def test_later_draft_steps_feed_the_heads_own_prenorm(target, head):
    """Drafting at T = 1 (no filters) gives q rows equal to the training-time test's steps at the
    round's anchor: step i >= 1 reads the head's own prenorm of step i - 1. The distribution the
    head would give if fed the target's fused aux state at the drafted position instead (or its
    normed output) differs from the drafted q by far more than the tolerance, so a proposer feeding
    either fails this test."""
    prompt = _prompts(1, seed=7)[0]
    seq = prompt + target_generate(CachedLM(target), prompt, 6, set()).tokens
    aux = target_aux(target, torch.tensor([seq]), AUX)[0][0]
    n = len(seq)
    prop = HeadProposer(head, set(), "e3")
    d = prop.propose(Context(seq, len(prompt), aux[: n - 1]), 3, Sampling(1.0), torch.Generator().manual_seed(0))
    assert d.is_chain and len(d) == 3
    t = n - 2                                         # the round's anchor: the last real head position
    row = torch.tensor([seq + d.tokens])
    full_aux = target_aux(target, row, AUX)[0]       # the target's aux states at the drafted positions too
    keep = head.draft_to_target()
    with torch.no_grad():
        steps = [nrm for _, nrm in ttt_unroll(head, head.fuse(full_aux[:, :-1]), row, 3)]
        for i in range(3):
            want = torch.zeros(V)
            want[keep] = torch.softmax(head.logits(steps[i][0, t]), -1)
            torch.testing.assert_close(d.q[i], want, rtol=1e-5, atol=1e-6)
        # the alternatives at step 1 (depth 2): the target's fused state at t + 1, or the normed output
        cache = head.new_cache()
        pre, nrm = head(row[:, 1: t + 2], head.fuse(full_aux[:, : t + 1]), torch.arange(t + 1)[None], cache=cache)
        for wrong in (head.fuse(full_aux[:, t + 1: t + 2]), nrm[:, -1:]):
            local = [[kv[0], kv[1]] for kv in cache]
            _, n2 = head(row[:, t + 2: t + 3], wrong, torch.tensor([[t + 1]]), cache=local)
            q_wrong = torch.softmax(head.logits(n2[0, 0]), -1)
            assert float((q_wrong - d.q[1][keep]).abs().max()) > 1e-4      # 10x the tolerance above, at least


def test_drafting_is_causal(target, head):
    """Editing a later committed token and its aux state leaves the head's cached keys and values of
    every earlier position bitwise unchanged (and changes those from the edit on)."""
    prompt = _prompts(1, seed=8)[0]
    seq = prompt + target_generate(CachedLM(target), prompt, 8, set()).tokens
    aux = target_aux(target, torch.tensor([seq]), AUX)[0][0]
    p = len(seq) - 4
    seq2, aux2 = list(seq), aux.clone()
    seq2[p + 1] = (seq2[p + 1] + 1) % V             # head position p reads token p + 1 and aux at p
    aux2[p:] += 1.0
    a, b = HeadProposer(head), HeadProposer(head)
    a.propose(Context(seq, 2, aux[:-1]), 2, Sampling(), None)
    b.propose(Context(seq2, 2, aux2[:-1]), 2, Sampling(), None)
    for (ka, va), (kb, vb) in zip(a.cache, b.cache):
        assert torch.equal(ka[:, :, :p], kb[:, :, :p]) and torch.equal(va[:, :, :p], vb[:, :, :p])
        assert not torch.equal(ka[:, :, p:], kb[:, :, p:])


# -- sampling: the target's exact distribution, over a 6-token vocabulary -----------------------------

def test_sampling_keeps_the_targets_distribution(monkeypatch):
    """Chi-square against a 6-token target's exact (filtered) distribution over its first 3 tokens
    (gamma 2: the first round drafts 2 levels, the second fed with the head's own prenorm): an EAGLE-3
    head with a draft vocabulary of 4 of the 6 tokens (its q zero elsewhere) drafting trees of width 2
    under top-k / top-p / min-p keeps the target's output distribution; the chain rule without the
    residual after a rejection (tests/test_sampling.py's negative control) fails the same test. The
    head is trained 50 full-batch steps of the training-time test, so drafts are often accepted."""
    from test_sampling import _exact_filtered, _run
    from tiny import chi2_pvalue

    from sd2.engine import sampling
    from sd2.heads.eagle3 import training_time_test

    s = Sampling(1.0, top_k=3, top_p=0.95, min_p=0.05)
    target = _llama(6, 16, 0.6)                     # an exact distribution to enumerate
    keep = [0, 1, 3, 4]
    head = build(target, DraftVocabMap(torch.tensor(keep), 6), aux_layers=AUX, seed=0)
    ids = torch.randint(0, 6, (64, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        aux, logits = target_aux(target, ids, AUX)
    opt = torch.optim.AdamW(head.parameters(), lr=3e-2)
    for _ in range(50):
        res = training_time_test(head, aux, ids, torch.ones_like(ids), logits, depth=2, loss="fkl")
        (res.loss_sum / res.positions).backward()
        opt.step()
        opt.zero_grad()
    head.eval()
    prompt = [1, 2]
    dist = _exact_filtered(target, prompt, 3, s)
    assert abs(sum(dist.values()) - 1) < 1e-5
    first = target_aux(target, torch.tensor([prompt[:1]]), AUX)[0][0]
    d = HeadProposer(head, width=2).propose(Context(prompt, 1, first), 2, s, torch.Generator().manual_seed(0))
    assert d.q.shape == (len(d), 6) and all(t in keep for t in d.tokens)
    assert float(d.q[:, [2, 5]].abs().sum()) == 0.0 and torch.allclose(d.q.sum(-1), torch.ones(len(d)))
    n = 300                                           # on the Zen 5 EPYC: p = 0.93 here, 4e-41 for the control
    counts, acc = _run(target, HeadProposer(head, set(), "e3", 2), prompt, 3, n, 0, s)
    assert acc > 0.1                                  # drafts are accepted (0.24 deep per round), and rejected
    assert chi2_pvalue(counts, dist, n) > 1e-3
    monkeypatch.setattr(sampling, "residual_distribution", lambda p, q: p)
    bad, _ = _run(target, HeadProposer(head, set(), "e3", 2), prompt, 3, n, 0, s)
    assert chi2_pvalue(bad, dist, n) < 1e-5
