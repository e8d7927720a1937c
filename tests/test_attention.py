"""sd2_sdpa (sd2/attention.py): grouped-query attention without repeating the KV heads gives
transformers' sdpa results, on a left-padded batch, in prefill and in cached decoding."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from sd2.attention import NAME, use_grouped_sdpa
from sd2.kvcache import growing_cache
from tiny import make_model


def test_grouped_sdpa_equals_transformers_sdpa_on_a_padded_batch(tmp_path, tokenizer):
    folder = make_model(tmp_path / "m", "llama", n_layers=2, seed=4, tokenizer=tokenizer)
    ref = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa").eval()
    ours = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa").eval()
    assert ref.config.num_key_value_heads < ref.config.num_attention_heads   # grouped heads: the case that matters
    assert use_grouped_sdpa(ours) and ours.config._attn_implementation == NAME
    torch.manual_seed(0)
    ids = torch.randint(3, len(tokenizer), (3, 9))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0                     # left padding
    mask[1, :1] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    outs = []
    with torch.no_grad():
        for model in (ref, ours):
            cache = growing_cache(model.config, reserve=4)
            pre = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache).logits
            m, p, steps = mask, pos[:, -1:], []
            tok = pre[:, -1].argmax(-1, keepdim=True)
            for _ in range(3):
                m = torch.cat([m, m.new_ones(3, 1)], 1)
                p = p + 1
                logits = model(input_ids=tok, attention_mask=m, position_ids=p, past_key_values=cache).logits
                steps.append(logits)
                tok = logits[:, -1].argmax(-1, keepdim=True)
            outs.append((pre, torch.cat(steps, 1)))
    real = mask.bool()
    torch.testing.assert_close(outs[1][0][real], outs[0][0][real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=1e-5, atol=1e-5)


def test_models_not_on_sdpa_are_left_alone(tmp_path, tokenizer):
    folder = make_model(tmp_path / "m", "llama", n_layers=1, seed=4, tokenizer=tokenizer)
    eager = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
    assert not use_grouped_sdpa(eager) and eager.config._attn_implementation == "eager"
