"""Cross-tokenizer drafters (Universal Assisted Generation): drafts travel through text.

Each round, the committed target tokens are decoded to text and re-encoded with the drafter's
tokenizer (the drafter's cache keeps the longest unchanged prefix); the drafter drafts gamma of its
own tokens greedily; their text is re-encoded with the target's tokenizer, and up to gamma of those
target tokens are verified in one target forward, exactly as in the same-tokenizer engine.

Lossless by construction: only the target decides what is committed.
- Greedy: the accepted prefix equals the target's argmax, and the correction is the target's token.
- Sampling: the drafts are a deterministic function of the committed text, so q is one-hot at each
  draft and speculative sampling reduces to: accept with probability p(d), else sample from p with
  d removed (``accept_onehot``), which leaves the target's distribution exactly unchanged.
Counts are in target tokens: MAL = committed target tokens / target forwards.
"""

from __future__ import annotations

import time

import torch

from sd2.mal import Round
from sd2.stages.evaluate.engine import Generation, Runner, _prefill, _sync
from sd2.stages.evaluate.sampling import accept_greedy, accept_onehot, probs


def _encode(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False) if text else []


def _draft_text(drafter: Runner, d_tok, d_prompt: list[int], text: str, k: int, d_eos: set[int]) -> str:
    """The text of up to k greedy drafter tokens continuing ``text``."""
    d_gen = _encode(d_tok, text)
    feed = drafter.sync_to(d_prompt + d_gen)
    drafts: list[int] = []
    for _ in range(k):
        tok = int(torch.argmax(drafter.forward(feed)[-1]))
        drafts.append(tok)
        if tok in d_eos:
            break
        feed = [tok]
    drafter.crop(min(len(drafter.held), len(d_prompt) + len(d_gen) + max(len(drafts) - 1, 0)))
    before = d_tok.decode(d_gen)
    after = d_tok.decode(d_gen + drafts)
    return after[len(before):] if after.startswith(before) else d_tok.decode(drafts)


def _candidates(t_tok, new: list[int], text: str, draft_text: str, k: int) -> list[int]:
    """Target tokens for the drafted text: re-encode committed text + draft text and keep what
    follows the committed tokens; if the re-encoding changes a committed token (a merge across the
    boundary), encode the draft text alone. Either way the target verifies, so this only affects MAL."""
    if not draft_text:
        return []
    enc = _encode(t_tok, text + draft_text)
    if enc[: len(new)] == new:
        return enc[len(new):][:k]
    return _encode(t_tok, draft_text)[:k]


@torch.inference_mode()
def crosstok_generate(target: Runner, drafter: Runner, t_tok, d_tok, prompt: list[int], d_prompt: list[int],
                      gamma: int, max_new_tokens: int, eos: set[int], d_eos: set[int], temperature: float = 0.0,
                      gen: torch.Generator | None = None) -> Generation:
    if gamma < 1:
        raise ValueError(f"gamma must be >= 1, got {gamma}")
    t0 = time.perf_counter()
    _prefill(target, prompt)
    drafter.reset()
    seq = list(prompt)
    n0 = len(seq)
    rounds: list[Round] = []
    while len(seq) - n0 < max_new_tokens:
        remaining = max_new_tokens - (len(seq) - n0)
        k = min(gamma, remaining - 1)
        drafts: list[int] = []
        if k > 0:
            new = seq[n0:]
            text = t_tok.decode(new)
            drafts = _candidates(t_tok, new, text, _draft_text(drafter, d_tok, d_prompt, text, gamma, d_eos), k)
            cut = next((i for i, t in enumerate(drafts) if t in eos), None)
            if cut is not None:
                drafts = drafts[: cut + 1]
        logits = target.forward([seq[-1]] + drafts, keep=len(drafts) + 1)
        if temperature == 0:
            n_acc, nxt = accept_greedy(torch.argmax(logits, dim=-1).tolist(), drafts)
        else:
            n_acc, nxt = accept_onehot(probs(logits, temperature), drafts, gen)
        committed = drafts[:n_acc]
        if not (committed and committed[-1] in eos):
            committed.append(nxt)
        seq.extend(committed)
        rounds.append(Round(len(drafts), n_acc, len(committed)))
        target.crop(len(seq) - 1)
        if committed[-1] in eos:
            break
    _sync(target.device)
    return Generation(seq[n0:], rounds, time.perf_counter() - t0)
