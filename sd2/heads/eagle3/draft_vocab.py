"""An EAGLE-3 head's draft vocabulary: the K target tokens its lm_head can emit.

Chosen, as EAGLE-3 and speculators do, as the K tokens the target emits most often in the distilled
answers (tokens under the loss mask; ties to the lower id; fewer than K distinct tokens seen are
topped up with the lowest unseen ids), kept in ascending target-id order. Stored with the head as
- ``d2t`` [K] long, offsets: target id = draft id + d2t[draft id] (vLLM's and speculators' format);
- ``t2d`` [V] bool: True at the kept target ids.
A map belongs to one target vocabulary: ``check_target`` refuses it for a target of another size
(a public bug: speculators #1081, t2d/d2t cached for one vocabulary reused for another).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch


@dataclass(frozen=True)
class DraftVocabMap:
    """``keep``: [K] long, the kept target ids, strictly ascending; ``target_vocab_size``: V."""

    keep: torch.Tensor
    target_vocab_size: int

    def __post_init__(self):
        keep = self.keep
        if keep.dim() != 1 or keep.numel() == 0:
            raise ValueError(f"a draft vocabulary needs a non-empty 1-d list of target ids, got shape {list(keep.shape)}")
        if int(keep.min()) < 0 or int(keep.max()) >= self.target_vocab_size:
            raise ValueError(f"draft vocabulary ids must be in [0, {self.target_vocab_size}) (the target vocabulary), "
                             f"got [{int(keep.min())}, {int(keep.max())}]")
        if keep.numel() > 1 and not bool((keep[1:] > keep[:-1]).all()):
            raise ValueError("draft vocabulary ids must be strictly ascending (no duplicates)")

    @property
    def k(self) -> int:
        return int(self.keep.numel())

    def d2t(self) -> torch.Tensor:
        """[K] long offsets: target id = draft id + d2t[draft id]."""
        return self.keep.long() - torch.arange(self.k, dtype=torch.long)

    def t2d(self) -> torch.Tensor:
        """[V] bool: True at every kept target id."""
        out = torch.zeros(self.target_vocab_size, dtype=torch.bool)
        out[self.keep.long()] = True
        return out

    def target_to_draft(self) -> torch.Tensor:
        """[V] long: the draft id of every target id, -1 outside the draft vocabulary."""
        out = torch.full((self.target_vocab_size,), -1, dtype=torch.long)
        out[self.keep.long()] = torch.arange(self.k, dtype=torch.long)
        return out

    def check_target(self, target_vocab_size: int) -> None:
        """Raise ValueError unless the map was made for a target vocabulary of this size."""
        if int(target_vocab_size) != self.target_vocab_size:
            raise ValueError(f"this draft vocabulary map (d2t/t2d) was made for a target vocabulary of "
                             f"{self.target_vocab_size} tokens, but the target has {int(target_vocab_size)}: a map is "
                             "never reused across vocabularies; choose the draft vocabulary again on this target's "
                             "distilled data (choose_draft_vocab)")

    def save(self, path) -> None:
        """Write the map as JSON: the kept ids and the target vocabulary size they belong to."""
        from pathlib import Path

        Path(path).write_text(json.dumps({"target_vocab_size": self.target_vocab_size, "keep": self.keep.tolist()}))

    @classmethod
    def load(cls, path, target_vocab_size: int) -> "DraftVocabMap":
        """A saved map, refused (ValueError naming the file) when made for another vocabulary size."""
        from pathlib import Path

        try:
            d = json.loads(Path(path).read_text())
            vmap = cls(torch.tensor(d["keep"], dtype=torch.long), int(d["target_vocab_size"]))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a readable draft vocabulary map ({e}); choose it again") from e
        try:
            vmap.check_target(target_vocab_size)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        return vmap

    @classmethod
    def from_buffers(cls, d2t: torch.Tensor, t2d: torch.Tensor) -> "DraftVocabMap":
        """The map of stored ``d2t`` offsets and ``t2d`` mask. Raises ValueError when they disagree."""
        keep = torch.arange(d2t.numel(), dtype=torch.long) + d2t.detach().cpu().long()
        vmap = cls(keep, int(t2d.numel()))
        if not torch.equal(vmap.t2d(), t2d.detach().cpu().bool()):
            raise ValueError(f"d2t and t2d disagree: d2t maps {vmap.k} draft ids onto target ids, t2d marks "
                             f"{int(t2d.bool().sum())}, not the same set")
        return vmap


def choose_draft_vocab(sequences: Sequence[Sequence[int]], loss_masks: Sequence[Sequence[int]] | None,
                       target_vocab_size: int, k: int, always: Iterable[int] = ()) -> DraftVocabMap:
    """The K most frequent target tokens of ``sequences`` (token-id lists) where ``loss_masks`` is 1
    (None: every token), plus ``always`` (e.g. the end-of-turn ids; they count against K).

    Frequencies come from sd2.vocab.token_counts (the same count as trim_vocab's). Ties go to the lower
    id; when fewer than K tokens were seen, the lowest unseen ids fill the rest. Raises ValueError
    for K outside [1, V], ids outside the vocabulary, or more ``always`` ids than K."""
    from sd2.vocab import token_counts

    if not 1 <= k <= target_vocab_size:
        raise ValueError(f"draft_vocab_size {k} must be in [1, {target_vocab_size}] (the target's vocabulary size)")
    masks = loss_masks if loss_masks is not None else [[1] * len(s) for s in sequences]
    for s in sequences:
        if s and (min(s) < 0 or max(s) >= target_vocab_size):
            raise ValueError(f"a sequence holds token id {min(s) if min(s) < 0 else max(s)}, outside the target "
                             f"vocabulary [0, {target_vocab_size})")
    counts = token_counts({"input_ids": sequences, "loss_mask": masks}, target_vocab_size)
    forced = sorted(set(int(i) for i in always))
    if len(forced) > k:
        raise ValueError(f"{len(forced)} ids must always be kept but draft_vocab_size is {k}")
    if forced and (forced[0] < 0 or forced[-1] >= target_vocab_size):
        raise ValueError(f"ids to always keep must be in [0, {target_vocab_size})")
    score = counts.double()
    score[forced] = float("inf")
    # a stable sort on -count keeps ascending ids among ties (unseen ids: count 0, lowest first)
    order = torch.sort(-score, stable=True).indices
    return DraftVocabMap(torch.sort(order[:k]).values, int(target_vocab_size))
