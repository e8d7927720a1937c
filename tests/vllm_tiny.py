"""Tiny models vLLM's CPU backend can serve: its attention kernels take head sizes 32, 64, 80, ...
only, so these Llamas have hidden 64 and 2 heads of 32 (1 KV head), unlike tests/tiny.py's 16."""

from __future__ import annotations

from pathlib import Path

VLLM_ENV = {"OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CPU_KVCACHE_SPACE": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def llama32(folder, tokenizer, n_layers: int = 2, seed: int = 0, damp: float | None = 0.1) -> Path:
    """A random Llama (hidden 64, 2 heads of 32, 1 KV head) saved with ``tokenizer``. ``damp``: embeddings
    x5 and attention/MLP writes x damp (as tests/tiny.learnable_target, which damps by 0.3), so a head
    learns it within a test and a drafter made of its first layer agrees with it often (at 0.1 and
    γ=3: acceptance 0.45 for that drafter, 0.36 for an EAGLE head after 150 steps; 0.10 and 0.08 at 0.3)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
                      tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
        if damp is not None:
            model.model.embed_tokens.weight.mul_(5.0)
            for layer in model.model.layers:
                layer.self_attn.o_proj.weight.mul_(damp)
                layer.mlp.down_proj.weight.mul_(damp)
    folder = Path(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def eos_llama32(folder, tokenizer, seed: int = 0) -> Path:
    """``llama32`` (undamped) whose answers end on <|im_end|> at times and run to the limit at others: its
    eos row of lm_head is pushed along the final norm's weight, as tests/test_distill.py's eos_target."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = llama32(folder, tokenizer, seed=seed, damp=None)
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        w = model.lm_head.weight
        w[tokenizer.eos_token_id] += 1.2 * w[tokenizer.eos_token_id].norm() * torch.nn.functional.normalize(
            model.model.norm.weight, dim=0)
    model.save_pretrained(folder)
    return folder


def first_layers(target_folder, folder, keep: int = 1) -> Path:
    """A standalone drafter: the target's first ``keep`` layers with its embeddings, norm and lm_head."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(target_folder)
    model.model.layers = model.model.layers[:keep]
    model.config.num_hidden_layers = keep
    folder = Path(folder)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(target_folder).save_pretrained(folder)
    return folder


def _rows(n: int, seed: int, length: int = 36):
    """Random token rows (ids 3..299) with a 6-token prompt, as finetune Rows."""
    import torch

    from sd2.train.batches import Rows

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 300, (n, length), generator=g).tolist()
    return Rows(ids, [[0] * 6 + [1] * (length - 6) for _ in ids], None, None, ["none"] * n)


def build_pair(tmp, tokenizer, gamma: int = 3) -> dict:
    """{"target", "drafter", "eagle"} folders: the target (llama32), its first layer as a standalone
    drafter, and an EAGLE-1 head trained on it for 150 steps (sd2's head trainer), as sd2 head folders."""
    from transformers import AutoModelForCausalLM

    from sd2.core.context import standalone_context
    from sd2.heads import io
    from sd2.heads.train import train_head
    from sd2.stages.finetune import Config

    tmp = Path(tmp)
    tfold = llama32(tmp / "target", tokenizer)
    target = AutoModelForCausalLM.from_pretrained(tfold).eval()
    head = io.build("eagle", target, seed=0, target_ref=str(tfold))
    cfg = Config(loss="fkl", lr=1e-2, max_steps=150, batch_size=16, checkpoint_every=0, mal_gamma=gamma,
                 feature_noise=0.02)
    (tmp / "train").mkdir()
    train_head(cfg, head, target, _rows(256, 0), _rows(8, 1), 0, tmp / "train", standalone_context(tmp / "train"),
               cfg.model_dump(mode="json"))
    return {"target": tfold, "drafter": first_layers(tfold, tmp / "drafter", keep=1),
            "eagle": io.save(head.eval(), tmp / "eagle", tokenizer)}
