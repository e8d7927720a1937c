"""Tiny models and data built inside the tests: no network, seconds on CPU.

- ``make_tokenizer``: a byte-level BPE tokenizer trained here, with a ChatML chat template
  (SmolLM2's format), eos ``<|im_end|>`` and pad ``<|endoftext|>``.
- ``make_model``: a random tiny Llama / Qwen2 / GPT-2 saved as a safetensors folder with that tokenizer.
- ``write_mtbench``: a question.jsonl in the MT-bench / Spec-Bench format.
- ``tiny_llama`` and ``chi2_pvalue``: a one-layer Llama over a handful of tokens, whose exact output
  distribution can be enumerated, and the chi-square test that compares sampled outputs with it.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "speculative decoding drafts tokens and the target verifies them",
    "a small sparse drafter agrees with the target model",
    "write a short story about a robot who learns to paint",
    "what is the capital of france? paris is the capital of france",
    "def add(a, b):\n    return a + b\n",
    "compute 12 + 30 = 42 and 7 * 6 = 42",
    "user assistant system hello world thank you please explain",
]


def make_tokenizer(vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_config(arch: str, vocab_size: int, n_layers: int = 2, hidden: int = 64, eos_id: int = 2, pad_id: int = 0, tie: bool = False):
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, eos_token_id=eos_id, pad_token_id=pad_id, bos_token_id=None)
    if arch == "llama":
        return LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=n_layers,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                           tie_word_embeddings=tie, **common)
    if arch == "qwen2":
        return Qwen2Config(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=n_layers,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                           tie_word_embeddings=tie, **common)
    if arch == "gpt2":
        return GPT2Config(n_embd=hidden, n_layer=n_layers, n_head=4, n_positions=512, tie_word_embeddings=tie, **common)
    raise ValueError(arch)


def make_model(folder: str | Path, arch: str = "llama", n_layers: int = 2, hidden: int = 64, seed: int = 0,
               tokenizer=None, tie: bool = False) -> Path:
    """A random tiny causal LM saved with its tokenizer; returns the folder."""
    import torch
    from transformers import AutoModelForCausalLM

    tok = tokenizer or make_tokenizer()
    cfg = make_config(arch, len(tok), n_layers, hidden, tok.eos_token_id, tok.pad_token_id, tie)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    # Larger-than-default init makes a random model's distribution peaky, so greedy outputs vary by prompt.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    folder = Path(folder)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_mtbench(path: str | Path, n: int = 4, turns: int = 2) -> Path:
    cats = ["writing", "coding", "math", "reasoning"]
    rows = [{"question_id": 81 + i, "category": cats[i % len(cats)],
             "turns": [f"question {i}: {CORPUS[i % len(CORPUS)]}", f"follow up {i}: explain more"][:turns]}
            for i in range(n)]
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _permute_qk(w, n_head: int, n_kv: int):
    """llama.cpp's q/k row order (transformers reverses it when loading a GGUF)."""
    if n_kv != n_head:
        n_head = n_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model_folder: str | Path, gguf_path: str | Path, source_repo: str | None = None) -> Path:
    """Write a tiny Llama folder (from make_model) as an F32 GGUF file, tokenizer included,
    the way llama.cpp's converter lays it out; ``source_repo`` sets general.source.huggingface.repository."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file
    from transformers import AutoConfig, AutoTokenizer

    folder = Path(model_folder)
    cfg = AutoConfig.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    sd = load_file(str(folder / "model.safetensors"))
    w = gguf.GGUFWriter(str(gguf_path), "llama")
    if source_repo:
        w.add_string("general.source.huggingface.repository", source_repo)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]) if getattr(cfg, "rope_parameters", None) else 10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list([t for t, _ in vocab])
    special = set(tok.all_special_tokens)
    w.add_token_types([3 if t in special else 1 for t, _ in vocab])
    import json as _json
    merges = _json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(tok.convert_tokens_to_ids("<|im_start|>"))  # as in SmolLM2's GGUF
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_chat_template(tok.chat_template)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"].astype(np.float32))
    w.add_tensor("output_norm.weight", sd["model.norm.weight"].astype(np.float32))
    if "lm_head.weight" in sd:
        w.add_tensor("output.weight", sd["lm_head.weight"].astype(np.float32))
    for i in range(cfg.num_hidden_layers):
        for hf, gg in names.items():
            t = sd[f"model.layers.{i}.{hf}.weight"].astype(np.float32)
            if gg == "attn_q":
                t = _permute_qk(t, cfg.num_attention_heads, cfg.num_attention_heads)
            elif gg == "attn_k":
                t = _permute_qk(t, cfg.num_attention_heads, cfg.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{gg}.weight", t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(gguf_path)


def random_prompts(n: int, vocab: int, seed: int = 0, length: int = 6) -> list[list[int]]:
    """n prompts of random ids in [3, vocab), lengths length, length+1, ... (ids 0-2 are specials)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (length + i,), generator=g).tolist() for i in range(n)]


