"""How a head drafts, per head type: the one place that knows what a head reads and what it feeds back.

Every head module has ``forward(ids [B, T], hidden [B, T, H], positions [B, T], cache=) -> (a, b)``
and ``logits(x) -> [..., rows]``, and a KV cache of [k, v] pairs per layer (``new_cache``). Head
position t reads token x_{t+1} and a hidden vector at t, and predicts x_{t+2}. The types differ in:

- the target's features (the engine's ``feature_layers``): EAGLE-1 / FSPAD (``sd2.heads.model.Head``)
  read its last hidden state, after the final norm (None); EAGLE-3 (``sd2.heads.eagle3.model.
  Eagle3Head``) the hidden states after each aux layer k, before the final norm (``aux_layers``),
  concatenated;
- the hidden input at a committed (real) position: the feature itself; EAGLE-3: ``fc`` of the aux
  states (``fuse``);
- what ``logits`` reads: the first output; EAGLE-3: the second (``norm(prenorm)``);
- the hidden fed back at draft steps >= 2: the second output (the predicted feature); EAGLE-3: the
  first (``prenorm``), as its training-time test trains it;
- draft id -> target id: a trimmed head's ``d2t`` (target ids), or the identity; EAGLE-3:
  ``arange(K) + d2t`` (its ``d2t`` holds offsets).

The engine's proposer (``sd2.heads.proposer.HeadProposer``) and the teacher-forced chain rounds
(``sd2.heads.features.chain_rounds``) both draft through ``drafting(head)``, so they draft alike.
"""

from __future__ import annotations

import torch

from sd2.engine.sampling import DraftVocab
from sd2.heads.eagle3.model import Eagle3Head, target_aux


class HeadDrafting:
    """EAGLE-1 / FSPAD (the table's first column). ``vocab`` maps draft rows to target ids."""

    feature_layers: tuple[int, ...] | None = None

    def __init__(self, head):
        self.head = head
        fc = head.fc if isinstance(head, Eagle3Head) else head.model.fc      # the input layer of either type
        self.device, self.dtype = fc.weight.device, fc.weight.dtype
        self.vocab = self._vocab().to(self.device)

    def _vocab(self) -> DraftVocab:
        return DraftVocab(self.head.target_lm_head.weight.shape[0], self.head.d2t)

    def hidden(self, features: torch.Tensor) -> torch.Tensor:
        """[..., F] target features at committed positions -> [..., H] the head's hidden input there."""
        return features.to(self.device, self.dtype)

    def forward(self, ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
                cache: list) -> tuple[torch.Tensor, torch.Tensor]:
        """(what ``logits`` reads, the hidden fed back at the next draft step), each [B, T, H]."""
        return self.head(ids, hidden, positions, cache=cache)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head.logits(x)

    def target_features(self, target, input_ids: torch.Tensor) -> torch.Tensor:
        """[L, F]: the features the engine hands this head, from one target forward over ``input_ids`` [1, L]."""
        from sd2.heads.features import target_features

        return target_features(target, input_ids)[0]


class Eagle3Drafting(HeadDrafting):
    """EAGLE-3 (the table's second column): the aux states are fused by ``fc``; ``prenorm`` is fed back."""

    def __init__(self, head: Eagle3Head):
        self.feature_layers = tuple(head.head_config.aux_layers)
        super().__init__(head)

    def _vocab(self) -> DraftVocab:
        return DraftVocab(self.head.head_config.vocab_size, self.head.draft_to_target())

    def hidden(self, features: torch.Tensor) -> torch.Tensor:
        return self.head.fuse(features.to(self.device))

    def forward(self, ids, hidden, positions, cache):
        prenorm, normed = self.head(ids, hidden, positions, cache=cache)
        return normed, prenorm

    def target_features(self, target, input_ids):
        return target_aux(target, input_ids, self.feature_layers)[0][0]


def drafting(head) -> HeadDrafting:
    """The drafting rules of ``head``'s type (module docstring)."""
    return Eagle3Drafting(head) if isinstance(head, Eagle3Head) else HeadDrafting(head)
