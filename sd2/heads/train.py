"""Training a head on the distilled data, on the target's features (on the fly, or from a cache).

What is a head's own: its loss (``HeadLoss``), where its inputs come from (``features.StateSource``) and
its validation (``validate_head``), plugged into the one training loop (sd2/train/loop.py: batches,
schedule, AdamW, the mask, checkpoints and resume, accelerate) as ``HeadTask``. Each row's features
come from its own unpadded target forward (features.py says why), computed per step, or once into
a cache in the run folder with ``feature_cache_mb`` (feature_cache.py); both train bit-identically.

Loss at every response position (docs/heads.md):
  feature_weight * SmoothL1(predicted f_{t+1}, f_{t+1})  +  logit_weight * L_logits,
where L_logits is CE on the target's token (``loss: ce``) or a divergence from the target's
distribution softmax(lm_head(f_{t+1})) (``loss: fkl`` is the soft cross-entropy of EAGLE/FSPAD, up
to the target's entropy). Options: uniform noise U(-a, a) on the input features (EAGLE), and
``unroll`` extra passes that feed the head its own predicted features (a training-time test, as in
HASS and EAGLE-3), weighted 0.8^i.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from sd2.heads.features import StateSource, chain_rounds, head_inputs, pad_features, row_features
from sd2.heads.model import Head
from sd2.mal import MalStats
from sd2.train import loop
from sd2.train.batches import Rows
from sd2.train.losses import IGNORE, cross_entropy, divergence, map_labels, teacher_from_logits
from sd2.train.mask import SparsityMask


class HeadLoss(torch.nn.Module):
    """forward(input_ids, features, labels) -> (feature-loss sum, logit-loss sum, positions) over one
    micro-batch; ``features`` [B, L, d] are the target's (right-padded like the ids). Wrapped by
    accelerate (DDP), so it holds the head; the frozen target only lends its lm_head to the teacher."""

    def __init__(self, head: Head, target, cfg, t2d):
        super().__init__()
        self.head, self.cfg, self.t2d = head, cfg, t2d
        object.__setattr__(self, "target", target)   # frozen, not part of the trained module
        self._no_split_modules = ["DecoderLayer"]     # FSDP auto-wrap: each head layer its own unit

    def forward(self, input_ids, feats, labels):
        cfg, head = self.cfg, self.head
        ids_h, feats_in, pos = head_inputs(input_ids, feats)
        where = labels[:, 1:] != IGNORE                     # head position t predicts x_{t+2}
        want_f = feats[:, 1:][where]
        teacher = None
        if cfg.loss != "ce":
            with torch.no_grad():
                teacher = teacher_from_logits(self.target.get_output_embeddings()(want_f), cfg.temperature, head.d2t)
        f_sum = l_sum = feats.new_zeros(())
        inputs = feats_in
        for i in range(1 + cfg.unroll):
            hl, hf = head(ids_h, inputs, pos, feature_noise=cfg.feature_noise if i == 0 else 0.0)
            w = 0.8 ** i
            f_sum = f_sum + w * F.smooth_l1_loss(hf[where], want_f, reduction="none").mean(-1).sum()
            logits = head.logits(hl[where])
            if cfg.loss == "ce":
                lab = map_labels(labels[:, 1:][where], self.t2d)
                l_sum = l_sum + w * cross_entropy(logits, lab).sum()
            else:
                l_sum = l_sum + w * divergence(cfg.loss, logits, teacher, cfg.temperature, cfg.jsd_beta).sum()
            # next pass: position t reads the head's own prediction of f_t (made at position t-1)
            inputs = torch.cat([feats_in[:, :1], hf[:, :-1]], dim=1)
        return f_sum, l_sum, int(where.sum())


def _spans(loss_mask: list[int]) -> list[tuple[int, int]]:
    """Contiguous runs of response tokens (a, b), a >= 1."""
    out, a = [], None
    for j, m in enumerate(loss_mask + [0]):
        if m and a is None:
            a = max(j, 1)
        elif not m and a is not None:
            if j > a:
                out.append((a, j))
            a = None
    return out


class HeadTask:
    """The loop's Task (sd2.train.loop) for a head: ``module`` is the HeadLoss (it holds the head);
    the terms are the feature regression and the logit loss, both over the head's loss positions;
    the inputs are the target's features of each row (``StateSource``, on the fly or cached)."""

    name = "finetune head"
    terms = ("feature_loss", "logit_loss")

    def __init__(self, cfg, head: Head, target, rows_train: Rows, rows_val: Rows, t2d=None):
        self.cfg, self.head, self.target, self.rows_train, self.rows_val = cfg, head, target, rows_train, rows_val
        self.module = HeadLoss(head, target, cfg, t2d)
        self.shared = (target, head.embed, head.target_lm_head)   # an FSDP copy of ``module`` shares these
        self.mask = SparsityMask.of(head.linears() if cfg.hold_mask else [])
        self.weights = (cfg.feature_weight, cfg.logit_weight)
        self.feats_train = self.feats_val = self.device = None

    def prepare(self, accelerator, out_dir: Path, ctx) -> None:
        self.device = accelerator.device
        self.target.to(accelerator.device).eval()
        for p in self.target.parameters():
            p.requires_grad_(False)
        from sd2.train import fsdp

        if fsdp.active(accelerator):
            if self.cfg.feature_cache_mb:
                from sd2.core.errors import Sd2Error

                raise Sd2Error("finetune.feature_cache_mb is not supported under FSDP: the cache is built by the main "
                               "process alone, and the sharded target computes only with all processes; unset "
                               "feature_cache_mb (features are then computed on the fly, by all processes together)")
            # every process runs the same number of target forwards (batch_size rows per micro-batch,
            # and validation on every process), so each layer's gather is matched
            self.target_layers_sharded = fsdp.shard_frozen(self.target, accelerator)
        self.feats_train, self.feats_val = _feature_sources(self.cfg, self.target, self.rows_train, self.rows_val,
                                                            accelerator, out_dir, ctx)

    def counts(self, rows, batch: dict) -> tuple[int, int]:
        n = int((batch["labels"][:, 1:] != IGNORE).sum())
        return n, n

    def sums(self, module, rows, batch: dict):
        feats = pad_features([f.to(self.device) for f in self.feats_train(rows)], batch["input_ids"].shape[1])
        f_sum, l_sum, _ = module(batch["input_ids"], feats, batch["labels"])
        return f_sum, l_sum

    @torch.no_grad()
    def validate(self, module, step: int) -> dict:
        """The exact teacher-forced chain MAL (``features.chain_rounds``) and acceptance on the held-out rows."""
        rows, gamma, stats = self.rows_val, self.cfg.mal_gamma, MalStats()
        if not len(rows):
            return {}
        for i in range(len(rows)):
            spans = _spans(rows.loss_mask[i])
            if spans:
                feats = self.feats_val([i])[0].to(self.device)
                for rounds in chain_rounds(self.head, rows.input_ids[i], feats, spans, gamma):
                    stats.add_request(rounds, rows.category[i])
        s = stats.summary(gamma)
        return {"val_mal": s["mal"], "val_acceptance_rate": s["acceptance_rate"],
                "val_acceptance_1": s["acceptance_per_position"][0] if s["acceptance_per_position"] else None,
                "val_tokens": s["tokens"]}


