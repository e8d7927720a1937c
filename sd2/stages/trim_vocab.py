"""Stage trim_vocab: shrink the drafter's lm_head to the tokens the target actually emits.

K is set directly (``k``) or by ``coverage``: the smallest K whose most frequent tokens cover that
share of the target's generated tokens in the distilled data. Special tokens are always kept.
Counts come from a deterministic share of the rows; coverage is also measured on the held-apart
rest, because coverage on the counting set itself overstates what K will see (docs/design.md, "Calibrations": 86-100%
on the training set vs 67-76% held apart).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    k: int | None = Field(None, ge=1, description="keep this many tokens (plus the special tokens)")
    coverage: float | None = Field(None, description="or: the smallest K covering this share of the target's tokens, in (0, 1]")
    heldout: float = Field(0.1, ge=0.0, lt=1.0, description="share of rows held apart to measure coverage honestly")

    @model_validator(mode="after")
    def _one(self) -> "Config":
        if (self.k is None) == (self.coverage is None):
            raise ValueError("give exactly one of k or coverage")
        if self.coverage is not None and not 0.0 < self.coverage <= 1.0:
            raise ValueError(f"coverage must be in (0, 1], got {self.coverage}")
        return self


def choose_tokens(counts, k: int | None, coverage: float | None, always: list[int]) -> list[int]:
    """The kept target ids: the special tokens plus the top tokens by count (ties by id).

    When ``k`` exceeds the distinct tokens seen, the rest are unseen tokens taken by lowest id. In a
    BPE vocabulary (SmolLM2, Llama, GPT-2) ids follow merge order, which tracks frequency in the
    tokenizer's training corpus, so that is a frequency prior, not an arbitrary fill; the stage
    records how many kept tokens were unseen (``kept_unseen``)."""
    import torch

    order = torch.argsort(counts, descending=True, stable=True)
    if coverage is not None:
        total = int(counts.sum())
        cum = torch.cumsum(counts[order], 0)
        k = int(torch.searchsorted(cum, torch.tensor(coverage * total, dtype=cum.dtype)).item()) + 1
        k = min(k, int((counts > 0).sum()) or 1)
    keep = set(always) | set(order[:k].tolist())
    return sorted(keep)


def run(config: Config, inputs, out_dir: Path, ctx) -> dict:
    import json

    import torch

    from sd2 import drafters, vocab
    from sd2.core.errors import Sd2Error
    from sd2.data.dataset import load_distilled

    drafter = drafters.load(inputs.model)
    tok = drafter.tokenizer
    before = drafter.macs()
    current = drafter.d2t()
    full_v = drafter.vocab_size
    if config.k is not None and config.k > full_v:
        raise Sd2Error(f"trim_vocab.k = {config.k} exceeds the drafter's vocabulary of {full_v} tokens; use k <= {full_v}")
    data = load_distilled(inputs.dataset)
    fit_rows, held_rows = vocab.heldout_split(len(data), config.heldout, ctx.seed)
    counts = vocab.token_counts(data.select(fit_rows), full_v)
    held_counts = vocab.token_counts(data.select(held_rows), full_v) if held_rows else None
    always = sorted(set(tok.all_special_ids) | ({tok.eos_token_id} if tok.eos_token_id is not None else set()))
    if current is not None:  # already trimmed: choose only among the tokens it can still propose
        allowed = torch.zeros(full_v, dtype=torch.bool)
        allowed[current] = True
        counts = counts * allowed
        always = [t for t in always if allowed[t]]
    keep = choose_tokens(counts, config.k, config.coverage, always)
    drafter.trim_vocab(keep)
    drafter.save(out_dir)
    after = drafter.macs()
    keep_t = torch.tensor(keep)
    stats = {
        "draft_vocab_size": len(keep), "full_vocab_size": full_v, "special_tokens_kept": len(always),
        "distinct_target_tokens_seen": int((counts > 0).sum()),
        "kept_unseen": int((counts[keep_t] == 0).sum()),
        "coverage_fit": round(vocab.coverage(counts, keep_t), 6),
        "coverage_heldout": round(vocab.coverage(held_counts, keep_t), 6) if held_counts is not None else None,
        "rows_fit": len(fit_rows), "rows_heldout": len(held_rows),
        "lm_head_macs_before": before.lm_head, "lm_head_macs_after": after.lm_head,
        "macs_per_token_before": before.effective, "macs_per_token_after": after.effective,
        "mac_saving": round(1 - after.effective / before.effective, 6),
    }
    (out_dir / "vocab_stats.json").write_text(json.dumps(stats, indent=2))
    src_sparsity = Path(inputs.model.ref) / "sparsity.json"
    if src_sparsity.is_file():  # the decoder is unchanged, so its sparsity record still holds
        (out_dir / "sparsity.json").write_text(src_sparsity.read_text())
    ctx.log.info("trimmed the output layer %d -> %d tokens; coverage %.3f (fit) / %s (held apart); MACs -%.1f%%",
                 len(current) if current is not None else full_v, len(keep), stats["coverage_fit"],
                 stats["coverage_heldout"], 100 * stats["mac_saving"])
    return {k: stats[k] for k in ("draft_vocab_size", "coverage_fit", "coverage_heldout", "mac_saving")}
