"""Architecture-generic surgery on HF causal LMs: find the decoder layers, keep a subset of them,
give lm_head its own weights.

Used by the derive stage (a drafter from a subset of the target's layers), layer pruning, vocabulary
trimming (and its undoing in publish) and finetune's untie_embeddings.
"""

from __future__ import annotations

from typing import Sequence

import torch.nn as nn

# Where the decoder block list lives, by architecture family.
_LAYER_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers")


def decoder_layers(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """(parent module, attribute name, the ModuleList of decoder blocks)."""
    for path in _LAYER_PATHS:
        parent: object = model
        parts = path.split(".")
        for part in parts[:-1]:
            parent = getattr(parent, part, None)
            if parent is None:
                break
        layers = getattr(parent, parts[-1], None) if parent is not None else None
        if isinstance(layers, nn.ModuleList):
            return parent, parts[-1], layers
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}; supported layouts: {', '.join(_LAYER_PATHS)}")


def first_last_layers(n_layers: int, keep: int) -> list[int]:
    """The first keep-2 layers and the last 2: the layout the CPU calibration found least bad
    for a derived SmolLM2 drafter (the last layers map into the lm_head's space)."""
    if not 1 <= keep <= n_layers:
        raise ValueError(f"keep_layers must be in [1, {n_layers}], got {keep}")
    tail = min(2, keep - 1) if keep > 1 else 0
    return list(range(keep - tail)) + list(range(n_layers - tail, n_layers))


def keep_layers(model: nn.Module, keep: Sequence[int]) -> nn.Module:
    """Keep only the decoder layers ``keep`` (in order), in place, and renumber them so that the
    KV cache indexes them correctly. Returns the model."""
    parent, attr, layers = decoder_layers(model)
    n = len(layers)
    keep = list(keep)
    bad = [i for i in keep if not 0 <= i < n]
    if bad or len(set(keep)) != len(keep) or sorted(keep) != keep:
        raise ValueError(f"layers to keep must be distinct, increasing and in [0, {n}); got {keep}")
    new = nn.ModuleList([layers[i] for i in keep])
    for new_idx, block in enumerate(new):
        for mod in block.modules():
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = new_idx
    setattr(parent, attr, new)
    cfg = model.config
    cfg.num_hidden_layers = len(keep)
    layer_types = getattr(cfg, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == n:
        cfg.layer_types = [layer_types[i] for i in keep]
    return model


def untie_lm_head(model: nn.Module, head: nn.Module | None = None) -> nn.Module:
    """Give the model an lm_head of its own, in place: ``head`` when given (a trimmed or rebuilt
    head), else a trainable copy of the weights it shares with the input embeddings. Returns the model.

    Setting ``tie_word_embeddings = False`` is not enough in transformers 5.x: it re-ties on
    save/load through ``model._tied_weights_keys`` (a dict there, a list before), and a
    multimodal config keeps the flag on its text config too; all three are cleared here.
    """
    import torch

    if head is None:
        head = model.get_output_embeddings()
        head.weight = torch.nn.Parameter(head.weight.detach().clone())
    else:
        model.set_output_embeddings(head)
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False
    if getattr(model, "_tied_weights_keys", None):
        model._tied_weights_keys = {} if isinstance(model._tied_weights_keys, dict) else []
    return model
