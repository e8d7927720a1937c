"""EAGLE-3's training-time test: unroll the head D draft steps on its own hidden outputs, as drafting does.

Alignment (sd2's head convention, docs/eagle3.md): a row holds tokens x_0..x_{L-1}; head position t
(0 <= t <= L-2) reads x_{t+1} and the fused target hidden state g_t = fc(aux_t), and predicts x_{t+2}.
Step i of the unroll (0 <= i < D), at head position t, is the (i+1)-th draft of a round whose
anchor is t:
- token: x_{t+1+i} (the ids shift left by one per step; past the row's end: ``pad_id``);
- hidden: step 0 reads g_t; step i >= 1 reads the head's own ``prenorm`` output of step i-1 at the
  same position t (never the target's g_{t+i});
- rotary position t + i; attention: the step-0 keys of positions <= t (the context the target
  computed) and the keys of steps 1..i at position t itself (the drafts of this round): the mask
  [T, (i+1) T] = [causal | diag | ... | diag], explicit, with a KV cache that grows by T per step;
- label x_{t+2+i}, the teacher's distribution at sequence position t+1+i, and the loss mask at
  t+2+i: ids, teacher and mask shift together (SpecForge #885 shifted the ids but not the mask, which
  silently dropped the positions next to a prompt/answer boundary).
Loss: sum_i decay^i * sum_t loss_i(t) over valid positions, token-level only (no feature
regression): CE on the data's tokens, or a divergence (fkl, rkl, jsd, tvd; sd2.train.losses)
from the target's distribution restricted to the draft vocabulary. EAGLE-3: D = 7, decay 0.8.

Validation figures per step: accuracy (argmax, mapped to a target id, equals the label) and
acceptance: the fraction of anchors whose drafts 0..i-1 were all right that get draft i right (a
greedy chain's acceptance at position i+1, teacher-forced).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sd2.train.losses import IGNORE, KD_LOSSES, cross_entropy, divergence, teacher_from_logits


def shift_left(x: torch.Tensor, n: int, fill=0) -> torch.Tensor:
    """x [B, L, ...] moved n positions left along dim 1, the last n filled with ``fill``."""
    n = min(n, x.shape[1])
    pad = x.new_full((x.shape[0], n, *x.shape[2:]), fill)
    return torch.cat([x[:, n:], pad], dim=1)


def ttt_mask(t: int, step: int, device=None) -> torch.Tensor:
    """[1, 1, T, (step+1) T] bool: causal over the step-0 keys, the diagonal of each later step's."""
    causal = torch.ones(t, t, dtype=torch.bool, device=device).tril()
    diag = torch.eye(t, dtype=torch.bool, device=device)
    return torch.cat([causal] + [diag] * step, dim=-1)[None, None]


def ttt_unroll(head, fused: torch.Tensor, input_ids: torch.Tensor, depth: int, pad_id: int = 0):
    """Yield (prenorm, normed) [B, T, H] for steps 0..depth-1 (module docstring).

    fused [B, T, H] = ``head.fuse(aux[:, :-1])``, input_ids [B, L] with T = L - 1."""
    b, n = input_ids.shape
    t = n - 1
    if fused.shape[:2] != (b, t):
        raise ValueError(f"fused hidden states are {list(fused.shape[:2])}, expected [{b}, {t}] (batch, L - 1)")
    cache = head.new_cache()
    pos = torch.arange(t, device=input_ids.device).expand(b, t)
    hidden = fused
    for i in range(depth):
        ids = shift_left(input_ids, 1 + i, pad_id)[:, :t]
        prenorm, normed = head(ids, hidden, pos + i, mask=ttt_mask(t, i, input_ids.device), cache=cache)
        yield prenorm, normed
        hidden = prenorm


@dataclass
class TTTResult:
    """``loss_sum``: the decay-weighted loss summed over positions (differentiable); the caller divides
    by a token count (``positions`` = step 0's, or a global batch's). Per step i: ``step_loss`` (summed,
    unweighted), ``step_positions`` (valid labels), ``step_correct``, ``step_candidates`` (valid anchors
    whose earlier drafts were all right) and ``step_accepted`` (those also right at step i)."""

    loss_sum: torch.Tensor
    step_loss: list[float] = field(default_factory=list)
    step_positions: list[int] = field(default_factory=list)
    step_correct: list[int] = field(default_factory=list)
    step_candidates: list[int] = field(default_factory=list)
    step_accepted: list[int] = field(default_factory=list)

    @property
    def positions(self) -> int:
        return self.step_positions[0] if self.step_positions else 0

    def accuracy(self) -> list[float | None]:
        return [c / n if n else None for c, n in zip(self.step_correct, self.step_positions)]

    def acceptance(self) -> list[float | None]:
        return [a / n if n else None for a, n in zip(self.step_accepted, self.step_candidates)]

    def mal(self, gamma: int | None = None) -> float | None:
        """Teacher-forced estimate of a greedy chain's mean accepted length at depth ``gamma`` (all
        steps when None): 1 (the target's own token) + the expected run of right drafts per anchor.
        Ignores a round's truncation at an answer's end."""
        if not self.step_candidates or not self.step_candidates[0]:
            return None
        g = len(self.step_accepted) if gamma is None else min(gamma, len(self.step_accepted))
        return 1.0 + sum(self.step_accepted[:g]) / self.step_candidates[0]


