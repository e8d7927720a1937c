"""Tiny models and data built inside the tests: no network, seconds on CPU.

- ``make_tokenizer``: a byte-level BPE tokenizer trained here, with a ChatML chat template
  (SmolLM2's format), eos ``<|im_end|>`` and pad ``<|endoftext|>``.
- ``make_model``: a random tiny Llama / Qwen2 / GPT-2 saved as a safetensors folder with that tokenizer.
- ``write_mtbench``: a question.jsonl in the MT-bench / Spec-Bench format.
"""

from __future__ import annotations

import json
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
