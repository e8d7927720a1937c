"""The pipeline's stages applied to a head folder: build, prune, trim_vocab, MACs.

Each stage module checks ``sd2.heads.io.is_head(inputs.model)`` and calls in here, so a branch
reads the same for a head and for a causal LM (``- prune: {...}``, ``- trim_vocab: {...}``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sd2.heads import io
from sd2.heads.model import Head
from sd2.macs import MacCount


def head_macs(head: Head, context_len: int = 1024) -> MacCount:
    """Per-token MACs of a head: fc, feature sampling and the decoder layer(s) count as "decoder"
    (dense vs nonzero), the output layer (the target's lm_head, or the K-row trimmed one) as lm_head.
    The embedding lookup is free, as for any drafter (sd2/macs.py)."""
    dense = eff = 0
    for _, mod in head.linears():
        dense += mod.weight.numel()
        eff += int(torch.count_nonzero(mod.weight).item())
    c = head.head_config
    lm = head.get_output_embeddings().weight.numel()
    attention = 2 * c.num_attention_heads * c.head_dim * context_len * c.num_layers
    return MacCount(dense, eff, lm, attention, context_len, c.num_layers)


def build_stage(config, inputs, out_dir: Path, ctx) -> dict:
    from sd2.core.models import load_model, load_tokenizer

    target = load_model(inputs.target, device="cpu")
    tok = load_tokenizer(inputs.target)
    head = io.build(config.type, target, num_layers=config.layers, seed=ctx.seed, target_ref=inputs.target.ref,
                    target_fingerprint=inputs.target.fingerprint)
    io.save(head, out_dir, tok)
    macs = head_macs(head)
    params = sum(p.numel() for p in head.parameters())
    ctx.log.info("built a %s head over the target: %d layer(s), %.2f M parameters, %.1f M MACs/token (lm_head %.1f M)",
                 config.type, config.layers, params / 1e6, macs.effective / 1e6, macs.lm_head / 1e6)
    return {"head": config.type, "layers": config.layers, "parameters": params, "macs_per_token": macs.effective}


def _prune_groups(head: Head) -> list[list[tuple[str, torch.nn.Linear]]]:
    """The head's Linear layers in forward order, grouped as pruned in turn: fc, feature sampling,
    then each decoder layer (the unit of llm-compressor's sequential pipeline)."""
    groups: dict[str, list] = {}
    for name, mod in head.linears():
        parts = name.split(".")
        key = ".".join(parts[:3]) if parts[1] == "layers" else ".".join(parts[:2])
        groups.setdefault(key, []).append((name, mod))
    return list(groups.values())


def calibration_rows(target, dataset, calibration, seed: int, ctx) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(ids [1, L], the target's features [1, L, d]) of the prune calibration conversations (the
    distilled data's, drawn as for a causal LM), features per row as in training (``row_features``)."""
    from sd2.heads.features import row_features
    from sd2.stages.prune.calibration import calibration_samples

    rows = calibration_samples(dataset, calibration.samples, calibration.seq_len, seed, ctx)
    return [(torch.tensor([r], dtype=torch.long), f[None]) for r, f in zip(rows, row_features(target, rows))]


def calibrate(head: Head, rows, modules: list[tuple[str, torch.nn.Linear]], method: str) -> dict:
    """One pass of the head over the calibration rows, teacher-forced on the target's real features,
    with a forward hook on each of ``modules`` that feeds its input to llm-compressor's own
    accumulator: SparseGPT's Hessian 2 X X^T / n (``accumulate_hessian``) or Wanda's per-column
    ||X_j||^2 / n (``accumulate_row_scalars``). Returns {module: statistic}, as the library's
    ``sparsify_weight`` reads it."""
    from sd2.heads.features import head_inputs

    if method == "sparsegpt":
        from llmcompressor.modifiers.pruning.sparsegpt.sgpt_sparsify import accumulate_hessian as acc
        from llmcompressor.modifiers.pruning.sparsegpt.sgpt_sparsify import make_empty_hessian as empty
    else:
        from llmcompressor.modifiers.pruning.wanda.wanda_sparsify import accumulate_row_scalars as acc
        from llmcompressor.modifiers.pruning.wanda.wanda_sparsify import make_empty_row_scalars as empty

    stats = {mod: empty(mod) for _, mod in modules}
    seen = {mod: 0 for _, mod in modules}

    def hook(mod, args, _out):
        stats[mod], seen[mod] = acc(args[0].detach(), mod, stats[mod], seen[mod])

    hooks = [mod.register_forward_hook(hook) for _, mod in modules]
    try:
        with torch.no_grad():
            for ids, feats in rows:
                if ids.shape[1] >= 2:
                    head(*head_inputs(ids, feats))
    finally:
        for h in hooks:
            h.remove()
    return stats


def sparsify(modules: list[tuple[str, torch.nn.Linear]], stats: dict, method: str, sparsity: float,
             nm: tuple[int, int] | None) -> None:
    """Prune each module in place with llm-compressor's own per-layer algorithm on its calibrated
    statistic: SparseGPT's OBS column sweep (``sgpt_sparsify.sparsify_weight``, the modifier's
    default block_size and dampening_frac) or Wanda's |w| * ||x|| per output row (``wanda_sparsify.
    sparsify_weight``). ``nm`` (N, M) zeroes N of every M weights along the input dimension."""
    n, m = nm if nm is not None else (0, 0)
    with torch.no_grad():
        for _, mod in modules:
            if method == "sparsegpt":
                from llmcompressor.modifiers.pruning import SparseGPTModifier
                from llmcompressor.modifiers.pruning.sparsegpt.sgpt_sparsify import sparsify_weight

                fields = SparseGPTModifier.model_fields
                _, w = sparsify_weight(mod, stats, sparsity, n, m, fields["block_size"].default,
                                       fields["dampening_frac"].default, preserve_sparsity_mask=False)
            else:
                from llmcompressor.modifiers.pruning.wanda.wanda_sparsify import sparsify_weight

                w = sparsify_weight(mod, stats, sparsity, n, m)
            mod.weight.copy_(w)


def prune_head(head: Head, method: str, sparsity: float, nm: tuple[int, int] | None, rows=None, progress=None) -> None:
    """Prune every head Linear in place. sparsegpt/wanda: group by group (``_prune_groups``), each
    calibrated on ``rows`` (``calibration_rows``) through the head as pruned so far, as
    llm-compressor's sequential pipeline does for a causal LM's layers; magnitude: data-free."""
    from sd2.stages.prune.magnitude import magnitude_mask

    if method == "magnitude":
        with torch.no_grad():
            for _, mod in head.linears():
                mod.weight.mul_(magnitude_mask(mod.weight, sparsity, nm).to(mod.weight.dtype))
        return
    groups = _prune_groups(head)
    for group in (progress(groups) if progress is not None else groups):
        sparsify(group, calibrate(head, rows, group, method), method, sparsity, nm)


def prune_stage(config, inputs, out_dir: Path, ctx) -> dict:
    """Unstructured or N:M sparsity on every head Linear (fc, feature sampling, decoder layers).

    sparsegpt and wanda: llm-compressor's own per-layer code (``calibrate``, ``sparsify``), on the
    head run teacher-forced on the target's real features of the distilled data, group by group as
    its sequential pipeline does (fc, feature sampling, each layer; a group is calibrated on the
    outputs of the groups already pruned). llm-compressor's ``oneshot`` itself drives a causal LM's
    forward, which a head is not. magnitude: the smallest |w| (data-free, as for a causal LM)."""
    from sd2.core.errors import Sd2Error
    from sd2.core.models import load_model, load_tokenizer

    if config.method not in ("sparsegpt", "wanda", "magnitude"):
        raise Sd2Error(f"prune.method {config.method or 'recipe'!r} does not apply to a feature-level head "
                       "(it has no stack of decoder layers to remove, and a raw recipe needs a causal LM); "
                       "use method: sparsegpt, wanda or magnitude")
    hc = io.read_config(inputs.model)
    target = load_model(hc.target, device="cpu")
    head = io.load(inputs.model, target)
    nm = config.nm
    if nm is not None:
        bad = [(name, mod.weight.shape[1]) for name, mod in head.linears() if mod.weight.shape[1] % nm[1]]
        if bad:
            raise Sd2Error(f"cannot apply mask_structure {config.mask_structure} to {bad[0][0]}: its input "
                           f"dimension {bad[0][1]} is not a multiple of {nm[1]}")
    rows = None
    if config.method != "magnitude":
        seed = config.calibration.seed if config.calibration.seed is not None else ctx.seed
        rows = calibration_rows(target, inputs.dataset, config.calibration, seed, ctx)
    prune_head(head, config.method, config.sparsity, nm, rows,
               lambda it: ctx.progress(it, desc=f"prune head ({config.method})", unit="group"))
    total = zeros = 0
    for _, mod in head.linears():
        total += mod.weight.numel()
        zeros += int((mod.weight == 0).sum())
    sparsity = zeros / total if total else 0.0
    io.save(head, out_dir, load_tokenizer(inputs.model))
    macs = head_macs(head)
    sp_json = {"method": config.method, "structure": config.mask_structure, "target_sparsity": config.sparsity,
               "decoder_sparsity": sparsity, "scope": "every head Linear (fc, feature sampling, layers)"}
    if config.method != "magnitude":
        sp_json["calibration"] = {"samples": len(rows), "tokens": sum(ids.shape[1] for ids, _ in rows),
                                  "code": f"llm-compressor {_llmc_version()} per-layer {config.method}, "
                                          "sequential over fc, feature sampling, layers"}
    (Path(out_dir) / "sparsity.json").write_text(json.dumps(sp_json, indent=2))
    ctx.log.info("pruned the head (%s): %.2f%% of its linear weights are zero; %.1f M MACs/token (dense %.1f M)",
                 config.method, 100 * sparsity, macs.effective / 1e6, macs.dense / 1e6)
    return {"decoder_sparsity": round(sparsity, 6), "macs_per_token": macs.effective, "dense_macs_per_token": macs.dense}


def _llmc_version() -> str:
    from importlib.metadata import version

    return version("llmcompressor")


def trim_stage(config, inputs, out_dir: Path, ctx) -> dict:
    """A K-row head output layer (the target's lm_head rows of the kept tokens) with ``d2t``."""
    from sd2 import vocab
    from sd2.data.dataset import load_distilled
    from sd2.core.models import load_model, load_tokenizer
    from sd2.stages.trim_vocab import _coverage, _split, choose_tokens

    hc = io.read_config(inputs.model)
    target = load_model(hc.target, device="cpu")
    head = io.load(inputs.model, target)
    tok = load_tokenizer(inputs.model)
    before = head_macs(head)
    full_v = hc.vocab_size
    data = load_distilled(inputs.dataset)
    fit_rows, held_rows = _split(len(data), config.heldout, ctx.seed)
    counts = vocab.token_counts(data.select(fit_rows), full_v)
    held = vocab.token_counts(data.select(held_rows), full_v) if held_rows else None
    always = sorted(set(tok.all_special_ids) | ({tok.eos_token_id} if tok.eos_token_id is not None else set()))
    if head.d2t is not None:
        allowed = torch.zeros(full_v, dtype=torch.bool)
        allowed[head.d2t] = True
        counts = counts * allowed
        always = [t for t in always if allowed[t]]
    keep = choose_tokens(counts, config.k, config.coverage, always)
    if head.d2t is not None:   # trim further: rows of the current K-row layer
        pos = {int(t): i for i, t in enumerate(head.d2t.tolist())}
        w = head.lm_head.weight.detach()[[pos[t] for t in keep]]
        head.trim(keep)
        with torch.no_grad():
            head.lm_head.weight.copy_(w)
    else:
        head.trim(keep)
    io.save(head, out_dir, tok)
    src = Path(inputs.model.ref) / "sparsity.json"
    if src.is_file():
        (Path(out_dir) / "sparsity.json").write_text(src.read_text())
    after = head_macs(head)
    keep_t = torch.tensor(keep)
    stats = {"draft_vocab_size": len(keep), "full_vocab_size": full_v,
             "coverage_fit": round(_coverage(counts, keep_t), 6),
             "coverage_heldout": round(_coverage(held, keep_t), 6) if held is not None else None,
             "macs_per_token_before": before.effective, "macs_per_token_after": after.effective,
             "mac_saving": round(1 - after.effective / before.effective, 6)}
    (Path(out_dir) / "vocab_stats.json").write_text(json.dumps(stats, indent=2))
    ctx.log.info("trimmed the head's output layer to %d tokens; coverage %.3f (fit) / %s (held apart); MACs -%.1f%%",
                 len(keep), stats["coverage_fit"], stats["coverage_heldout"], 100 * stats["mac_saving"])
    return {k: stats[k] for k in ("draft_vocab_size", "coverage_fit", "coverage_heldout", "mac_saving")}
