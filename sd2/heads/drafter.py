"""Drafter kind ``head``: a feature-level head as the ``Drafter`` protocol (sd2/drafters/__init__.py)
that prune, trim_vocab, finetune and evaluate work through, and the head stage's build.

Its prunable linears are every head Linear (fc, feature sampling, decoder layers); its MACs those
plus its output layer (``head_macs``); vocabulary trimming gives it its own K-row output layer
(``Head.trim``); calibrated pruning runs llm-compressor's per-layer SparseGPT / Wanda on the head
teacher-forced on the target's features (``prune_head``); its training task is ``HeadTask``
(train.py). Every head type (eagle, fspad, and the next) is this one kind.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sd2.core.errors import Sd2Error
from sd2.core.models import load_model, load_tokenizer
from sd2.heads import io
from sd2.heads.export import VLLM_CHECKED, vllm_snippet
from sd2.heads.drafting import drafting
from sd2.heads.features import chain_rounds, head_inputs, row_features
from sd2.heads.model import Head
from sd2.heads.proposer import HeadProposer
from sd2.heads.train import HeadTask
from sd2.macs import MacCount, linear_macs
from sd2.mal import teacher_forced_stats
from sd2.train.losses import target_to_draft_map


def head_macs(head: Head, context_len: int = 1024) -> MacCount:
    """Per-token MACs of a head (sd2.macs.linear_macs): fc, feature sampling and the decoder layer(s)
    as "decoder", the output layer (the target's lm_head, or the K-row trimmed one) as lm_head."""
    c = head.head_config
    return linear_macs(head.linears(), head.get_output_embeddings().weight.numel(), c.num_attention_heads,
                       c.head_dim, c.num_layers, context_len)


def _prune_groups(linears) -> list[list[tuple[str, torch.nn.Linear]]]:
    """A head's Linear layers (name, module) in forward order, grouped as pruned in turn: fc, feature
    sampling, then each decoder layer (the unit of llm-compressor's sequential pipeline)."""
    groups: dict[str, list] = {}
    for name, mod in linears:
        parts = name.removeprefix("model.").split(".")
        key = ".".join(parts[:2]) if parts[0] == "layers" else parts[0]
        groups.setdefault(key, []).append((name, mod))
    return list(groups.values())


def _teacher_forced(head: Head, ids: torch.Tensor, feats: torch.Tensor) -> None:
    head(*head_inputs(ids, feats))


def calibrate(head: Head, rows, modules: list[tuple[str, torch.nn.Linear]], method: str, forward=_teacher_forced) -> dict:
    """One pass of the head over the calibration rows, teacher-forced on the target's real features
    (``forward(head, ids, feats)``; an EAGLE-3 head's reads its aux states),
    with a forward hook on each of ``modules`` that feeds its input to llm-compressor's own
    accumulator: SparseGPT's Hessian 2 X X^T / n (``accumulate_hessian``) or Wanda's per-column
    ||X_j||^2 / n (``accumulate_row_scalars``). Returns {module: statistic}, as the library's
    ``sparsify_weight`` reads it."""
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
                    forward(head, ids, feats)
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


def prune_head(head: Head, method: str, sparsity: float, nm: tuple[int, int] | None, rows, progress=None,
               linears=None, forward=_teacher_forced) -> None:
    """Prune every head Linear (``linears``, default ``head.linears()``) in place (sparsegpt or wanda):
    group by group (``_prune_groups``), each calibrated on ``rows`` ((ids [1, L], features [1, L, d])
    pairs; ``forward`` runs the head on one) through the head as pruned so far, as llm-compressor's
    sequential pipeline does for a causal LM's layers."""
    groups = _prune_groups(head.linears() if linears is None else linears)
    for group in (progress(groups) if progress is not None else groups):
        sparsify(group, calibrate(head, rows, group, method, forward), method, sparsity, nm)


def recognizes(folder: Path) -> bool:
    return io.is_head(folder)


def load(source, target=None, device: str = "cpu", dtype=None) -> "HeadDrafter":
    """The head at ``source`` bound to ``target``: a loaded model, a ModelSource, or None (the
    target its config.json names)."""
    io.check(source)                       # before the target loads
    if target is None and not io.read_config(source).target:
        raise Sd2Error(f"{getattr(source, 'ref', source)}/config.json names no target; give the target model")
    if not isinstance(target, torch.nn.Module):
        target = load_model(target or io.read_config(source).target, device=device, dtype=dtype)
    return drafter_for(io.load(source, target, device=device, dtype=dtype), target, load_tokenizer(source))


def drafter_for(head, target, tokenizer) -> "HeadDrafter":
    """The HeadDrafter of a loaded head: an Eagle3Drafter (a HeadDrafter) for an EAGLE-3 head."""
    if head.head_config.type == "eagle3":
        from sd2.heads.eagle3.drafter import Eagle3Drafter

        return Eagle3Drafter(head, target, tokenizer)
    return HeadDrafter(head, target, tokenizer)


def usage_snippets(target: str, d, gamma: int, hub_id: str | None = None) -> dict[str, str]:
    """A feature-level head reads the target's hidden states: it is no transformers ``assistant_model``.
    sd2's engine runs every type; vLLM runs an untrimmed EAGLE head after ``sd2 publish`` exports it to
    vLLM's EAGLE layout (sd2.heads.export), and a single-layer EAGLE-3 head without feature sampling
    after ``sd2 publish`` exports it to the speculators layout (sd2.heads.eagle3.export); nothing in
    vLLM runs an FSPAD head."""
    kind = d.settings.get("head", "head")
    sd2_cmd = f"sd2 eval --target {target} --drafter {kind}={d.path} --gamma {gamma}"
    out = {"sd2": f"# A {kind.upper()} head runs beside its target in sd2's engine (greedy is lossless):\n{sd2_cmd}\n"}
    if kind == "eagle3":
        from sd2.heads.eagle3.export import VLLM_CHECKED as E3_CHECKED
        from sd2.heads.eagle3.export import vllm_unsupported

        why = vllm_unsupported(io.read_config(d.path)) if io.is_head(d.path) else None
        export = f"{d.path.rstrip('/')}-vllm"
        out["vllm"] = (f"# vLLM ({E3_CHECKED}) cannot run this head: it has {why}. Use sd2:\n# {sd2_cmd}\n" if why else
                       f"# Export to the speculators layout vLLM loads (checked against {E3_CHECKED}) first:\n"
                       f"#   sd2 publish {d.path} --repo-id you/head --dry-run --out {export}\n"
                       + vllm_snippet(hub_id or target, export, gamma, method="eagle3"))
        return out
    if kind == "eagle" and not d.vocab:
        export = f"{d.path.rstrip('/')}-vllm"
        out["vllm"] = (f"# Export to vLLM's EAGLE layout (checked against {VLLM_CHECKED}) first:\n"
                       f"#   sd2 publish {d.path} --repo-id you/head --dry-run --out {export}\n"
                       + vllm_snippet(hub_id or target, export, gamma))
    else:
        out["vllm"] = (f"# Nothing in vLLM ({VLLM_CHECKED}) runs this head: vLLM's EAGLE-1 loader takes untrimmed "
                       f"EAGLE heads only. Use sd2:\n# {sd2_cmd}\n")
    return out


def build(head_type: str, layers: int, target_source, seed: int) -> "HeadDrafter":
    """A fresh head of ``head_type`` with ``layers`` decoder layers over the target (the head stage)."""
    target = load_model(target_source, device="cpu")
    head = io.build(head_type, target, num_layers=layers, seed=seed, target_ref=target_source.ref,
                    target_fingerprint=target_source.fingerprint)
    return HeadDrafter(head, target, load_tokenizer(target_source))


def build_from(config, target_source, dataset, ctx) -> tuple["HeadDrafter", dict]:
    """The head stage's build (``config``: sd2.stages.head.Config) and what it records: an eagle3 head
    reads the distilled ``dataset`` for its draft vocabulary (sd2/heads/eagle3/drafter.py)."""
    if config.type == "eagle3":
        from sd2.heads.eagle3.drafter import build as build_eagle3

        return build_eagle3(config, target_source, dataset, ctx)
    return build(config.type, config.num_layers, target_source, ctx.seed), {}


class HeadDrafter:
    """The ``Drafter`` protocol for a head; ``target`` is the loaded target it reads."""

    kind = "head"

    def __init__(self, head: Head, target, tokenizer):
        self.module, self.target, self.tokenizer = head, target, tokenizer
        self.vocab_size = head.head_config.vocab_size

    def d2t(self):
        return self.module.d2t

    def linears(self) -> list:
        return list(self.module.linears())

    def macs(self):
        return head_macs(self.module)

    def sparsity(self) -> dict:
        from sd2.sparsity import measure_linears

        return measure_linears(self.linears())

    def trim_vocab(self, keep: list[int]) -> None:
        head = self.module
        if head.d2t is None:
            head.trim(keep)
            return
        pos = {int(t): i for i, t in enumerate(head.d2t.tolist())}     # trim further: rows of the K-row layer
        w = head.lm_head.weight.detach()[[pos[t] for t in keep]]
        head.trim(keep)
        with torch.no_grad():
            head.lm_head.weight.copy_(w)

    def prune_calibrated(self, config, samples: list[list[int]], ctx, out_dir: Path) -> dict:
        """llm-compressor's own per-layer SparseGPT / Wanda (``calibrate``, ``sparsify``) on the head run
        teacher-forced on the target's real features of the distilled data, group by group as its
        sequential pipeline does (fc, feature sampling, each layer; a group is calibrated on the
        outputs of the groups already pruned). llm-compressor's ``oneshot`` itself drives a causal
        LM's forward, which a head is not."""
        from importlib.metadata import version

        # (ids [1, L], the target's features [1, L, d]) per conversation, the features as in training
        feats = row_features(self.target, samples)
        rows = [(torch.tensor([r], dtype=torch.long), f[None]) for r, f in zip(samples, feats)]
        prune_head(self.module, config.method, config.sparsity, config.nm, rows,
                   lambda it: ctx.progress(it, desc=f"prune head ({config.method})", unit="group"))
        return {"scope": "every head Linear (fc, feature sampling, layers)",
                "calibration": {"samples": len(rows), "tokens": sum(ids.shape[1] for ids, _ in rows),
                                "code": f"llm-compressor {version('llmcompressor')} per-layer {config.method}, "
                                        "sequential over fc, feature sampling, layers"}}

    def wants_topk(self, config) -> bool:
        return False    # the teacher is the target's lm_head on its own features

    def training_task(self, config, rows_train, rows_val, pad_id: int, target, ctx):
        hc = self.module.head_config
        for name in ("ttt_depth", "ttt_decay"):
            if getattr(config, name) != type(config).model_fields[name].default:
                raise Sd2Error(f"finetune.{name} sets an eagle3 head's training-time test; this is an {hc.type} head, "
                               "which unrolls on its own predicted features with finetune.unroll (= ttt_depth - 1)")
        ctx.log.info("finetune %s head on %d conversations (%d held out): %s x SmoothL1 + %s x %s, target features %s",
                     hc.type, len(rows_train), len(rows_val), config.feature_weight, config.logit_weight, config.loss,
                     f"cached (up to {config.feature_cache_mb:g} MB)" if config.feature_cache_mb else "on the fly")
        return HeadTask(config, self.module, self.target, rows_train, rows_val,
                        target_to_draft_map(self.module.d2t, hc.vocab_size))

    def save(self, out_dir: Path, extra_files: dict | None = None) -> None:
        io.save(self.module, out_dir, self.tokenizer, extra_files)

    # -- evaluate: a drafter bound to the target it reads ------------------------------------------
    def settings(self) -> dict:
        return {"head": self.module.head_config.type}

    def proposer(self, eos, name: str):
        return HeadProposer(self.module, eos, name)

    def teacher_forced_mal(self, target, requests, greedy_ref: dict, gammas: list[int],
                           max_new_tokens: int | None = None) -> dict:
        """{gamma: MalStats}: the head's exact greedy chain rounds on the target's greedy answers
        (features.chain_rounds): one target forward for the features the engine hands this head
        type (``drafting(head).target_features``: the last hidden state, or EAGLE-3's aux states),
        then the head's rounds simulated with the hidden states it feeds itself."""
        device = next(target.parameters()).device
        d = drafting(self.module)

        def rounds_for(req, resp):
            ids = list(req.ids) + list(resp)
            feats = d.target_features(target, torch.tensor([ids], device=device))
            return lambda g: chain_rounds(self.module, ids, feats, [(len(req.ids), len(ids))], g, max_new_tokens)[0]

        with torch.inference_mode():
            return teacher_forced_stats(requests, greedy_ref, gammas, rounds_for)
