"""An EAGLE-3 head on disk: sd2's own head folder, the same layout as every head's, written by sd2.heads.io.save.

- ``config.json``: ``{"sd2_head": <Eagle3Config>}`` with ``type: "eagle3"``, the sizes, ``aux_layers``
  (the target hidden states fc fuses), ``draft_vocab_size`` (K), ``num_layers``, ``feature_sampling``,
  ``target`` / ``target_fingerprint``, and in ``extra`` what finetune recorded of its training
  (``extra["ttt"] = {"depth": D, "decay": r, "loss": ...}``; absent on a fresh head).
- ``model.safetensors``: every tensor of the head's state dict: ``fc.weight`` [H, 3 H_target],
  ``layers.*``, ``norm.weight``, ``lm_head.weight`` [K, H], and the draft vocabulary ``d2t`` [K] long
  (offsets: target id = draft id + d2t[draft id]) and ``t2d`` [V] bool. The target's embeddings are
  not stored (shared, frozen).
- the target's tokenizer files.

This is not the speculators layout vLLM loads: ``sd2 publish`` writes that one (export.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sd2.heads.eagle3.model import Eagle3Config, Eagle3Head

CONFIG_KEY = "sd2_head"      # the key every sd2 head folder has (sd2.heads.io.is_head)
WEIGHTS = "model.safetensors"
TYPE = "eagle3"


def config_of(d: dict) -> Eagle3Config:
    """The Eagle3Config of a folder's ``config.json["sd2_head"]`` (its aux layers re-validated)."""
    return Eagle3Config.from_dict(d)


def load(folder, target_model, device: str = "cpu", dtype=None) -> Eagle3Head:
    """The EAGLE-3 head of ``folder`` bound to ``target_model``'s embeddings, in eval mode.

    Raises Sd2Error naming the folder when the target's embeddings or decoder layer count differ
    from the head's, or when the weights do not match the config or their d2t and t2d disagree."""
    from safetensors.torch import load_file

    from sd2.core.errors import Sd2Error, reading
    from sd2.modeling import decoder_layers

    ref = Path(str(getattr(folder, "ref", folder)))
    with reading(f"the head config {ref / 'config.json'}", "an sd2 head config", "rerun the stage that wrote it"):
        d = json.loads((ref / "config.json").read_text())[CONFIG_KEY]
    try:
        c = config_of(d)
    except (TypeError, ValueError) as e:
        raise Sd2Error(f"{ref}/config.json: not a valid EAGLE-3 head config ({e}); rerun the stage that wrote it") from None
    emb = target_model.get_input_embeddings()
    if tuple(emb.weight.shape) != (c.vocab_size, c.hidden_size):
        raise Sd2Error(f"head {ref} reads a target with embeddings [{c.vocab_size}, {c.hidden_size}], but the given "
                       f"target has {list(emb.weight.shape)}: pair the head with the target it was built for "
                       f"({c.target or 'see config.json'})")
    n = len(decoder_layers(target_model)[2])
    if n != c.target_num_layers:
        raise Sd2Error(f"head {ref} fuses layers {list(c.aux_layers)} of a {c.target_num_layers}-layer target, but the "
                       f"given target has {n} decoder layers: pair the head with its own target ({c.target or 'see config.json'})")
    head = Eagle3Head(c, emb)
    with reading(f"the head weights {ref / WEIGHTS}", "a safetensors file", "rerun the stage that wrote it"):
        sd = load_file(str(ref / WEIGHTS))
    missing, unexpected = head.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise Sd2Error(f"{ref}/{WEIGHTS} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    try:
        head.draft_vocab()
    except ValueError as e:
        raise Sd2Error(f"{ref}/{WEIGHTS}: {e}; rerun the stage that wrote it") from None
    head.to(device=device, dtype=dtype or torch.float32)
    return head.eval()
