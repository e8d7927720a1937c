"""Exporting an EAGLE head in the layout vLLM loads for ``speculative_config={"method": "eagle"}``.

Checked against vLLM's ``vllm/model_executor/models/llama_eagle.py`` at commit 00da92319af4
(``EagleLlamaForCausalLM``, the EAGLE-1 path of vLLM v1). Its loader reads:
- ``fc.weight`` [d, 2d]; the module is ``Linear(2d, d, bias=False)``, and weights it does not know
  are skipped silently, so a head whose fc has a bias cannot be exported (sd2 builds eagle heads
  without one for this reason);
- ``layers.{i}.self_attn.{q,k,v,o}_proj.weight``, ``layers.{i}.mlp.{gate,up,down}_proj.weight``,
  ``layers.{i}.post_attention_layernorm.weight``, and ``layers.{i}.input_layernorm.weight`` for
  i > 0 (layer 0's input norm is an identity, as in EAGLE);
- no final norm: the last layer's output (hidden + residual) is both the next feature and what the
  target's lm_head reads; ``embed_tokens`` and ``lm_head`` are shared from the target when absent.
- ``config.json``: a Llama config (``model_type: llama``, ``architectures: [LlamaForCausalLM]``,
  hidden_size, intermediate_size, num_hidden_layers = the head's layers, num_attention_heads,
  num_key_value_heads, head_dim, rms_norm_eps, rope_theta, vocab_size); vLLM wraps it into its
  EAGLE config and picks ``EagleLlamaForCausalLM``.
Nothing in vLLM runs an FSPAD head (its feature sampling block and 2d-wide MLP have no loader), nor
an EAGLE-1 head with a trimmed output layer; sd2 runs both (docs/heads.md).
"""

from __future__ import annotations

import json
from pathlib import Path

from sd2.core.errors import Sd2Error

VLLM_CHECKED = "vLLM commit 00da92319af4 (vllm/model_executor/models/llama_eagle.py)"


def vllm_eagle_tensors(head_cfg, layers: int | None = None) -> dict[str, tuple[int, ...]]:
    """The documented loader contract: tensor name -> shape, for a head config."""
    d, h, kv, hd, inter = (head_cfg.hidden_size, head_cfg.num_attention_heads, head_cfg.num_key_value_heads,
                           head_cfg.head_dim, head_cfg.intermediate_size)
    out: dict[str, tuple[int, ...]] = {"fc.weight": (d, 2 * d)}
    for i in range(layers if layers is not None else head_cfg.num_layers):
        p = f"layers.{i}."
        if i > 0:
            out[p + "input_layernorm.weight"] = (d,)
        out.update({p + "self_attn.q_proj.weight": (h * hd, d), p + "self_attn.k_proj.weight": (kv * hd, d),
                    p + "self_attn.v_proj.weight": (kv * hd, d), p + "self_attn.o_proj.weight": (d, h * hd),
                    p + "mlp.gate_proj.weight": (inter, d), p + "mlp.up_proj.weight": (inter, d),
                    p + "mlp.down_proj.weight": (d, inter), p + "post_attention_layernorm.weight": (d,)})
    return out


def vllm_unsupported(head_cfg) -> str | None:
    """Why vLLM's EAGLE-1 loader cannot run this head, or None when it can."""
    if head_cfg.type != "eagle":
        return f"an {head_cfg.type.upper()} head: nothing in vLLM runs it ({VLLM_CHECKED} loads EAGLE-1 heads only)"
    if head_cfg.draft_vocab_size is not None:
        return (f"a trimmed output layer ({head_cfg.draft_vocab_size} rows + d2t): vLLM's EAGLE-1 loader shares the "
                "target's full lm_head and has no d2t; export the head before trim_vocab")
    if head_cfg.fc_bias:
        return ("an fc with a bias, which vLLM's EAGLE-1 fc (bias=False) would silently drop; build the eagle head "
                "without one (the default)")
    return None


def check_exportable(head_cfg, folder) -> None:
    why = vllm_unsupported(head_cfg)
    if why is not None:
        cmd = f"sd2 eval --target {head_cfg.target or '<target>'} --drafter {head_cfg.type}={folder}"
        raise Sd2Error(f"{folder} has {why}. Generate with it through sd2's engine: `{cmd}`")


def write_vllm_eagle(src: Path, dest: Path) -> dict:
    """Write ``config.json`` and ``model.safetensors`` for vLLM at ``dest``; returns the config."""
    import torch
    from safetensors.torch import load_file, save_file

    from sd2.heads import io

    cfg = io.read_config(src)
    check_exportable(cfg, src)
    sd = load_file(str(Path(src) / io.WEIGHTS))
    out = {k.removeprefix("model."): v.contiguous() for k, v in sd.items()}
    want = vllm_eagle_tensors(cfg)
    if set(out) != set(want) or any(tuple(out[k].shape) != want[k] for k in want):
        raise Sd2Error(f"{src}: the head's tensors do not match vLLM's EAGLE layout (extra {sorted(set(out) - set(want))[:4]}, "
                       f"missing {sorted(set(want) - set(out))[:4]})")
    save_file({k: out[k].to(torch.float32) for k in want}, str(dest / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta, "vocab_size": cfg.vocab_size,
        "max_position_embeddings": 8192, "hidden_act": "silu", "tie_word_embeddings": False,
        "torch_dtype": "float32", "bias": False,
        "sd2_head": {"type": cfg.type, "target": cfg.target, "checked_against": VLLM_CHECKED},
    }
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    return config


def vllm_snippet(target_id: str, head_id: str, gamma: int, method: str = "eagle") -> str:
    return (f"from vllm import LLM, SamplingParams\n\n"
            f"llm = LLM(model={json.dumps(target_id)},\n"
            f"          speculative_config={{\"model\": {json.dumps(head_id)}, \"method\": \"{method}\", "
            f"\"num_speculative_tokens\": {gamma}}})\n"
            f"print(llm.generate([\"Explain speculative decoding.\"], SamplingParams(temperature=0, max_tokens=128))"
            f"[0].outputs[0].text)\n")
