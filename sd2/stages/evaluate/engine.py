"""The speculative decoding engine at batch size 1 (the Spec-Bench protocol).

One round: the drafter drafts up to gamma tokens with its KV cache, the target verifies all of them
in ONE forward with its KV cache, the accepted prefix plus one target token (the correction, or the
bonus token after a fully accepted draft) is committed, and both caches are cropped back to the
committed prefix. Every forward is counted and timed.

Cache invariant: between rounds the target's cache holds every committed token but the last, which
is fed together with the drafts; so the prompt prefill is the only target forward outside a round,
and target-only decoding (``target_generate``) follows the same invariant: its forwards are the
single-token decode steps that ``c`` is measured against.

EOS: the drafter stops drafting after proposing an EOS (a draft past the end means nothing), and a
committed EOS ends the request (no bonus token after it). ``max_new_tokens`` caps the committed
tokens: a round drafts at most (remaining - 1), so its committed tokens never exceed the budget.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from sd2.kvcache import growing_cache
from sd2.mal import Round
from sd2.stages.evaluate.sampling import DraftVocab, accept_greedy, accept_sampling, probs, sample


CACHE_RESERVE = 256  # positions preallocated past the prompt; the cache doubles when a request runs longer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Runner:
    """A causal LM with its KV cache and the token ids it holds; counts and times every forward."""

    def __init__(self, model):
        self.model = model
        self.device = next(model.parameters()).device
        self.forwards = 0
        self.seconds = 0.0
        self.step_times: list[float] = []   # single-token forwards (decode steps): what c compares
        self.verify_times: dict[int, list[float]] = {}   # n-token forwards that return n logits (verification)
        self.reset()

    def reset(self) -> None:
        self.cache = None
        self.held: list[int] = []

    def forward(self, ids: list[int], keep: int = 1) -> torch.Tensor:
        """Feed ``ids`` after the cached tokens; return the logits of the last ``keep`` positions [keep, V]."""
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        if self.cache is None:   # written in place: DynamicCache copies the whole cache on every forward
            self.cache = growing_cache(self.model.config, reserve=CACHE_RESERVE)
        _sync(self.device)
        t0 = time.perf_counter()
        out = self.model(input_ids=x, past_key_values=self.cache, use_cache=True, logits_to_keep=keep)
        _sync(self.device)
        dt = time.perf_counter() - t0
        self.forwards += 1
        self.seconds += dt
        if len(ids) == 1:
            self.step_times.append(dt)
        elif keep == len(ids):   # a verify forward (a prefill keeps only its last position)
            self.verify_times.setdefault(len(ids), []).append(dt)
        self.cache = out.past_key_values
        self.held.extend(ids)
        return out.logits[0, -keep:]

    def crop(self, length: int) -> None:
        """Roll the cache back to its first ``length`` tokens. transformers 5.x: ``Cache.crop(n)``
        with a negative n removes |n| tokens (a positive n, the 4.x absolute length, is deprecated)."""
        extra = len(self.held) - length
        if extra > 0:
            self.cache.crop(-extra)
            del self.held[length:]

    def sync_to(self, seq: list[int]) -> list[int]:
        """Keep the longest cached prefix of ``seq``; return the tokens still to feed (at least one,
        since the next logits come from feeding the last token)."""
        h = len(self.held)
        if h < len(seq) and self.held == seq[:h]:   # the usual case, compared at C speed
            return seq[h:]
        n = 0
        lim = min(h, len(seq) - 1)
        while n < lim and self.held[n] == seq[n]:
            n += 1
        self.crop(n)
        return seq[n:]


@dataclass
class Generation:
    tokens: list[int]                          # the new tokens (EOS included when reached)
    rounds: list[Round] = field(default_factory=list)
    seconds: float = 0.0


def _prefill(target: Runner, prompt: list[int]) -> None:
    target.reset()
    if len(prompt) > 1:
        target.forward(prompt[:-1], keep=1)


def _next_token(logits: torch.Tensor, temperature: float, gen: torch.Generator | None) -> int:
    if temperature == 0:
        return int(torch.argmax(logits))
    return sample(probs(logits, temperature), gen)


@torch.inference_mode()
def target_generate(target: Runner, prompt: list[int], max_new_tokens: int, eos: set[int],
                    temperature: float = 0.0, gen: torch.Generator | None = None) -> Generation:
    """Plain autoregressive decoding with the target alone: the baseline and the lossless reference."""
    t0 = time.perf_counter()
    _prefill(target, prompt)
    seq = list(prompt)
    new: list[int] = []
    while len(new) < max_new_tokens:
        tok = _next_token(target.forward([seq[-1]])[-1], temperature, gen)
        seq.append(tok)
        new.append(tok)
        if tok in eos:
            break
    _sync(target.device)
    return Generation(new, [], time.perf_counter() - t0)


def _draft(drafter: Runner, vocab: DraftVocab, seq: list[int], k: int, eos: set[int],
           temperature: float, gen) -> tuple[list[int], list[torch.Tensor]]:
    drafts: list[int] = []
    qs: list[torch.Tensor] = []
    feed = drafter.sync_to(seq)
    for _ in range(k):
        logits = drafter.forward(feed)[-1]
        if temperature == 0:
            tok = vocab.greedy(logits)
        else:
            tok, q = vocab.sample(logits, temperature, gen)
            qs.append(q)
        drafts.append(tok)
        if tok in eos:
            break
        feed = [tok]
    return drafts, qs


@torch.inference_mode()
def speculative_generate(target: Runner, drafter: Runner, vocab: DraftVocab, prompt: list[int], gamma: int,
                         max_new_tokens: int, eos: set[int], temperature: float = 0.0,
                         gen: torch.Generator | None = None) -> Generation:
    """Speculative decoding of one request. Greedy (temperature 0) commits exactly the target's
    greedy tokens; with temperature > 0 the output distribution is exactly the target's."""
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
        drafts, qs = _draft(drafter, vocab, seq, k, eos, temperature, gen) if k > 0 else ([], [])
        logits = target.forward([seq[-1]] + drafts, keep=len(drafts) + 1)
        if temperature == 0:
            n_acc, nxt = accept_greedy(torch.argmax(logits, dim=-1).tolist(), drafts)
        else:
            n_acc, nxt = accept_sampling(probs(logits, temperature), qs, drafts, gen)
        new = drafts[:n_acc]
        if not (new and new[-1] in eos):   # an accepted EOS ends the request: no bonus after it
            new.append(nxt)
        seq.extend(new)
        rounds.append(Round(len(drafts), n_acc, len(new)))
        target.crop(len(seq) - 1)
        drafter.crop(min(len(drafter.held), len(seq) - 1))
        if new[-1] in eos:
            break
    _sync(target.device)
    return Generation(seq[n0:], rounds, time.perf_counter() - t0)
