"""The round loop on tiny models with chain drafts: losslessness for every proposer, exact MAL,
hand-counted acceptance, KV rollback, trimmed-vocabulary, cross-tokenizer and prompt-lookup
proposers, and the target features handed to proposers."""

from __future__ import annotations

import copy

import pytest
import torch

from sd2.engine.cached import CachedLM
from sd2.engine.crosstok import CrossTokenizerProposer
from sd2.engine.drafter import DrafterProposer
from sd2.engine.lookup import PromptLookupProposer
from sd2.engine.loop import generate, target_generate
from sd2.engine.proposer import Context, Draft
from sd2.engine.sampling import DraftVocab
from sd2.mal import MalStats, teacher_forced_rounds
from sd2.core.models import load_model
from tiny import make_model, make_tokenizer, random_prompts


def _drafter(model, eos=(), vocab=None, width=1):
    return DrafterProposer("d", CachedLM(model), vocab or DraftVocab(model.config.vocab_size), set(eos), width)


def speculative_generate(T, proposer, prompt, gamma, max_new, eos, sampling=None, gen=None):
    from sd2.engine.proposer import Sampling

    if hasattr(proposer, "eos"):
        proposer.eos = set(eos)
    return generate(T, proposer, prompt, gamma, max_new, eos, sampling or Sampling(), gen)


@pytest.fixture(scope="module")
def models(tiny_target, tiny_drafter):
    return load_model(tiny_target), load_model(tiny_drafter)


def test_greedy_equals_target_for_gamma_1_to_6_with_eos_inside_a_draft(models):
    target, drafter = models
    T, D, S = CachedLM(target), _drafter(drafter), _drafter(copy.deepcopy(target))
    L = PromptLookupProposer(max_ngram=2)
    eos_inside_draft = 0
    for prompt in random_prompts(3, target.config.vocab_size):
        free = target_generate(T, prompt, 20, set()).tokens
        # EOS = a token the target emits mid-answer (first occurrence), so every run must stop there.
        pos = next(i for i in range(4, 20) if free[i] not in free[:i])
        eos = {free[pos]}
        ref = target_generate(T, prompt, 20, eos).tokens
        assert ref == free[: pos + 1]
        for gamma in range(1, 7):
            for prop in (D, L, S):   # S (the self-drafter) last: its run is checked below
                out = speculative_generate(T, prop, prompt, gamma, 20, eos)
                assert out.tokens == ref, (gamma, prompt)
                assert sum(r.committed for r in out.rounds) == len(ref)
            # the self-drafter drafts the EOS itself: the round's draft stops there, short of gamma
            last = out.rounds[-1]
            if last.drafted < min(gamma, 20 - (len(ref) - last.committed) - 1) and last.accepted == last.drafted:
                eos_inside_draft += 1
                assert last.committed == last.accepted   # no bonus token after an accepted EOS
    assert eos_inside_draft > 0


def test_drafter_equal_to_target_gives_mal_gamma_plus_one(models):
    target, _ = models
    T, S = CachedLM(target), _drafter(copy.deepcopy(target))
    for gamma in (1, 3, 5):
        stats = MalStats()
        for prompt in random_prompts(2, target.config.vocab_size, seed=gamma):
            out = speculative_generate(T, S, prompt, gamma, 4 * (gamma + 1), set())
            assert len(out.tokens) == 4 * (gamma + 1)
            stats.add_request(out.rounds)
        s = stats.summary(gamma)
        assert s["mal"] == gamma + 1
        assert s["acceptance_per_position"] == [1.0] * gamma
        assert s["target_forwards"] == 8


def _swap_rows(model, a: int, b: int):
    """A drafter identical to the target except that lm_head rows a and b are swapped: its argmax is
    the target's everywhere, except that a and b trade places."""
    d = copy.deepcopy(model)
    w = d.get_output_embeddings().weight
    with torch.no_grad():
        w[[a, b]] = w[[b, a]].clone()
    return d


def test_hand_built_disagreement_gives_hand_counted_acceptance(models):
    target, _ = models
    T = CachedLM(target)
    prompt = random_prompts(1, target.config.vocab_size, seed=7)[0]
    ref = target_generate(T, prompt, 24, set()).tokens
    gamma = 3

    def hand_count(x):
        # A round at position j drafts min(gamma, remaining-1) tokens and accepts them up to the
        # first position whose target token is x (the drafter gets only x wrong); then one target
        # token is committed.
        rounds, j = [], 0
        while j < len(ref):
            k = min(gamma, len(ref) - j - 1)
            a = 0
            while a < k and ref[j + a] != x:
                a += 1
            rounds.append((k, a, a + 1))
            j += a + 1
        return rounds

    # a token x whose count shows both a rejected and a fully accepted round
    x, expected = next((t, hand_count(t)) for t in ref if any(a < k for k, a, _ in hand_count(t))
                       and any(a == k > 0 for k, a, _ in hand_count(t)))
    y = next(t for t in range(3, target.config.vocab_size) if t not in ref)
    out = speculative_generate(T, _drafter(_swap_rows(target, x, y)), prompt, gamma, 24, set())
    assert out.tokens == ref
    assert [(r.drafted, r.accepted, r.committed) for r in out.rounds] == expected
    # and the teacher-forced count (sd2.mal) agrees with the engine
    tf = teacher_forced_rounds([t != x for t in ref], gamma)
    assert sum(r.committed for r in tf) / len(tf) == len(ref) / len(out.rounds)


