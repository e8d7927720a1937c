"""The speculative decoding engine on tiny models: losslessness, exact MAL, hand-counted acceptance,
KV rollback, trimmed-vocabulary and cross-tokenizer drafters."""

from __future__ import annotations

import copy

import pytest
import torch

from sd2.mal import MalStats, teacher_forced_rounds
from sd2.core.models import load_model
from sd2.stages.evaluate.crosstok import crosstok_generate
from sd2.stages.evaluate.engine import Runner, speculative_generate, target_generate
from sd2.stages.evaluate.sampling import DraftVocab
from tiny import make_model, make_tokenizer




@pytest.fixture(scope="module")
def models(tiny_target, tiny_drafter):
    return load_model(tiny_target), load_model(tiny_drafter)


def _prompts(n, vocab, seed=0, length=6):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (length + i,), generator=g).tolist() for i in range(n)]


def test_greedy_equals_target_for_gamma_1_to_6_with_eos_inside_a_draft(models):
    target, drafter = models
    T, D, S = Runner(target), Runner(drafter), Runner(copy.deepcopy(target))
    vocab = DraftVocab(target.config.vocab_size)
    eos_inside_draft = 0
    for prompt in _prompts(3, target.config.vocab_size):
        free = target_generate(T, prompt, 20, set()).tokens
        # EOS = a token the target emits mid-answer (first occurrence), so every run must stop there.
        pos = next(i for i in range(4, 20) if free[i] not in free[:i])
        eos = {free[pos]}
        ref = target_generate(T, prompt, 20, eos).tokens
        assert ref == free[: pos + 1]
        for gamma in range(1, 7):
            for runner in (D, S):
                out = speculative_generate(T, runner, vocab, prompt, gamma, 20, eos)
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
    T, S = Runner(target), Runner(copy.deepcopy(target))
    vocab = DraftVocab(target.config.vocab_size)
    for gamma in (1, 3, 5):
        stats = MalStats()
        for prompt in _prompts(2, target.config.vocab_size, seed=gamma):
            out = speculative_generate(T, S, vocab, prompt, gamma, 4 * (gamma + 1), set())
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
    T = Runner(target)
    prompt = _prompts(1, target.config.vocab_size, seed=7)[0]
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
    D = Runner(_swap_rows(target, x, y))
    out = speculative_generate(T, D, DraftVocab(target.config.vocab_size), prompt, gamma, 24, set())
    assert out.tokens == ref
    assert [(r.drafted, r.accepted, r.committed) for r in out.rounds] == expected
    # and the teacher-forced count (sd2.mal) agrees with the engine
    tf = teacher_forced_rounds([t != x for t in ref], gamma)
    assert sum(r.committed for r in tf) / len(tf) == len(ref) / len(out.rounds)


def test_kv_rollback_matches_a_fresh_forward(models):
    target, drafter = models
    T, D = Runner(target), Runner(drafter)
    prompt = _prompts(1, target.config.vocab_size, seed=3)[0]
    out = speculative_generate(T, D, DraftVocab(target.config.vocab_size), prompt, 4, 15, set())
    assert any(r.accepted < r.drafted for r in out.rounds)          # rejections happened
    seq = prompt + out.tokens
    with torch.inference_mode():
        for runner, model in ((T, target), (D, drafter)):
            assert runner.held == seq[: len(runner.held)]
            cont = runner.forward(seq[len(runner.held):])[-1]     # continue from the rolled-back cache
            fresh = model(input_ids=torch.tensor([seq])).logits[0, -1]
            torch.testing.assert_close(cont, fresh, atol=1e-4, rtol=1e-4)


def test_trimmed_vocabulary_drafter(models):
    from sd2.vocab import trim_lm_head

    target, _ = models
    T = Runner(target)
    V = target.config.vocab_size
    prompt = _prompts(1, V, seed=11)[0]
    ref = target_generate(T, prompt, 18, set()).tokens
    # the target itself, trimmed to its own output tokens but one: proposals map back to target ids
    dropped = ref[2]
    keep = sorted(set(ref) - {dropped} | {0, 1, 2})
    d = trim_lm_head(copy.deepcopy(target), keep)
    vocab = DraftVocab(V, torch.tensor(keep))
    out = speculative_generate(T, Runner(d), vocab, prompt, 3, 18, set())
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
    _, q = vocab.sample(d(input_ids=torch.tensor([prompt])).logits[0, -1], 1.0, torch.Generator().manual_seed(0))
    outside = torch.ones(V, dtype=torch.bool)
    outside[keep] = False
    assert q.shape == (V,) and float(q[outside].sum()) == 0.0 and abs(float(q.sum()) - 1) < 1e-5


def test_cross_tokenizer_drafter_stays_lossless(tmp_path, tokenizer, models):
    target, _ = models
    d_tok = make_tokenizer(vocab_size=300)
    assert d_tok.get_vocab() != tokenizer.get_vocab()
    d_model = load_model(make_model(tmp_path / "x", n_layers=2, seed=5, tokenizer=d_tok))
    T, D = Runner(target), Runner(d_model)
    msgs = [{"role": "user", "content": "the quick brown fox jumps"}]
    p_t = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, return_dict=True)["input_ids"]
    p_d = d_tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=True)["input_ids"]
    ref = target_generate(T, p_t, 16, set()).tokens
    for gamma in (1, 4):
        out = crosstok_generate(T, D, tokenizer, d_tok, p_t, p_d, gamma, 16, set(), {d_tok.eos_token_id})
        assert out.tokens == ref
        assert sum(r.committed for r in out.rounds) == 16 and D.forwards > 0
    # sampling through text: q is one-hot at each draft; runs to the length limit
    sampled = crosstok_generate(T, D, tokenizer, d_tok, p_t, p_d, 3, 16, set(), set(), 1.0,
                                torch.Generator().manual_seed(0))
    assert len(sampled.tokens) == 16


def test_draft_text_is_reencoded_with_the_target_tokenizer(tokenizer):
    """Drafts cross tokenizers as text: the candidates are the target tokens that follow the
    committed tokens in the re-encoding of committed text + draft text. (Random tiny models emit
    byte tokens whose text does not survive decode/encode, so this is checked on real words.)"""
    from sd2.stages.evaluate.crosstok import _candidates

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
