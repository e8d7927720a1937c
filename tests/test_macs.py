"""sd2.macs against hand counts: tiny Llama, Qwen2 and GPT-2 (Conv1D), pruned models, and the
Llama-3.2-3B config behind SD²'s headline figure (meta device, no weights)."""

from __future__ import annotations

import pytest
import torch

from sd2.macs import count_macs, count_macs_from_config
from tiny import make_config

V = 320  # the tiny vocabulary


def build(arch: str, tie: bool = False):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(make_config(arch, V, n_layers=2, hidden=64, tie=tie))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_llama_and_qwen2_hand_count(arch):
    # hidden 64, 4 heads of 16, 2 kv heads (k, v: 64 -> 32), MLP 64 -> 128 (gate, up, down).
    per_layer = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 128
    assert per_layer == 36864
    macs = count_macs(build(arch), context_len=100)
    assert macs.n_layers == 2
    assert macs.decoder_dense == macs.decoder_effective == 2 * per_layer  # biases (Qwen2's q/k/v) are adds, not MACs
    assert macs.lm_head == V * 64
    assert macs.dense == 2 * per_layer + V * 64
    # QK^T and AV: 4 heads x 16 dims x 100 positions, twice, per layer
    assert macs.attention_per_token == 2 * 2 * 4 * 16 * 100


def test_gpt2_conv1d_hand_count():
    # c_attn 64 -> 192, c_proj 64 -> 64, c_fc 64 -> 256, mlp c_proj 256 -> 64; all Conv1D.
    per_layer = 64 * 192 + 64 * 64 + 64 * 256 + 256 * 64
    macs = count_macs(build("gpt2", tie=True), context_len=10)
    assert macs.decoder_dense == 2 * per_layer == 2 * 49152
    assert macs.lm_head == V * 64  # tied: the head still costs V x d
    assert macs.attention_per_token == 2 * 2 * 4 * 16 * 10


def test_pruned_model_counts_nonzeros_and_lm_head_stays_dense():
    model = build("llama")
    dense = count_macs(model)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[:, :32] = 0      # 64 x 32 = 2048 zeros
        model.model.layers[1].mlp.down_proj.weight.view(-1)[::4] = 0   # 8192 / 4 = 2048 zeros
        model.lm_head.weight[:100] = 0                                 # ignored: lm_head counts dense
    macs = count_macs(model)
    assert macs.decoder_dense == dense.decoder_dense
    assert macs.decoder_effective == dense.decoder_effective - 4096
    assert macs.lm_head == dense.lm_head == V * 64
    assert macs.effective == dense.effective - 4096
    assert macs.decoder_sparsity == pytest.approx(4096 / dense.decoder_dense)
    assert macs.ratio_to(dense) == pytest.approx(macs.effective / dense.effective)
    d = macs.to_dict()
    assert d["dense"] == macs.dense and d["effective"] == macs.effective and d["context_len"] == 1024


def llama_3_2_3b_config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                       num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=True)


def test_llama_3_2_3b_headline_figure():
    """SD²'s figure: 3.213 G dense linear MACs per token; 50% decoder sparsity with lm_head dense saves 43.87%."""
    cfg = llama_3_2_3b_config()
    dense = count_macs_from_config(cfg, context_len=1024)
    per_layer = 2 * 3072 * 3072 + 2 * 3072 * 1024 + 3 * 3072 * 8192
    assert dense.decoder_dense == 28 * per_layer == 2_818_572_288
    assert dense.lm_head == 128256 * 3072 == 394_002_432
    assert f"{dense.dense / 1e9:.4g}" == "3.213"
    sparse = count_macs_from_config(cfg, context_len=1024, decoder_sparsity=0.5)
    saving = 1 - sparse.effective / dense.effective
    assert f"{100 * saving:.4g}" == "43.87"
    assert sparse.lm_head == dense.lm_head
    # Attention scores at a 1024-token context: 2 (QK^T, AV) x 24 heads x 128 x 1024 x 28 layers,
    # reported apart from the totals.
    assert dense.attention_per_token == 2 * 24 * 128 * 1024 * 28 == 176_160_768
    assert dense.dense == dense.decoder_dense + dense.lm_head
