"""Token losses: CE on the target's tokens (SD²) and DistillSpec's divergences against the target's distribution.

Every function works on the N loss positions only (assistant tokens), flattened: the student's
logits are [N, V'] (V' = the drafter's output vocabulary, K for a trimmed drafter) and the loss is
returned per position ([N]), so the caller can normalise by the token count of the whole global
batch (which makes 1 process and 2 processes give the same gradient).

The target's distribution p is a ``Teacher``:
- dense (an online teacher): log-probabilities over the student's whole output vocabulary;
- sparse (cached top-k logits): log-probabilities over k support ids, renormalised over the k.
  Outside its support p is 0. The student's mass outside the support, q_rest = 1 - sum_S q, is
  kept as one extra bin, which makes fkl, jsd and tvd *exact* full-vocabulary divergences against
  that zero-tailed p:
    fkl  = KL(p || q)            = sum_S p (log p - log q)                      (q_rest adds 0)
    tvd  = 1/2 sum_V |p - q|     = 1/2 (sum_S |p - q| + q_rest)
    jsd  = b KL(p || m) + (1-b) KL(q || m),  m = b p + (1-b) q
           outside S: m = (1-b) q, so the tail adds (1-b) q_rest (-log(1-b))
  rkl = KL(q || p) is infinite whenever q_rest > 0, so for a sparse teacher the student is
  renormalised over the support first (documented in docs/finetune.md). For a dense teacher this
  is the identity, so the same code serves both.

The temperature T divides both the teacher's and the student's logits before the softmax; the loss
is not rescaled by T². CE always uses T = 1 (it is the likelihood of the target's tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

KD_LOSSES = ("fkl", "rkl", "jsd", "tvd")
IGNORE = -100


@dataclass
class Teacher:
    """The target's distribution at N positions.

    logp: [N, S] log-probabilities (-inf where invalid), each row normalised over its valid entries.
    ids:  [N, S] student-vocabulary ids of the support, or None when S is the whole output vocabulary.
    """

    logp: torch.Tensor
    ids: torch.Tensor | None = None

    @property
    def valid(self) -> torch.Tensor:
        return torch.isfinite(self.logp)

    def rows_with_support(self) -> torch.Tensor:
        """[N] bool: positions where the teacher has at least one valid entry (others get no KD loss)."""
        return self.valid.any(-1)


def teacher_from_topk(topk_ids: torch.Tensor, topk_logits: torch.Tensor, temperature: float,
                      target_to_draft: torch.Tensor | None = None) -> Teacher:
    """A sparse teacher from cached top-k logits ([N, k]; ids < 0 mark padding).

    With a trimmed drafter, ``target_to_draft`` ([V] long, -1 outside the kept set) maps the ids to
    draft ids; entries outside the kept set are dropped and the rest renormalised."""
    ids = topk_ids.long()
    valid = ids >= 0
    if target_to_draft is not None:
        mapped = torch.where(valid, target_to_draft[ids.clamp_min(0)], torch.full_like(ids, -1))
        valid = mapped >= 0
        ids = mapped
    logits = (topk_logits.float() / temperature).masked_fill(~valid, float("-inf"))
    logp = torch.log_softmax(logits, dim=-1)
    logp = torch.where(valid, logp, torch.full_like(logp, float("-inf")))  # rows with no valid entry: all -inf
    return Teacher(logp=logp, ids=ids.clamp_min(0))


def teacher_from_logits(logits: torch.Tensor, temperature: float, draft_to_target: torch.Tensor | None = None) -> Teacher:
    """A dense teacher from the target's full logits [N, V] (an online teacher). With a trimmed
    drafter it is restricted to the K kept tokens and renormalised there."""
    logits = logits.float()
    if draft_to_target is not None:
        logits = logits.index_select(-1, draft_to_target.to(logits.device))
    return Teacher(logp=torch.log_softmax(logits / temperature, dim=-1), ids=None)


def _student_on_support(student_logits: torch.Tensor, teacher: Teacher, temperature: float):
    """(log q on the support [N, S], q_rest [N]): the student's log-probabilities at the teacher's
    support and its total mass outside it."""
    logq = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    if teacher.ids is None:
        return logq, torch.zeros(logq.shape[0], device=logq.device)
    logq_s = logq.gather(-1, teacher.ids)
    inside = (logq_s.exp() * teacher.valid).sum(-1)
    return logq_s, (1.0 - inside).clamp_min(0.0)


def divergence(kind: str, student_logits: torch.Tensor, teacher: Teacher, temperature: float = 1.0,
               beta: float = 0.5) -> torch.Tensor:
    """The divergence ``kind`` (fkl, rkl, jsd, tvd) per position: [N]. Positions where the teacher
    has no valid entry give 0 (the caller leaves them out of the token count)."""
    valid = teacher.valid
    # Invalid entries are replaced by finite values before any arithmetic, so that neither the
    # forward nor the backward pass ever meets inf - inf (a NaN that 0 * NaN would not remove).
    logp = teacher.logp.masked_fill(~valid, 0.0)
    p = teacher.logp.exp().masked_fill(~valid, 0.0)
    logq, q_rest = _student_on_support(student_logits, teacher, temperature)
    q_rest = q_rest.masked_fill(~teacher.rows_with_support(), 0.0)
    logq = logq.masked_fill(~valid, 0.0)
    q = logq.exp().masked_fill(~valid, 0.0)
    if kind == "fkl":
        return (p * (logp - logq)).sum(-1)
    if kind == "rkl":
        logq_r = torch.log_softmax(logq.masked_fill(~valid, -1e30), dim=-1).masked_fill(~valid, 0.0)
        q_r = logq_r.exp().masked_fill(~valid, 0.0)
        return (q_r * (logq_r - logp)).sum(-1)
    if kind == "tvd":
        return 0.5 * ((p - q).abs().sum(-1) + q_rest)
    if kind == "jsd":
        if not 0.0 < beta < 1.0:
            raise ValueError(f"jsd beta must be in (0, 1), got {beta}")
        logm = torch.logaddexp(math.log(beta) + logp, math.log(1.0 - beta) + logq)
        kl_pm = (p * (logp - logm)).sum(-1)
        kl_qm = (q * (logq - logm)).sum(-1) + q_rest * -math.log(1.0 - beta)
        return beta * kl_pm + (1.0 - beta) * kl_qm
    raise ValueError(f"unknown divergence '{kind}'; valid: {', '.join(KD_LOSSES)}")


def cross_entropy(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CE per position [N] against the target's tokens (draft ids; IGNORE gives 0)."""
    return F.cross_entropy(student_logits.float(), labels, ignore_index=IGNORE, reduction="none")


def map_labels(labels: torch.Tensor, target_to_draft: torch.Tensor | None) -> torch.Tensor:
    """Target-vocabulary labels as student ids; with a trimmed drafter, labels outside the kept set
    become IGNORE (the drafter cannot emit them, so they carry no CE signal)."""
    if target_to_draft is None:
        return labels
    keep = labels != IGNORE
    mapped = target_to_draft[labels.clamp_min(0)]
    return torch.where(keep & (mapped >= 0), mapped, torch.full_like(labels, IGNORE))


def target_to_draft_map(draft_to_target: torch.Tensor | None, vocab_size: int) -> torch.Tensor | None:
    """The inverse of a trimmed drafter's map: [V] long, the draft id or -1."""
    if draft_to_target is None:
        return None
    inv = torch.full((vocab_size,), -1, dtype=torch.long)
    inv[draft_to_target.long()] = torch.arange(draft_to_target.numel(), dtype=torch.long)
    return inv
