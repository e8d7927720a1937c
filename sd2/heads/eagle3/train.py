"""Training an EAGLE-3 head with the one loop (sd2/train/loop.py): ``Eagle3Task``.

Inputs, per conversation, from one unpadded target forward (as every head's, sd2/heads/features.py:
a row's states do not depend on its batch): the target's aux hidden states (the states after k
decoder layers, k in ``aux_layers``, concatenated: [L, 3 H]) and, for a divergence loss, its
final-norm hidden state [L, H] (``row_states``). Computed per step, or once into the feature cache
(``feature_cache_mb``, sd2/heads/feature_cache.py; bit-identical training). The teacher's logits
are the target's lm_head rows of the draft vocabulary applied to that final state ([L, K]), never
the [L, V] logits.

Loss: EAGLE-3's training-time test (ttt.py) at depth ``ttt_depth`` D (default 3; the anchors use
7, ours is to be chosen by measurement), step i weighted ``ttt_decay``^i, token-level only: CE on
the target's tokens (``loss: ce``) or a divergence (fkl, rkl, jsd, tvd) from the target's
distribution over the K draft tokens; averaged over the global batch's step-0 label positions.
``feature_noise`` a adds U(-a, a) to the aux states fc reads at step 0 (EAGLE's noise on the
target's features; the fed-back steps read the head's own output, unperturbed).

Validation: the training-time test at depth max(D, mal_gamma) on the held-out rows: per-step
accuracy and acceptance (a greedy chain's, teacher-forced) and the chain's MAL at ``mal_gamma``
(``val_mal``) and over every step (``val_ttt_mal``).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from sd2.core.errors import Sd2Error
from sd2.heads.eagle3.ttt import merge, summary, training_time_test
from sd2.heads.features import StateSource, pad_features
from sd2.train.batches import Rows
from sd2.train.losses import IGNORE
from sd2.train.mask import SparsityMask

DEFAULT_DEPTH = 3


@torch.no_grad()
def row_states(target, rows: list[list[int]], aux_layers, final: bool) -> list[torch.Tensor]:
    """[L_i, 3 H (+ H)] per row, each from its own unpadded forward of the target's base model: the
    aux hidden states (after k decoder layers, k in ``aux_layers``, in order), then, with ``final``,
    the final-norm hidden state. Call it inside the training's autocast context."""
    from sd2.heads.eagle3.model import capturing_aux

    base = target.base_model if getattr(target, "base_model", None) is not None else target
    device = next(target.parameters()).device
    out = []
    with capturing_aux(target, aux_layers) as caught:
        for r in rows:
            last = base(input_ids=torch.tensor([r], dtype=torch.long, device=device), use_cache=False).last_hidden_state
            out.append(torch.cat([caught[k][0] for k in aux_layers] + ([last[0]] if final else []), dim=-1))
    return out


def loss_mask_of(labels: torch.Tensor) -> torch.Tensor:
    """[B, L] long: 1 where token j is a trained label (collate's labels[j-1] != IGNORE), 0 at j = 0."""
    return torch.cat([torch.zeros_like(labels[:, :1]), (labels[:, :-1] != IGNORE).long()], dim=1)


class Eagle3Loss(torch.nn.Module):
    """forward(input_ids, states, labels) -> TTTResult over one micro-batch (``states`` [B, L, w],
    right-padded). Wrapped by accelerate, so it holds the head; the frozen target lends its lm_head."""

    def __init__(self, head, target, cfg, depth: int, pad_id: int):
        super().__init__()
        self.head, self.cfg, self.depth, self.pad_id = head, cfg, depth, pad_id
        object.__setattr__(self, "target", target)

    def teacher(self, final: torch.Tensor) -> torch.Tensor:
        """[B, L, K]: the target's logits over the draft vocabulary from its final hidden states."""
        w = self.target.get_output_embeddings().weight
        keep = self.head.draft_to_target().to(w.device)
        return F.linear(final.to(w.dtype), w.index_select(0, keep))

    def forward(self, input_ids, states, labels, depth: int | None = None):
        cfg, head = self.cfg, self.head
        width = head.fc.in_features
        aux = states[..., :width]
        if self.training and cfg.feature_noise:
            aux = aux + (torch.rand_like(aux) * 2 - 1) * cfg.feature_noise
        teacher = None
        if cfg.loss != "ce":
            with torch.no_grad():
                teacher = self.teacher(states[..., width:])
        return training_time_test(head, aux, input_ids, loss_mask_of(labels), depth=depth or self.depth,
                                  loss=cfg.loss, temperature=cfg.temperature, jsd_beta=cfg.jsd_beta,
                                  decay=cfg.ttt_decay, pad_id=self.pad_id, teacher_draft_logits=teacher)