def train_head(cfg, head: Head, target, rows_train: Rows, rows_val: Rows, pad_id: int, out_dir: Path, ctx,
               config_json: dict, t2d=None) -> dict:
    """Train ``head`` in place against the frozen ``target`` with the one loop; returns the final metrics."""
    return loop.train(cfg, HeadTask(cfg, head, target, rows_train, rows_val, t2d), rows_train, pad_id, Path(out_dir),
                      ctx, config_json)


def _feature_sources(cfg, target, rows_train: Rows, rows_val: Rows, accelerator, out_dir: Path,
                     ctx) -> tuple[StateSource, StateSource]:
    """(train, validation) feature sources: on the fly, or, with ``cfg.feature_cache_mb``, from the
    cache in the run folder (built by the main process; the others wait, then read it)."""
    if not cfg.feature_cache_mb:
        compute = lambda rows: row_features(target, rows)     # noqa: E731
        return StateSource(rows_train, compute, accelerator.autocast), StateSource(rows_val, compute, accelerator.autocast)
    from sd2.heads.feature_cache import load_or_build, weights_digest

    root = Path(ctx.run_dir if ctx.run_dir is not None else out_dir) / "feature_cache"
    every = rows_train.input_ids + rows_val.input_ids
    precision = "bf16" if accelerator.mixed_precision == "bf16" else "fp32"
    cached = load_or_build(root, target, weights_digest(target), every, precision, str(accelerator.device),
                           cfg.feature_cache_mb, accelerator.autocast, ctx, build=accelerator.is_main_process,
                           barrier=accelerator.wait_for_everyone, stored=cfg.feature_cache_dtype)
    n = len(rows_train)
    return StateSource(rows_train, None, cached=cached[:n]), StateSource(rows_val, None, cached=cached[n:])
