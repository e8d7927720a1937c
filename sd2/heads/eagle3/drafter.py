"""An EAGLE-3 head as the ``head`` drafter kind: ``Eagle3Drafter``, a HeadDrafter (sd2/heads/drafter.py)
whose module is an Eagle3Head.

What differs from the EAGLE-1/FSPAD heads: its output layer is its own K-row ``lm_head`` over the draft
vocabulary (``d2t`` offsets, ``t2d``), so ``d2t()`` gives the K target ids and ``trim_vocab`` is
refused (``draft_vocab_size`` sets K when the head is built); its prunable linears are fc (3H -> H),
feature sampling and the layers (layer 0's q/k/v read 2H); MACs add the K-row lm_head.
"""

from __future__ import annotations

import torch

from sd2.core.errors import Sd2Error
from sd2.heads.drafter import HeadDrafter
from sd2.macs import MacCount, linear_macs

# trim_vocab on an eagle3 head: a recipe error (sd2 validate) and a run-time one (Eagle3Drafter)
TRIM_REFUSED = ("an eagle3 head has its own K-row draft vocabulary (d2t/t2d, chosen when the head is built from the "
                "target's token frequencies on the distilled answers); trim_vocab does not apply: set the head's "
                "draft_vocab_size to the K you want instead")


def eagle3_macs(head, context_len: int = 1024) -> MacCount:
    """Per-token MACs (sd2.macs.linear_macs): fc [H, 3H], feature sampling and the layer(s) (layer 0's
    q/k/v over 2H) as "decoder", the K-row lm_head as lm_head."""
    c = head.head_config
    return linear_macs(prunable_linears(head), head.lm_head.weight.numel(), c.num_attention_heads, c.head_dim,
                       c.num_layers, context_len)


def prunable_linears(head) -> list[tuple[str, torch.nn.Linear]]:
    """Every Linear of the head but its output layer, in forward order: fc, feature sampling, layers."""
    return [(name, mod) for name, mod in head.linears() if name != "lm_head"]


class Eagle3Drafter(HeadDrafter):
    """The ``Drafter`` protocol for an EAGLE-3 head; ``target`` is the loaded target it reads."""

    def d2t(self):
        """[K] long: the target id of every draft id (absolute, as the Drafter protocol's d2t)."""
        return self.module.draft_to_target()

    def linears(self) -> list:
        return prunable_linears(self.module)

    def macs(self):
        return eagle3_macs(self.module)

    def trim_vocab(self, keep: list[int]) -> None:
        raise Sd2Error(TRIM_REFUSED)

    def prune_calibrated(self, config, samples: list[list[int]], ctx, out_dir) -> dict:
        """llm-compressor's per-layer SparseGPT / Wanda through the heads' own code (sd2.heads.drafter.
        prune_head): fc, feature sampling, then each layer, calibrated on the head's own inputs, the
        target's aux states of the distilled data (teacher-forced, step 0 of the training-time test).
        The K-row lm_head stays dense."""
        from importlib.metadata import version

        from sd2.heads.drafter import prune_head
        from sd2.heads.eagle3.train import row_states

        states = row_states(self.target, samples, self.module.head_config.aux_layers, final=False)
        rows = [(torch.tensor([r], dtype=torch.long), s[None]) for r, s in zip(samples, states)]
        prune_head(self.module, config.method, config.sparsity, config.nm, rows,
                   lambda it: ctx.progress(it, desc=f"prune eagle3 head ({config.method})", unit="group"),
                   linears=self.linears(), forward=_step0)
        return {"scope": "every eagle3 head Linear but its lm_head (fc, feature sampling, layers)",
                "calibration": {"samples": len(rows), "tokens": sum(ids.shape[1] for ids, _ in rows),
                                "code": f"llm-compressor {version('llmcompressor')} per-layer {config.method}, "
                                        "sequential over fc, feature sampling, layers"}}

    def training_task(self, config, rows_train, rows_val, pad_id: int, target, ctx):
        from sd2.heads.eagle3.train import Eagle3Task

        task = Eagle3Task(config, self.module, self.target, rows_train, rows_val, pad_id)
        ctx.log.info("finetune eagle3 head on %d conversations (%d held out): training-time test depth %d%s, decay %g, "
                     "%s over the %d-token draft vocabulary; target states %s", len(rows_train), len(rows_val),
                     task.depth, "" if config.ttt_depth else " (the default; EAGLE-3 uses 7)", config.ttt_decay,
                     config.loss, self.module.head_config.draft_vocab_size,
                     f"cached (up to {config.feature_cache_mb:g} MB)" if config.feature_cache_mb else "on the fly")
        return task

    def save(self, out_dir, extra_files: dict | None = None) -> None:
        """The head folder (eagle3/io.py); after finetune, ``extra["ttt"]`` records how it was trained."""
        import json

        from sd2.heads import io

        record = (extra_files or {}).get("finetune.json")
        if record is not None:
            cfg = json.loads(record)["config"]
            self.module.head_config.extra["ttt"] = {"depth": cfg.get("ttt_depth") or _default_depth(),
                                                    "decay": cfg.get("ttt_decay"), "loss": cfg.get("loss")}
        io.save(self.module, out_dir, self.tokenizer, extra_files)