def test_kv_rollback_matches_a_fresh_forward(models):
    target, drafter = models
    T, D = CachedLM(target), _drafter(drafter)
    prompt = random_prompts(1, target.config.vocab_size, seed=3)[0]
    out = speculative_generate(T, D, prompt, 4, 15, set())
    assert any(r.accepted < r.drafted for r in out.rounds)          # rejections happened
    seq = prompt + out.tokens
    with torch.inference_mode():
        for runner, model in ((T, target), (D.lm, drafter)):
            assert runner.held == seq[: len(runner.held)]
            cont = runner.forward(seq[len(runner.held):])[-1]     # continue from the rolled-back cache
            fresh = model(input_ids=torch.tensor([seq])).logits[0, -1]
            torch.testing.assert_close(cont, fresh, atol=1e-4, rtol=1e-4)


def test_trimmed_vocabulary_drafter(models):
    from sd2.vocab import trim_lm_head

    target, _ = models
    T = CachedLM(target)
    V = target.config.vocab_size
    prompt = random_prompts(1, V, seed=11)[0]
    ref = target_generate(T, prompt, 18, set()).tokens
    # the target itself, trimmed to its own output tokens but one: proposals map back to target ids
    dropped = ref[2]
    keep = sorted(set(ref) - {dropped} | {0, 1, 2})
    d = trim_lm_head(copy.deepcopy(target), keep)
    vocab = DraftVocab(V, torch.tensor(keep))
    out = speculative_generate(T, _drafter(d, vocab=vocab), prompt, 3, 18, set())
    assert out.tokens == ref
    misses = sum(r.drafted - r.accepted for r in out.rounds)
    assert misses == sum(1 for r in out.rounds if r.accepted < r.drafted) > 0
    # every rejected draft sits where the target's token is the dropped one
    pos, j = [], 0
    for r in out.rounds:
        if r.accepted < r.drafted:
            pos.append(j + r.accepted)
        j += r.committed
    assert all(ref[p] == dropped for p in pos)
    # sampling: q is zero outside the kept set
    from sd2.engine.proposer import Sampling

    # the engine runs models under inference_mode; a forward outside it would give logits (and q) that
    # require grad, and float() on them warns (torch 2.13: "Converting a tensor with requires_grad=True")
    with torch.inference_mode():
        logits = d(input_ids=torch.tensor([prompt])).logits[0, -1]
    _, q = vocab.sample(logits, Sampling(1.0), torch.Generator().manual_seed(0))
    outside = torch.ones(V, dtype=torch.bool)
    outside[keep] = False
    assert q.shape == (V,) and float(q[outside].sum()) == 0.0 and abs(float(q.sum()) - 1) < 1e-5


def test_cross_tokenizer_drafter_stays_lossless(tmp_path, tokenizer, models):
    target, _ = models
    d_tok = make_tokenizer(vocab_size=300)
    assert d_tok.get_vocab() != tokenizer.get_vocab()
    d_model = load_model(make_model(tmp_path / "x", n_layers=2, seed=5, tokenizer=d_tok))
    T, D = CachedLM(target), CachedLM(d_model)
    msgs = [{"role": "user", "content": "the quick brown fox jumps"}]
    p_t = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, return_dict=True)["input_ids"]
    p_d = d_tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=True)["input_ids"]
    ref = target_generate(T, p_t, 16, set()).tokens
    prop = CrossTokenizerProposer("x", D, tokenizer, d_tok, {d_tok.eos_token_id}, set(), {tuple(p_t): p_d})
    for gamma in (1, 4):
        out = generate(T, prop, p_t, gamma, 16, set())
        assert out.tokens == ref
        assert sum(r.committed for r in out.rounds) == 16 and D.forwards > 0


def test_draft_text_is_reencoded_with_the_target_tokenizer(tokenizer):
    """Drafts cross tokenizers as text: the candidates are the target tokens that follow the
    committed tokens in the re-encoding of committed text + draft text. (Random tiny models emit
    byte tokens whose text does not survive decode/encode, so this is checked on real words.)"""
    from sd2.engine.crosstok import candidates as _candidates

    enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    new = enc("the quick")
    whole = enc("the quick brown fox jumps")
    assert whole[: len(new)] == new
    assert _candidates(tokenizer, new, "the quick", " brown fox jumps", 3) == whole[len(new):][:3]
    assert _candidates(tokenizer, new, "the quick", "", 3) == []
    # a draft that merges with the last committed token: the draft text is encoded on its own
    new = enc("the qu")
    if enc("the quick")[: len(new)] != new:
        assert _candidates(tokenizer, new, "the qu", "ick", 4) == enc("ick")[:4]


