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


def _calibration_norms(head: Head, target, dataset, samples: int, seq_len: int, seed: int, ctx) -> dict[str, torch.Tensor]:
    """Wanda's input statistic ||X_j||_2 per input column of every head Linear, over the head run on
    the target's real features of the calibration rows (teacher-forced, as in training)."""
    from sd2.heads.features import head_inputs, target_features
    from sd2.stages.prune.calibration import calibration_samples

    rows = calibration_samples(dataset, samples, seq_len, seed, ctx)
    sq: dict[str, torch.Tensor] = {}
    hooks = []
    for name, mod in head.linears():
        def hook(m, args, _out, name=name):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sq[name] = sq.get(name, 0) + (x * x).sum(0)
        hooks.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for r in rows:
                ids = torch.tensor([list(r)], dtype=torch.long)
                if ids.shape[1] < 2:
                    continue
                feats = target_features(target, ids)
                head(*head_inputs(ids, feats))
    finally:
        for h in hooks:
            h.remove()
    return {k: v.sqrt() for k, v in sq.items()}


def prune_stage(config, inputs, out_dir: Path, ctx) -> dict:
    """Unstructured or N:M sparsity on every head Linear (fc, feature sampling, layers).

    magnitude: smallest |w|; wanda: smallest |w| * ||x||_2 per output row (Sun et al. 2023), with the
    activations of the head run on the target's real features of the distilled data. SparseGPT is
    not implemented for heads (llm-compressor's oneshot drives a causal LM's own forward); the stage
    says so rather than substituting silently."""
    from sd2.core.errors import Sd2Error
    from sd2.core.models import load_model, load_tokenizer
    from sd2.stages.prune.magnitude import magnitude_mask

    if config.method not in ("magnitude", "wanda"):
        raise Sd2Error(f"prune.method {config.method or 'recipe'!r} is not available for a feature-level head; "
                       "use method: wanda (calibrated on the target's features) or magnitude")
    hc = io.read_config(inputs.model)
    target = load_model(hc.target, device="cpu")
    head = io.load(inputs.model, target)
    norms = None
    if config.method == "wanda":
        seed = config.calibration.seed if config.calibration.seed is not None else ctx.seed
        norms = _calibration_norms(head, target, inputs.dataset, config.calibration.samples,
                                   config.calibration.seq_len, seed, ctx)
    total = zeros = 0
    with torch.no_grad():
        for name, mod in head.linears():
            w = mod.weight
            score = w.abs() * norms[name][None, :] if norms is not None else w
            if norms is not None and config.nm is None:
                # Wanda compares weights within each output row
                k = int(round(config.sparsity * w.shape[1]))
                keep = torch.ones_like(w, dtype=torch.bool)
                if k:
                    keep.scatter_(1, torch.topk(score, k, dim=1, largest=False).indices, False)
            else:
                try:
                    keep = magnitude_mask(score, config.sparsity, config.nm)
                except ValueError as e:
                    raise Sd2Error(f"cannot apply mask_structure {config.mask_structure} to {name}: {e}") from None
            w.mul_(keep.to(w.dtype))
            total += w.numel()
            zeros += int((w == 0).sum())
    sparsity = zeros / total if total else 0.0
    io.save(head, out_dir, load_tokenizer(inputs.model))
    macs = head_macs(head)
    sp_json = {"method": config.method, "structure": config.mask_structure, "target_sparsity": config.sparsity,
               "decoder_sparsity": sparsity, "scope": "every head Linear (fc, feature sampling, layers)"}
    (Path(out_dir) / "sparsity.json").write_text(json.dumps(sp_json, indent=2))
    ctx.log.info("pruned the head (%s): %.2f%% of its linear weights are zero; %.1f M MACs/token (dense %.1f M)",
                 config.method, 100 * sparsity, macs.effective / 1e6, macs.dense / 1e6)
    return {"decoder_sparsity": round(sparsity, 6), "macs_per_token": macs.effective, "dense_macs_per_token": macs.dense}


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