def merge(results: list[TTTResult]) -> TTTResult:
    """One result of several batches' (counts and losses summed; ``loss_sum`` detached)."""
    out = TTTResult(loss_sum=torch.zeros(()))
    for r in results:
        out.loss_sum = out.loss_sum + r.loss_sum.detach().float().cpu()
        for name in ("step_loss", "step_positions", "step_correct", "step_candidates", "step_accepted"):
            acc, new = getattr(out, name), getattr(r, name)
            if len(acc) < len(new):
                acc.extend([0] * (len(new) - len(acc)))
            for i, v in enumerate(new):
                acc[i] += v
    return out


def summary(result: TTTResult, prefix: str = "val_") -> dict:
    """Flat figures for a metrics log: per-step accuracy and acceptance (1-based, as the report's
    acceptance at position k), the teacher-forced MAL over all steps, and the label count."""
    out: dict = {f"{prefix}ttt_mal": result.mal(), f"{prefix}ttt_positions": result.positions}
    for i, (a, c) in enumerate(zip(result.accuracy(), result.acceptance()), start=1):
        out[f"{prefix}accuracy_{i}"], out[f"{prefix}acceptance_{i}"] = a, c
    return out


def training_time_test(head, aux: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor,
                       target_logits: torch.Tensor | None = None, depth: int = 7, loss: str = "ce",
                       temperature: float = 1.0, jsd_beta: float = 0.5, decay: float = 0.8,
                       pad_id: int = 0, teacher_draft_logits: torch.Tensor | None = None) -> TTTResult:
    """EAGLE-3's training-time test over a batch of rows (module docstring).

    aux [B, L, 3 H_target]: the target's aux hidden states (``model.target_aux``); input_ids [B, L];
    loss_mask [B, L]: 1 where the token is a trained label (the target's answer; 0 on prompt and
    padding); target_logits [B, L, V]: the target's next-token logits at every position (needed for
    a divergence; CE uses the tokens of ``input_ids``), or ``teacher_draft_logits`` [B, L, K]: the
    same logits already restricted to the draft vocabulary (the target's lm_head rows of ``d2t``
    applied to its final hidden state: what finetune computes, never the [.., V] logits). ``depth``
    D >= 1, ``decay`` weights step i by decay^i. Raises ValueError on shapes that disagree or an
    unknown loss."""
    b, n = input_ids.shape
    if n < 2:
        raise ValueError(f"rows need at least 2 tokens for a head position, got {n}")
    if loss_mask.shape != (b, n) or aux.shape[:2] != (b, n):
        raise ValueError(f"input_ids {list(input_ids.shape)}, loss_mask {list(loss_mask.shape)} and aux "
                         f"{list(aux.shape[:2])} must agree on [batch, length]")
    if depth < 1:
        raise ValueError(f"ttt depth must be >= 1, got {depth}")
    if loss != "ce":
        if loss not in KD_LOSSES:
            raise ValueError(f"unknown loss {loss!r}; valid: ce, {', '.join(KD_LOSSES)}")
        given = target_logits if teacher_draft_logits is None else teacher_draft_logits
        if given is None or given.shape[:2] != (b, n):
            raise ValueError(f"loss {loss!r} needs the target's logits [batch, length, V] (target_logits) or "
                             "[batch, length, K] (teacher_draft_logits)")
    t = n - 1
    d2t_abs = head.draft_to_target()
    t2d = head.draft_vocab().target_to_draft().to(input_ids.device)
    mask = loss_mask.bool()
    # the teacher restricted to the draft vocabulary once ([B, L, K]); renormalised per position below
    teacher_k = teacher_draft_logits
    if loss != "ce" and teacher_k is None:
        teacher_k = target_logits.index_select(-1, d2t_abs.to(target_logits.device))
    prev = None
    out = TTTResult(loss_sum=aux.new_zeros((), dtype=torch.float32))
    for i, (_, normed) in enumerate(ttt_unroll(head, head.fuse(aux[:, :-1]), input_ids, depth, pad_id)):
        valid = shift_left(mask, 2 + i, False)[:, :t]                  # label x_{t+2+i} exists and is trained
        rows, anchors = valid.nonzero(as_tuple=True)
        labels = input_ids[rows, anchors + 2 + i]
        logits = head.logits(normed[rows, anchors])
        if loss == "ce":
            mapped = t2d[labels]
            per = cross_entropy(logits, torch.where(mapped >= 0, mapped, torch.full_like(mapped, IGNORE)))
        else:
            teach = teacher_k[rows, anchors + 1 + i]                    # gathered, not shifted: [N, K] only
            per = divergence(loss, logits, teacher_from_logits(teach, temperature), temperature, jsd_beta)
        s = per.sum()
        out.loss_sum = out.loss_sum + (decay ** i) * s
        right = torch.zeros_like(valid)
        right[valid] = d2t_abs[logits.argmax(-1)] == labels
        prev = valid if prev is None else prev
        cand = prev & valid
        out.step_loss.append(float(s.detach()))
        out.step_positions.append(int(valid.sum()))
        out.step_correct.append(int(right.sum()))
        out.step_candidates.append(int(cand.sum()))
        out.step_accepted.append(int((cand & right).sum()))
        prev = cand & right
    return out
