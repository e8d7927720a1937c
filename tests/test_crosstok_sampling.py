"""The cross-tokenizer proposer is lossless in distribution at temperature > 0.

Its drafts travel through text (drafter tokens -> text -> target tokens), so the check needs two
different tokenizers that round-trip text exactly. Byte-level BPE tokenizers trained on a tiny corpus
do not (a random tiny model emits byte tokens that decode to replacement characters), so here both
are character-level BPEs over the alphabet "abcd" built from explicit vocabularies, wrapped in
transformers' PreTrainedTokenizerFast: the target's has the four characters (ids 0-3); the drafter's
has them in another order plus the merges "ab", "cd", "ba" (ids 4-6), so one drafter token can become
two target tokens, a draft "cd" ends in the target's EOS "d", and re-encoding the committed text
("bab" -> "b" "ab") does not always give back the drafter's own tokens.

The target's first N_NEW tokens (stopping at EOS) are enumerated exactly; the engine with the
cross-tokenizer proposer must match that distribution by chi-square. The negative control resamples
from p after a rejected draft instead of from p with the draft removed, and must fail the same test.
"""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
import torch

from sd2.engine import sampling
from sd2.engine.cached import CachedLM
from sd2.engine.crosstok import CrossTokenizerProposer
from sd2.engine.loop import generate
from sd2.engine.proposer import Sampling
from tiny import chi2_pvalue, tiny_llama

T_VOCAB = {"a": 0, "b": 1, "c": 2, "d": 3}
D_VOCAB = {"c": 0, "d": 1, "a": 2, "b": 3, "ab": 4, "cd": 5, "ba": 6}
D_MERGES = [("a", "b"), ("c", "d"), ("b", "a")]
T_EOS, D_EOS = {T_VOCAB["d"]}, {D_VOCAB["d"]}
PROMPT = "ab"
N_NEW, GAMMA = 4, 3


def _char_tokenizer(vocab: dict[str, int], merges=()):
    """A BPE over single characters (plus the given merges) whose decoder concatenates the tokens:
    decode(encode(s)) == s for every string over its characters."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(vocab=vocab, merges=list(merges)))
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def _drafter_like(target):
    """A drafter over D_VOCAB that imitates the target: its layer is the target's, a character's
    embedding and lm_head rows are the target's for that character, a merged token's are those of its
    last / first character. It still disagrees often: it sees merged tokens at other positions, and a
    merged token drafts two characters where the target is sure of one. A random drafter's greedy drafts
    were accepted 6% of the time, too rarely to test the acceptance rule."""
    d = tiny_llama(len(D_VOCAB), 3)
    d.load_state_dict({k: v for k, v in target.state_dict().items() if "embed_tokens" not in k and "lm_head" not in k},
                      strict=False)
    with torch.no_grad():
        for text, i in D_VOCAB.items():
            d.model.embed_tokens.weight[i] = target.model.embed_tokens.weight[T_VOCAB[text[-1]]]
            # x 1.05: a merged token beats its first character exactly when that logit is positive
            d.lm_head.weight[i] = target.lm_head.weight[T_VOCAB[text[0]]] * (1.05 if len(text) > 1 else 1.0)
    return d


@pytest.fixture(scope="module")
def setup():
    t_tok, d_tok = _char_tokenizer(T_VOCAB), _char_tokenizer(D_VOCAB, D_MERGES)
    target = tiny_llama(len(T_VOCAB), 0, 0.3)   # flat enough: entropy 3.3 nats over its ~120 outcomes
    return t_tok, d_tok, target, _drafter_like(target)


def test_the_two_tokenizers_round_trip_text_and_differ(setup):
    t_tok, d_tok, _, _ = setup
    enc = lambda tok, s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    for n in range(1, 6):
        for chars in itertools.product("abcd", repeat=n):
            s = "".join(chars)
            assert t_tok.decode(enc(t_tok, s)) == s and d_tok.decode(enc(d_tok, s)) == s
            assert enc(t_tok, s) == [T_VOCAB[ch] for ch in s]
    assert enc(d_tok, "abcd") == [4, 5] and enc(d_tok, "bab") == [3, 4]


@torch.inference_mode()
def _exact(target, prompt: list[int]) -> dict[tuple, float]:
    """The target's exact distribution (temperature 1) over its first N_NEW tokens, a sequence
    ending early at an EOS."""
    dist: dict[tuple, float] = {}

    def walk(seq: list[int], prob: float) -> None:
        if len(seq) == N_NEW or (seq and seq[-1] in T_EOS):
            dist[tuple(seq)] = prob
            return
        p = torch.softmax(target(input_ids=torch.tensor([prompt + seq])).logits[0, -1].float(), -1)
        for t in range(len(p)):
            walk(seq + [t], prob * float(p[t]))

    walk([], 1.0)
    return dist


class _Logged(CrossTokenizerProposer):
    """Records, per round: the drafter's draft (number of tokens, text), max_depth, the target draft."""

    log: list[tuple[int, str, int, list[int]]]

    def _draft_text(self, d_prompt, text, k):
        before = self.lm.forwards            # one drafter forward per drafted token
        self._drafted = super()._draft_text(d_prompt, text, k)
        self._n = self.lm.forwards - before
        return self._drafted

    def propose(self, ctx, max_depth, s, gen):
        draft = super().propose(ctx, max_depth, s, gen)
        self.log.append((self._n, self._drafted, max_depth, draft.tokens))
        return draft


def _run(setup, n: int, seed: int):
    t_tok, d_tok, target, drafter = setup
    T = CachedLM(target)
    prop = _Logged("x", CachedLM(drafter), t_tok, d_tok, D_EOS, T_EOS)   # the prompt is re-encoded through text
    prop.log = []
    prompt = t_tok.encode(PROMPT, add_special_tokens=False)
    gen = torch.Generator().manual_seed(seed)
    counts, drafted, accepted = Counter(), 0, 0
    for _ in range(n):
        out = generate(T, prop, prompt, GAMMA, N_NEW, T_EOS, Sampling(1.0), gen)
        counts[tuple(out.tokens)] += 1
        drafted += sum(r.drafted for r in out.rounds)
        accepted += sum(r.accepted for r in out.rounds)
    return counts, accepted / drafted, prop.log


def test_cross_tokenizer_sampling_matches_the_target_distribution(setup, monkeypatch):
    t_tok, _, target, _ = setup
    dist = _exact(target, t_tok.encode(PROMPT, add_special_tokens=False))
    assert abs(sum(dist.values()) - 1) < 1e-5
    assert any(len(k) < N_NEW for k in dist)           # EOS ends some sequences early
    n = 1000
    counts, acceptance, log = _run(setup, n, seed=0)
    assert 0.2 < acceptance < 0.8, acceptance      # drafts are accepted often and rejected often
    # the translation is exercised: a merged drafter token became two target tokens, and a draft was
    # cut after the target's EOS
    assert any(len(text) > n_drafted for n_drafted, text, _, _ in log)
    assert any(toks and toks[-1] in T_EOS and len(toks) < min(k, len(text)) for _, text, k, toks in log)
    p_ok = chi2_pvalue(counts, dist, n)
    assert p_ok > 1e-3, p_ok

    # Negative control: after a rejected draft d, resample from p instead of p with d removed.
    monkeypatch.setattr(sampling, "residual_distribution", lambda p, q: p)
    n = 300                                         # enough: 1000 draws gave p ~ 1e-55
    bad, _, _ = _run(setup, n, seed=0)
    p_bad = chi2_pvalue(bad, dist, n)
    assert p_bad < 1e-6, p_bad
