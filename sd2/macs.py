"""Per-token MACs of an HF causal LM, in SD²'s accounting. Used by derive, prune and evaluate.

- Decoder linear layers (``sd2.sparsity.decoder_linears``) count one MAC per **nonzero** weight
  (effective) or per weight (dense).
- lm_head counts dense (SD² keeps it dense); a trimmed-vocabulary head counts its K rows.
- Embedding lookups are not multiply-accumulates and count zero. That is how the Llama-3.2-3B
  figure of 3.213 G dense linear MACs per token comes out (28 decoder layers of 100.66 M plus a
  394 M lm_head), and 50% decoder sparsity then saves 43.87%.
- Attention-score MACs (QK^T and AV) grow with the context, so they are reported separately at a
  stated context length and not added to the totals.

Works on meta-device models built from a config alone (then every weight counts as nonzero, and
``decoder_sparsity`` can state a hypothetical sparsity).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from sd2.modeling import decoder_layers
from sd2.sparsity import decoder_linears, nonzeros


@dataclass
class MacCount:
    decoder_dense: int          # decoder linear MACs per token, every weight counted
    decoder_effective: int      # decoder linear MACs per token, nonzero weights only
    lm_head: int                # lm_head MACs per token (always dense)
    attention_per_token: int    # QK^T + AV MACs per new token at `context_len`
    context_len: int
    n_layers: int

    @property
    def dense(self) -> int:
        return self.decoder_dense + self.lm_head

    @property
    def effective(self) -> int:
        return self.decoder_effective + self.lm_head

    @property
    def decoder_sparsity(self) -> float:
        return 1.0 - self.decoder_effective / self.decoder_dense if self.decoder_dense else 0.0

    def ratio_to(self, other: "MacCount") -> float:
        """Effective MACs relative to another model's (e.g. drafter / target = the MAC-based c)."""
        return self.effective / other.effective

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(dense=self.dense, effective=self.effective, decoder_sparsity=round(self.decoder_sparsity, 6))
        return out


def count_macs(model: nn.Module, context_len: int = 1024, decoder_sparsity: float | None = None) -> MacCount:
    """Count a causal LM's per-token MACs (``linear_macs`` over its decoder linears). ``decoder_sparsity``
    overrides the measured sparsity (for configs)."""
    cfg, head = model.config, model.get_output_embeddings()
    n_heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head")
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd")
    return linear_macs(decoder_linears(model), head.weight.numel() if head is not None else 0, n_heads,
                       getattr(cfg, "head_dim", None) or hidden // n_heads, len(decoder_layers(model)[2]),
                       context_len, decoder_sparsity)


def linear_macs(linears, lm_head: int, n_heads: int, head_dim: int, n_layers: int, context_len: int = 1024,
                decoder_sparsity: float | None = None) -> MacCount:
    """The accounting for any drafter: ``linears`` (a drafter's prunable linear maps) count dense and by
    their nonzeros, the output layer (``lm_head`` weights) dense, attention scores apart."""
    dense = eff = 0
    for _, mod in linears:
        dense += mod.weight.numel()
        eff += nonzeros(mod.weight)
    if decoder_sparsity is not None:
        eff = round(dense * (1.0 - decoder_sparsity))
    return MacCount(dense, eff, lm_head, 2 * n_heads * head_dim * context_len * n_layers, context_len, n_layers)


def count_macs_from_config(config, context_len: int = 1024, decoder_sparsity: float | None = None) -> MacCount:
    """MACs of a model described only by its config, built on the meta device (no weights, no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return count_macs(model, context_len=context_len, decoder_sparsity=decoder_sparsity)


def layers_for_sparsity(model: nn.Module, sparsity: float) -> tuple[int, dict]:
    """How many decoder layers to keep so that a layer-pruned model has the decoder MACs of this
    model at ``sparsity`` (SD²'s equal-MACs comparison of layer pruning with unstructured sparsity).

    The budget is ``(1 - sparsity)`` times the model's effective decoder MACs; the layers are
    assumed alike (each the mean per-layer count), and the kept count is the one whose decoder MACs
    are nearest the budget (ties keep more layers). Returns (layers to keep, a record of the budget
    and the MACs reached). lm_head is outside the budget: both drafters keep it dense.
    """
    if not 0.0 < sparsity < 1.0:
        raise ValueError(f"sparsity must be in (0, 1), got {sparsity}")
    macs = count_macs(model)
    n = macs.n_layers
    per_layer = macs.decoder_effective / n
    budget = (1.0 - sparsity) * macs.decoder_effective
    keep = min(range(1, n + 1), key=lambda k: (abs(k * per_layer - budget), -k))
    return keep, {"match_sparsity": sparsity, "decoder_macs_budget": round(budget),
                  "decoder_macs_kept": round(keep * per_layer), "source_layers": n, "keep_layers": keep}
