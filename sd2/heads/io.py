"""A head on disk: a self-describing folder, and loading it back bound to its target.

Folder layout (docs/heads.md):
- ``config.json``: ``{"sd2_head": <HeadConfig>}``: head type, sizes, and the target it reads
  (``target``: folder or hub id; ``target_fingerprint``).
- ``model.safetensors``: the head's own weights (``model.fc.weight``, ``model.layers.0...``; a
  trimmed head adds ``lm_head.weight`` [K, d] and ``d2t`` [K]). The target's embeddings and full
  lm_head are NOT stored: they are the target's, shared and frozen.
- the target's tokenizer files (a head reads and writes target token ids).

An EAGLE-3 head (``type: eagle3``) has the same layout with its own config and tensors
(sd2/heads/eagle3/io.py); ``read_config``, ``load`` and ``save`` here dispatch on the type.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sd2.heads.model import Head, HeadConfig

CONFIG_KEY = "sd2_head"
WEIGHTS = "model.safetensors"


def is_head(folder) -> bool:
    """True when ``folder`` (a path or ModelSource) is a head folder."""
    ref = getattr(folder, "ref", folder)
    cfg = Path(str(ref)) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return CONFIG_KEY in json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError):
        return False


def read_config(folder):
    """The folder's head config: a HeadConfig, or an Eagle3Config for ``type: eagle3``."""
    ref = getattr(folder, "ref", folder)
    d = json.loads((Path(str(ref)) / "config.json").read_text())[CONFIG_KEY]
    if d.get("type") == "eagle3":
        from sd2.heads.eagle3.io import config_of

        return config_of(d)
    return HeadConfig.from_dict(d)


def build(head_type: str, target_model, num_layers: int = 1, seed: int = 0, target_ref: str = "",
          target_fingerprint: str = "", fc_bias: bool | None = None) -> Head:
    """A freshly initialised head for ``target_model`` (an HF causal LM).

    Init: Linear layers use torch's default; the fc's feature half starts near the identity (plus its
    default init scaled by 0.1) so that a fresh head already passes the target's own feature through
    (f_t predicts x_{t+1}, a useful start for predicting f_{t+1}). No weight starts at exactly zero:
    finetune holds every exact zero of a head's Linear layers as a pruning mask."""
    cfg = HeadConfig.for_target(head_type, target_model.config, num_layers, fc_bias, target_ref, target_fingerprint)
    torch.manual_seed(seed)
    head = Head(cfg, target_model.get_input_embeddings(), target_model.get_output_embeddings())
    d = cfg.hidden_size
    with torch.no_grad():
        head.model.fc.weight[:, d:].mul_(0.1).add_(torch.eye(d))
        head.model.fc.weight[:, :d].mul_(0.1)
        if head.model.fc.bias is not None:
            head.model.fc.bias.zero_()
    return head


def save(head: Head, out_dir, tokenizer=None, extra_files: dict | None = None) -> Path:
    from safetensors.torch import save_file

    meta = {"format": "pt", "sd2": "head"}
    if head.head_config.type == "eagle3":
        head.draft_vocab()                       # d2t and t2d agree, or ValueError before writing
        meta["type"] = "eagle3"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}, str(out / WEIGHTS), metadata=meta)
    (out / "config.json").write_text(json.dumps({CONFIG_KEY: head.head_config.to_dict()}, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    for name, content in (extra_files or {}).items():
        (out / name).write_text(content)
    return out


def check(folder) -> Path:
    """The head folder's path, after checking without loading anything that it exists, is an sd2
    head (config.json with ``sd2_head``) and holds its weights. Raises Sd2Error naming what is wrong."""
    from sd2.core.errors import Sd2Error

    ref = Path(str(getattr(folder, "ref", folder)))
    if not ref.is_dir():
        raise Sd2Error(f"head folder not found: {ref}")
    if not is_head(ref):
        raise Sd2Error(f"{ref} is not an sd2 head folder (its config.json has no {CONFIG_KEY!r}); give a head "
                       "stage's output folder")
    if not (ref / WEIGHTS).is_file():
        raise Sd2Error(f"head {ref} has no {WEIGHTS}: an unfinished or damaged head folder; rerun the stage "
                       "that wrote it")
    return ref


def load(folder, target_model, device: str = "cpu", dtype=None) -> Head:
    """The head of ``folder`` bound to ``target_model`` (a loaded causal LM; sd2.heads.drafter.load
    also finds the target the config names): a Head, or an Eagle3Head for ``type: eagle3``. Raises
    Sd2Error when its sizes do not match the head's."""
    from safetensors.torch import load_file

    from sd2.core.errors import Sd2Error, reading

    ref = check(folder)
    cfg = read_config(ref)
    if cfg.type == "eagle3":
        from sd2.heads.eagle3 import io as eagle3_io

        return eagle3_io.load(ref, target_model, device, dtype)
    emb = target_model.get_input_embeddings()
    if emb.weight.shape != (cfg.vocab_size, cfg.hidden_size):
        raise Sd2Error(f"head {ref} reads a target with embeddings [{cfg.vocab_size}, {cfg.hidden_size}], but the "
                       f"given target has {list(emb.weight.shape)}: pair the head with the target it was built for "
                       f"({cfg.target or 'see config.json'})")
    head = Head(cfg, emb, target_model.get_output_embeddings())
    with reading(f"the head weights {ref / WEIGHTS}", "a safetensors file", "rerun the stage that wrote it"):
        sd = load_file(str(ref / WEIGHTS))
    missing, unexpected = head.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise Sd2Error(f"{ref}/{WEIGHTS} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    head.to(device=device, dtype=dtype or torch.float32)
    if head.d2t is not None:
        head.d2t = head.d2t.long()
    return head.eval()
