"""Decoder-linear sparsity: the one definition that prune, finetune's mask, MAC counting, evaluate
and publish share.

"Decoder linear" means every linear map inside the decoder blocks (nn.Linear, and GPT-2's Conv1D),
found through ``sd2.modeling.decoder_layers`` whatever the layout (``model.layers``, GPT-2's
``transformer.h``, ...). These are the layers SD² prunes and counts by their nonzeros; lm_head and
the embeddings stay dense and are not part of it. Sparsity is the share of exact zeros.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from sd2.modeling import decoder_layers


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def decoder_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(parameter name of the weight, module) for every linear map inside the decoder blocks, in
    model order. The names are the model's own (``model.layers.0.mlp.up_proj.weight``,
    ``transformer.h.0.attn.c_attn.weight``), as in its state dict and safetensors files."""
    _, _, layers = decoder_layers(model)
    in_blocks = {id(m) for block in layers for m in block.modules()}
    return [(f"{name}.weight", mod) for name, mod in model.named_modules() if id(mod) in in_blocks and is_linear(mod)]


def nonzeros(w: torch.Tensor) -> int:
    """Nonzero entries; a meta tensor (a model built from a config) counts as fully dense."""
    return w.numel() if w.is_meta else int(torch.count_nonzero(w.detach()))


def measure(model: nn.Module) -> dict:
    """``measure_linears`` over the decoder linear layers of a causal LM."""
    return measure_linears(decoder_linears(model))


def measure_linears(linears: list[tuple[str, nn.Module]]) -> dict:
    """{"decoder_sparsity": share of exact zeros over all the given linear weights,
    "layers": {weight name: its own share}} (rounded to 6 digits per layer)."""
    layers, zeros, total = {}, 0, 0
    for name, mod in linears:
        w = mod.weight
        z = w.numel() - nonzeros(w)
        layers[name] = round(z / w.numel(), 6)
        zeros += z
        total += w.numel()
    return {"decoder_sparsity": zeros / total if total else 0.0, "layers": layers}