def check_config(cfg) -> None:
    """Refuse finetune options an EAGLE-3 head does not have, naming the field and the fix."""
    if cfg.unroll:
        raise Sd2Error(f"finetune.unroll = {cfg.unroll}: an eagle3 head unrolls with its training-time test; set "
                       f"finetune.ttt_depth (= 1 + unroll = {1 + cfg.unroll}) instead")
    fields = type(cfg).model_fields
    for name in ("feature_weight", "logit_weight"):
        if getattr(cfg, name) != fields[name].default:
            raise Sd2Error(f"finetune.{name}: an eagle3 head trains on the token loss alone (no feature regression, "
                           f"weight 1); remove {name}")


class Eagle3Task:
    """The loop's Task for an EAGLE-3 head: one term, the decayed training-time-test token loss,
    averaged over the step-0 label positions of the global batch."""

    name = "finetune eagle3 head"
    terms = ("ttt_loss",)
    weights = (1.0,)

    def __init__(self, cfg, head, target, rows_train: Rows, rows_val: Rows, pad_id: int):
        check_config(cfg)
        self.cfg, self.head, self.target, self.rows_train, self.rows_val = cfg, head, target, rows_train, rows_val
        self.depth = cfg.ttt_depth or DEFAULT_DEPTH
        self.module = Eagle3Loss(head, target, cfg, self.depth, pad_id)
        from sd2.heads.eagle3.drafter import prunable_linears

        self.mask = SparsityMask.of(prunable_linears(head) if cfg.hold_mask else [])
        self.states_train = self.states_val = self.device = None

    def compute(self, rows: list[list[int]]) -> list[torch.Tensor]:
        return row_states(self.target, rows, self.head.head_config.aux_layers, final=self.cfg.loss != "ce")

    def what(self) -> str:
        return f"eagle3 aux {list(self.head.head_config.aux_layers)}" + (" + final" if self.cfg.loss != "ce" else "")

    def prepare(self, accelerator, out_dir: Path, ctx) -> None:
        self.device = accelerator.device
        self.target.to(accelerator.device).eval()
        for p in self.target.parameters():
            p.requires_grad_(False)
        cfg = self.cfg
        if not cfg.feature_cache_mb:
            self.states_train = StateSource(self.rows_train, self.compute, accelerator.autocast)
            self.states_val = StateSource(self.rows_val, self.compute, accelerator.autocast)
            return
        from sd2.heads.feature_cache import load_or_build, weights_digest

        root = Path(ctx.run_dir if ctx.run_dir is not None else out_dir) / "feature_cache"
        every = self.rows_train.input_ids + self.rows_val.input_ids
        precision = "bf16" if accelerator.mixed_precision == "bf16" else "fp32"
        cached = load_or_build(root, self.target, weights_digest(self.target), every, precision, str(accelerator.device),
                               cfg.feature_cache_mb, accelerator.autocast, ctx, build=accelerator.is_main_process,
                               barrier=accelerator.wait_for_everyone, compute=lambda _t, rows: self.compute(rows),
                               what=self.what(), stored=cfg.feature_cache_dtype)
        n = len(self.rows_train)
        self.states_train = StateSource(self.rows_train, self.compute, cached=cached[:n])
        self.states_val = StateSource(self.rows_val, self.compute, cached=cached[n:])

    def counts(self, rows, batch: dict) -> tuple[int]:
        return (int(loss_mask_of(batch["labels"])[:, 2:].sum()),)

    def sums(self, module, rows, batch: dict):
        states = pad_features([s.to(self.device) for s in self.states_train(rows)], batch["input_ids"].shape[1])
        return (module(batch["input_ids"], states, batch["labels"]).loss_sum,)

    @torch.no_grad()
    def validate(self, module, step: int) -> dict:
        """The training-time test on the held-out rows (module docstring), in batches of batch_size."""
        from sd2.train.batches import collate

        rows, bs, gamma = self.rows_val, self.cfg.batch_size, self.cfg.mal_gamma
        if not len(rows):
            return {}
        results = []
        for a in range(0, len(rows), bs):
            idx = list(range(a, min(a + bs, len(rows))))
            batch = collate(rows, idx, self.module.pad_id)
            if batch["input_ids"].shape[1] < 2:
                continue
            states = pad_features([s.to(self.device) for s in self.states_val(idx)], batch["input_ids"].shape[1])
            results.append(module(batch["input_ids"].to(self.device), states, batch["labels"].to(self.device),
                                  depth=max(self.depth, gamma)))
        r = merge(results)
        acc = r.acceptance()
        return {"val_mal": r.mal(gamma), "val_acceptance_1": acc[0] if acc else None,
                "val_loss": float(r.loss_sum) / r.positions if r.positions else None, **summary(r)}
