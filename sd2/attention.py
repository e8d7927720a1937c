"""Scaled dot-product attention that keeps grouped-query attention grouped when there is a mask.

transformers' "sdpa" attention (5.x, integrations/sdpa_attention.py) hands grouped KV heads to
``torch.nn.functional.scaled_dot_product_attention`` with ``enable_gqa=True`` only on CUDA/NPU and
only without an attention mask; on CPU, and whenever there is a mask (any left-padded batch), it
first copies every layer's whole KV cache ``num_attention_heads / num_key_value_heads`` times
(``repeat_kv``). SmolLM2 has 9 query heads over 3 KV heads, so each batched decode step copied the
cache three times over, layer by layer. torch's own SDPA takes the grouped heads and a boolean mask
directly (``enable_gqa=True``; its CPU kernel gives the same numbers as on the repeated heads:
tests/test_attention.py), so this module registers that as the attention implementation
``"sd2_sdpa"``, with transformers' sdpa mask. Batch-1 decoding without padding was never affected.

Measured on a 2-core Xeon (benchmarks/results/distill_throughput.json and its note).
"""

from __future__ import annotations

NAME = "sd2_sdpa"
_registered = False


def sdpa_gqa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' attention-function signature. query [b, H, q, d]; key/value [b, KV, k, d] with
    KV dividing H; attention_mask None or boolean [b, 1, q, k] (True = attend). Returns
    ([b, q, H, d], None)."""
    import torch

    causal = query.shape[2] > 1 and attention_mask is None and (is_causal if is_causal is not None
                                                                  else getattr(module, "is_causal", True))
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout if module.training else 0.0,
        is_causal=causal, scale=scaling, enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Register ``"sd2_sdpa"`` with transformers (once) and return the name."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface, AttentionMaskInterface
        from transformers.masking_utils import sdpa_mask

        AttentionInterface.register(NAME, sdpa_gqa)
        AttentionMaskInterface.register(NAME, sdpa_mask)
        _registered = True
    return NAME


def use_grouped_sdpa(model) -> bool:
    """Switch a model that runs transformers' "sdpa" to "sd2_sdpa", in place. Models on another
    implementation (eager, flash) or that cannot switch are left alone. Returns whether it switched."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    if not getattr(model, "_can_set_attn_implementation", lambda: False)():
        return False
    model.set_attn_implementation(register())
    return model.config._attn_implementation == NAME