def tiny_llama(vocab: int, seed: int, scale: float = 0.6, hidden: int = 16, layers: int = 1, max_positions: int = 32):
    """A random Llama (default: one layer, hidden 16) over ``vocab`` tokens, no special tokens, in eval mode.
    ``scale`` is the std of every weight matrix: larger makes its next-token distributions peakier."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=max_positions,
                      bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, scale)
    return model


def chi2_pvalue(counts, dist: dict, n: int) -> float:
    """Pearson chi-square of ``counts`` (outcome -> count, n draws) against the exact ``dist`` (outcome ->
    probability), bins of expected count < 5 pooled; the p-value by the Wilson-Hilferty approximation."""
    stat, dof, pool_o, pool_e = 0.0, -1, 0, 0.0
    for key, p in dist.items():
        e = n * p
        if e < 5:
            pool_o, pool_e = pool_o + counts.get(key, 0), pool_e + e
            continue
        stat += (counts.get(key, 0) - e) ** 2 / e
        dof += 1
    if pool_e > 0:
        stat += (pool_o - pool_e) ** 2 / pool_e
        dof += 1
    z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


def learnable_target(folder, n_layers: int = 2):
    """A tiny Llama target (2 layers unless told, hidden 64) that a small feature-level head can learn within a test."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = make_model(folder, n_layers=n_layers, hidden=64)
    model = AutoModelForCausalLM.from_pretrained(folder)
    # A tiny target a small head can learn within a test: embeddings on the scale of the normed
    # features and damped attention/MLP writes (its next token still depends on the context).
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(5.0)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(0.3)
            layer.mlp.down_proj.weight.mul_(0.3)
    return model.eval()


def greedy_rows(target, n_rows: int, seed: int, prompt_len: int = 6, answer: int = 30):
    """The tiny target's own greedy answers to random prompts, as finetune Rows."""
    import torch

    from sd2.train.batches import Rows

    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(3, 300, (n_rows, prompt_len), generator=g)
    with torch.no_grad():
        for _ in range(answer):
            seq = torch.cat([seq, target(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    ids = seq.tolist()
    mask = [[0] * prompt_len + [1] * answer for _ in ids]
    return Rows(ids, mask, None, None, ["none"] * n_rows)


class KilledAfterCheckpoint(Exception):
    """Raised inside :func:`killed_after_checkpoint` right after a checkpoint is written."""


@contextlib.contextmanager
def killed_after_checkpoint():
    """A training run cut right after its first checkpoint (a kill -9 there), in process: inside the
    block, sd2.train's ``checkpoint.save`` writes the checkpoint, then raises KilledAfterCheckpoint,
    which must come out of the block (a block that never checkpoints fails the test)."""
    import pytest

    import sd2.train as T

    real = T.checkpoint.save

    def save_then_stop(*args, **kw):
        real(*args, **kw)
        raise KilledAfterCheckpoint

    T.checkpoint.save = save_then_stop
    try:
        with pytest.raises(KilledAfterCheckpoint):
            yield
    finally:
        T.checkpoint.save = real
