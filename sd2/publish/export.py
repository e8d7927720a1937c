"""The Hub-ready folder: weights, config, tokenizer, sparsity.json and the model card.

Built in a temporary sibling folder and renamed into place only when complete, so an interrupted
export never leaves a folder that looks finished. A full-vocabulary drafter is copied file by file
(bit-exact weights); a trimmed-vocabulary drafter is rewritten with a full-vocabulary lm_head
(sd2/publish/untrim.py), because plain transformers and vLLM cannot load a K-row head.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from sd2.core.errors import Sd2Error
from sd2.publish.select import Selection
from sd2.core.paths import expand

# What a published model folder holds; everything else in a stage folder (manifest, checkpoints,
# draft_to_target.json of a trimmed drafter, logs) stays behind.
ALLOW = ["*.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json", "tokenizer.json",
         "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
         "tokenizer.model", "chat_template.jinja", "chat_template.json", "sparsity.json"]
SPARSITY = "sparsity.json"
VOCAB_INFO = "sd2_vocab.json"


@dataclass
class Exported:
    folder: Path
    files: list[str]
    sparsity: float                                   # measured decoder-linear sparsity of the exported weights
    untrimmed: dict | None = None                     # what untrim() did, for a trimmed-vocabulary drafter
    notes: list[str] = field(default_factory=list)


def build(sel: Selection, dest: Path, card_fn, target_name: str = "") -> Exported:
    """Write the folder for ``sel`` at ``dest`` (which must not exist, or be empty).
    ``card_fn(exported) -> str`` renders README.md once the weights are in place. ``target_name`` is
    the target as a reader of the card can find it (a head's config names its target; never a local path)."""
    dest = expand(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise Sd2Error(f"--out {dest} exists and is not empty; give a new folder or delete it first")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        exp = _fill(sel, tmp, target_name)
        (tmp / "README.md").write_text(card_fn(exp))
        exp.files = sorted(p.name for p in tmp.iterdir())
        if dest.exists():
            dest.rmdir()
        os.replace(tmp, dest)
        exp.folder = dest
        return exp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fill(sel: Selection, tmp: Path, target_name: str = "") -> Exported:
    from sd2 import vocab

    src = sel.model_dir
    untrimmed = None
    from sd2.heads.io import is_head

    if is_head(src):
        return _fill_head(src, tmp, target_name)
    if (src / vocab.MAP_FILE).is_file():
        from sd2.core.models import load_model, load_tokenizer, save_model
        from sd2.publish.untrim import untrim

        model, tok = load_model(src), load_tokenizer(src)
        untrimmed = untrim(model, tok)
        _restore_dtype(model, src)
        save_model(model, tok, tmp)
        kept = untrimmed.pop("kept_ids")
        (tmp / VOCAB_INFO).write_text(json.dumps({**untrimmed, "kept_target_ids": kept}, indent=1))
        if (src / SPARSITY).is_file():
            shutil.copy2(src / SPARSITY, tmp / SPARSITY)
    else:
        for p in sorted(src.iterdir()):
            if p.is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in ALLOW):
                shutil.copy2(p, tmp / p.name)
    if not any(tmp.glob("tokenizer*")):
        raise Sd2Error(f"{src} holds no tokenizer files (tokenizer.json / tokenizer_config.json); a published "
                       f"drafter must carry the tokenizer it was trained with. Save it there with "
                       f"tokenizer.save_pretrained")
    sparsity, per_tensor = measure_sparsity(tmp)
    notes = []
    if not (tmp / SPARSITY).is_file():
        (tmp / SPARSITY).write_text(json.dumps({
            "measured_by": "sd2 publish", "decoder_linear_sparsity": sparsity, "structure": None,
            "note": "the source folder had no sparsity.json (a dense drafter); measured from the weights",
            "per_tensor": per_tensor}, indent=1))
        notes.append("sparsity.json was measured from the weights (the source folder had none)")
    return Exported(tmp, [], sparsity, untrimmed, notes)


def _fill_head(src: Path, tmp: Path, target_name: str) -> Exported:
    """A head. An untrimmed EAGLE head goes out in vLLM's EAGLE layout (sd2/heads/export.py); any other
    head (FSPAD, trimmed, fc with a bias), which nothing in vLLM loads, goes out as sd2's own head
    folder (docs/heads.md), which ``sd2 eval`` runs. Either way the config names the target by
    ``target_name``, not by the folder it was trained against."""
    from sd2.heads import io
    from sd2.heads.eagle3.export import vllm_unsupported as eagle3_unsupported
    from sd2.heads.export import vllm_unsupported, write_vllm_eagle

    hc = io.read_config(src)
    why_not = eagle3_unsupported(hc) if hc.type == "eagle3" else vllm_unsupported(hc)
    if hc.type == "eagle3" and why_not is None:
        return _fill_eagle3(src, tmp, target_name)
    if why_not is None:
        write_vllm_eagle(src, tmp)
        note = "an EAGLE head in vLLM's EAGLE layout: load it in vLLM with method 'eagle' over its target"
    else:
        shutil.copy2(src / io.WEIGHTS, tmp / io.WEIGHTS)
        shutil.copy2(src / "config.json", tmp / "config.json")
        note = (f"an sd2 {hc.type.upper()} head folder (vLLM cannot run it: it has {why_not}); it runs in sd2's engine: "
                f"sd2 eval --target TARGET --drafter {hc.type}=THIS_FOLDER")
    cfg = json.loads((tmp / "config.json").read_text())
    cfg[io.CONFIG_KEY]["target"] = target_name or "the target model"
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    return _head_files(src, tmp, note)


def _fill_eagle3(src: Path, tmp: Path, target_name: str) -> Exported:
    """An EAGLE-3 head vLLM can run: the speculators layout (sd2/heads/eagle3/export.py), verifier
    ``target_name`` (one it cannot run goes out as sd2's own head folder, as in ``_fill_head``)."""
    from sd2.heads.eagle3 import export as e3

    try:
        cfg = e3.export_folder(src, tmp, target_name or "the target model")
    except ValueError as e:
        raise Sd2Error(f"{src}: {e}") from None
    cfg[e3.CONFIG_KEY]["target"] = target_name or "the target model"     # never the local folder it read
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    note = (f"an EAGLE-3 head in the speculators layout ({e3.VLLM_CHECKED}): vLLM loads it with method 'eagle3' "
            "over its target")
    return _head_files(src, tmp, note)


def _head_files(src: Path, tmp: Path, note: str) -> Exported:
    """The rest of a head's export once its weights and config are in ``tmp``: the tokenizer files and
    sparsity record copied from ``src``, and the sparsity of its weights (lm_head excluded)."""
    from sd2.heads import io

    for p in sorted(src.iterdir()):
        if p.is_file() and p.name.startswith(("tokenizer", "special_tokens", "chat_template")) or p.name == SPARSITY:
            shutil.copy2(p, tmp / p.name)
    w = [t for k, t in load_file_2d(tmp / io.WEIGHTS) if not k.endswith("lm_head.weight")]
    sparsity = round(sum(int((t == 0).sum()) for t in w) / max(1, sum(t.numel() for t in w)), 6)
    return Exported(tmp, [], sparsity, None, [note])


def load_file_2d(path: Path) -> list:
    """(name, tensor) of the 2-d tensors of a safetensors file."""
    from safetensors.torch import load_file

    return [(k, t) for k, t in load_file(str(path)).items() if t.dim() == 2]


def measure_sparsity(folder: Path) -> tuple[float, dict[str, float]]:
    """Decoder-linear sparsity of the weights in ``folder`` (sd2.sparsity, the definition prune and
    evaluate use, whatever the layout: Llama's ``model.layers.N``, GPT-2's ``transformer.h.N``, ...)."""
    from sd2.core.models import load_model
    from sd2.sparsity import measure

    m = measure(load_model(folder))
    return round(m["decoder_sparsity"], 6), m["layers"]


def _restore_dtype(model, src: Path) -> None:
    """load_model loads fp32; publish in the dtype the drafter was saved in."""
    import torch

    cfg = json.loads((src / "config.json").read_text())
    name = cfg.get("dtype") or cfg.get("torch_dtype")
    dtype = getattr(torch, str(name), None) if name else None
    if isinstance(dtype, torch.dtype) and dtype != torch.float32:
        model.to(dtype)