def _successor_model(V: int = 16):
    """A Llama whose greedy next token is t + 1 (mod V) after token t, whatever came before: layers
    contribute nothing (o_proj, down_proj zero), the embedding is the identity, lm_head maps t to t+1."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=V, hidden_size=V, intermediate_size=2 * V, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=64, bos_token_id=None, eos_token_id=None,
                      pad_token_id=None, tie_word_embeddings=False)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        m.model.layers[0].self_attn.o_proj.weight.zero_()
        m.model.layers[0].mlp.down_proj.weight.zero_()
        m.model.embed_tokens.weight.copy_(torch.eye(V))
        m.lm_head.weight.copy_(torch.roll(torch.eye(V), 1, dims=0))
    return m


def test_prompt_lookup_hand_counted_acceptance():
    T = CachedLM(_successor_model())
    prompt = [5, 6, 7, 9, 1, 5]
    # R1: bigram (1,5) unseen; unigram 5 at 0 -> draft 6,7,9,1; target says 6,7,8: accept 2, commit 8.
    # R2: (7,8) and 8 unseen -> empty draft, commit 9. R3: two tokens left, so depth 1; 9 seen at 3 ->
    # draft 1; target says 10: accept 0, commit 10. R4: one token left -> no draft, commit 11.
    out = generate(T, PromptLookupProposer(max_ngram=2), prompt, 4, 6, set())
    assert out.tokens == [6, 7, 8, 9, 10, 11]
    assert [(r.drafted, r.accepted, r.committed) for r in out.rounds] == [(4, 2, 3), (0, 0, 1), (1, 0, 1), (0, 0, 1)]
    # the longest n-gram wins and the most recent occurrence is used
    lk = PromptLookupProposer(max_ngram=3)
    from sd2.engine.proposer import Sampling
    d = lk.propose(Context([1, 2, 3, 1, 2, 4, 9, 1, 2], 9), 3, Sampling(), None)
    assert d.tokens == [4, 9, 1] and d.is_chain      # bigram (1,2): newest earlier occurrence at 3..4
    d = lk.propose(Context([7, 1, 2, 8, 7, 1, 2, 4, 7, 1, 2], 11), 2, Sampling(), None)
    assert d.tokens == [4, 7]                         # trigram (7,1,2) at 4..6 beats the older one at 0..2
    # width 2: the two newest distinct continuations as a trie
    d = PromptLookupProposer(max_ngram=1, width=2).propose(Context([5, 6, 7, 5, 6, 8, 5], 7), 3, Sampling(), None)
    assert d.tokens == [6, 8, 5, 7, 5] and d.parents == [-1, 0, 1, 0, 3]   # 6-8-5 and 6-7-5 share the 6
    # EOS ends a lookup draft
    d = PromptLookupProposer(eos={7}, max_ngram=1).propose(Context([5, 6, 7, 8, 5], 5), 4, Sampling(), None)
    assert d.tokens == [6, 7]


class _Recording:
    """A proposer that asks for the target's features and checks them against a fresh forward."""
    wants_features = True

    def __init__(self, inner, target_model):
        self.inner, self.name, self.target, self.checked = inner, "rec", target_model, 0

    def reset(self):
        self.inner.reset()

    def propose(self, ctx, max_depth, sampling, gen):
        f = ctx.features
        assert f.shape == (len(ctx.tokens) - 1, self.target.config.hidden_size)
        with torch.inference_mode():
            out = self.target(input_ids=torch.tensor([ctx.tokens[:-1]]), output_hidden_states=True)
        # transformers 5.x: hidden_states[-1] is the last hidden state AFTER the final norm, what lm_head reads
        fresh = out.hidden_states[-1][0]
        torch.testing.assert_close(self.target.lm_head(fresh), out.logits[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(f, fresh, atol=1e-4, rtol=1e-4)
        self.checked += 1
        return self.inner.propose(ctx, max_depth, sampling, gen)


@pytest.mark.parametrize("width", [1, 3])
def test_target_features_at_every_committed_position_but_the_last(models, width):
    target, drafter = models
    rec = _Recording(_drafter(drafter, width=width), target)
    prompt = random_prompts(1, target.config.vocab_size, seed=5)[0]
    ref = target_generate(CachedLM(target), prompt, 14, set()).tokens
    out = generate(CachedLM(target), rec, prompt, 3, 14, set())
    assert out.tokens == ref and rec.checked == len(out.rounds) - (out.rounds[-1].drafted == 0)
    assert any(r.accepted < r.depth for r in out.rounds)


def test_a_malformed_draft_is_an_error(models):
    target, _ = models

    class Bad:
        name, wants_features = "bad", False

        def __init__(self, draft):
            self.draft = draft

        def reset(self):
            pass

        def propose(self, ctx, max_depth, sampling, gen):
            return self.draft

    prompt = random_prompts(1, target.config.vocab_size)[0]
    for draft, msg in ((Draft.chain([3, 4, 5]), "exceeds max_depth 2"), (Draft([3, 4], [-1, 1]), "topological"),
                       (Draft.chain([10 ** 6]), "outside the target's vocabulary")):
        with pytest.raises(ValueError, match=msg):
            generate(CachedLM(target), Bad(draft), prompt, 2, 8, set())