def build(config, target_source, dataset, ctx) -> tuple[Eagle3Drafter, dict]:
    """A fresh EAGLE-3 head for the head stage (``config``: sd2.stages.head.Config) and what the stage
    records of its draft vocabulary.

    The K draft tokens are the target's most frequent in the distilled answers (``dataset``: a
    distill stage folder; tokens under the loss mask, ``choose_draft_vocab``), counted on 90% of the
    rows (a seeded split, as trim_vocab's) with the special and end-of-sequence ids always kept; the
    coverage of the answer tokens is measured on those rows and on the held-apart 10%. Raises
    Sd2Error naming the field for aux_layers the target lacks, K above its vocabulary, or no dataset."""
    from sd2 import vocab
    from sd2.core.models import load_model, load_tokenizer
    from sd2.data.dataset import load_distilled
    from sd2.heads.eagle3.draft_vocab import choose_draft_vocab
    from sd2.heads.eagle3.model import build as build_head
    from sd2.modeling import decoder_layers

    if dataset is None:
        raise Sd2Error("head.type: an eagle3 head chooses its draft vocabulary from the distilled answers: build it in a "
                       "branch after a top-level distill section, e.g. branches: {e3: [{head: {type: eagle3, "
                       "draft_vocab_size: 8192}}, {finetune: {...}}]}")
    target = load_model(target_source, device="cpu")
    tok = load_tokenizer(target_source)
    v = target.get_input_embeddings().weight.shape[0]
    n = len(decoder_layers(target)[2])
    from sd2.heads.eagle3.model import resolve_aux_layers

    try:
        resolve_aux_layers(config.aux_layers, n)
    except ValueError as e:
        raise Sd2Error(f"head.aux_layers: {e}") from None
    if config.draft_vocab_size > v:
        raise Sd2Error(f"head.draft_vocab_size = {config.draft_vocab_size} exceeds the target's vocabulary of {v} "
                       f"tokens; use at most {v}")
    data = load_distilled(dataset)
    fit, held = vocab.heldout_split(len(data), 0.1, ctx.seed)
    fit_data = data.select(fit)
    always = sorted(set(tok.all_special_ids) | ({tok.eos_token_id} if tok.eos_token_id is not None else set()))
    always = [t for t in always if t < v]
    vmap = choose_draft_vocab(fit_data["input_ids"], fit_data["loss_mask"], v, config.draft_vocab_size, always)
    head = build_head(target, vmap, config.aux_layers, config.num_layers, ctx.seed, bool(config.feature_sampling),
                      target_ref=target_source.ref, target_fingerprint=target_source.fingerprint)
    counts = vocab.token_counts(fit_data, v)
    held_counts = vocab.token_counts(data.select(held), v) if held else None
    stats = {"draft_vocab_size": vmap.k, "aux_layers": list(head.head_config.aux_layers),
             "distinct_target_tokens_seen": int((counts > 0).sum()),
             "coverage_fit": round(vocab.coverage(counts, vmap.keep), 6),
             "coverage_heldout": round(vocab.coverage(held_counts, vmap.keep), 6) if held_counts is not None else None}
    ctx.log.info("eagle3 draft vocabulary: %d of %d tokens, covering %.3f of the answer tokens (%s held apart); aux "
                 "layers %s", vmap.k, v, stats["coverage_fit"], stats["coverage_heldout"], stats["aux_layers"])
    return Eagle3Drafter(head, target, tok), stats


def _step0(head, ids: torch.Tensor, aux: torch.Tensor) -> None:
    """The head teacher-forced on the target's aux states (ids [1, L], aux [1, L, 3 H])."""
    t = ids.shape[1] - 1
    head(ids[:, 1:], head.fuse(aux[:, :-1]), torch.arange(t, device=ids.device)[None])


def _default_depth() -> int:
    from sd2.heads.eagle3.train import DEFAULT_DEPTH

    return DEFAULT_DEPTH
