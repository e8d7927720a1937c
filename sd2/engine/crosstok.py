"""Cross-tokenizer drafters (Universal Assisted Generation): drafts travel through text.

Each round, the committed target tokens after the prompt are decoded to text and re-encoded with the
drafter's tokenizer (the drafter's cache keeps the longest unchanged prefix); the drafter drafts up
to max_depth of its own tokens greedily; their text is re-encoded with the target's tokenizer, and
up to max_depth of those target tokens form the draft chain, verified by the round loop like any other.

Lossless by construction: only the target decides what is committed.
- Greedy: the accepted prefix equals the target's argmax, and the correction is the target's token.
- Sampling: the drafts are a deterministic function of the committed text, so q is one-hot at each
  draft (``Draft.q = None``): accept with probability p(d), else sample from p with d removed.
Counts are in target tokens: MAL = committed target tokens / target forwards.
"""

from __future__ import annotations

import torch

from sd2.engine.cached import CachedLM
from sd2.engine.proposer import Context, Draft, Sampling


def _encode(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False) if text else []


def candidates(t_tok, new: list[int], text: str, draft_text: str, k: int) -> list[int]:
    """Target tokens for the drafted text: re-encode committed text + draft text and keep what
    follows the committed tokens; if the re-encoding changes a committed token (a merge across the
    boundary), encode the draft text alone. Either way the target verifies, so this only affects MAL."""
    if not draft_text:
        return []
    enc = _encode(t_tok, text + draft_text)
    if enc[: len(new)] == new:
        return enc[len(new):][:k]
    return _encode(t_tok, draft_text)[:k]


class CrossTokenizerProposer:
    """``prompts`` maps a target prompt (tuple of ids) to the same prompt in the drafter's tokenizer
    (e.g. through its own chat template); an unknown prompt is re-encoded through text."""
    wants_features = False

    def __init__(self, name: str, lm: CachedLM, t_tok, d_tok, d_eos: set[int], t_eos: set[int],
                 prompts: dict[tuple, list[int]] | None = None):
        self.name, self.lm, self.t_tok, self.d_tok = name, lm, t_tok, d_tok
        self.d_eos, self.t_eos = set(d_eos), set(t_eos)
        self.prompts = prompts if prompts is not None else {}

    def reset(self) -> None:
        self.lm.reset()

    def _d_prompt(self, prompt: list[int]) -> list[int]:
        key = tuple(prompt)
        if key not in self.prompts:
            self.prompts[key] = self.d_tok.encode(self.t_tok.decode(prompt), add_special_tokens=False)
        return self.prompts[key]

    def _draft_text(self, d_prompt: list[int], text: str, k: int) -> str:
        """The text of up to k greedy drafter tokens continuing ``text``."""
        d_gen = _encode(self.d_tok, text)
        feed = self.lm.sync_to(d_prompt + d_gen)
        drafts: list[int] = []
        for _ in range(k):
            tok = int(torch.argmax(self.lm.forward(feed)[-1]))
            drafts.append(tok)
            if tok in self.d_eos:
                break
            feed = [tok]
        before = self.d_tok.decode(d_gen)
        after = self.d_tok.decode(d_gen + drafts)
        return after[len(before):] if after.startswith(before) else self.d_tok.decode(drafts)

    def propose(self, ctx: Context, max_depth: int, sampling: Sampling, gen: torch.Generator | None) -> Draft:
        new = ctx.tokens[ctx.prompt_len:]
        text = self.t_tok.decode(new)
        d_prompt = self._d_prompt(ctx.tokens[: ctx.prompt_len])
        drafts = candidates(self.t_tok, new, text, self._draft_text(d_prompt, text, max_depth), max_depth)
        cut = next((i for i, t in enumerate(drafts) if t in self.t_eos), None)
        return Draft.chain(drafts if cut is None else drafts[: cut + 1])
