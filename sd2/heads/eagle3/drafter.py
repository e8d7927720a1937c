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

TRIM_REFUSED = ("an eagle3 head has its own K-row draft vocabulary (d2t/t2d, chosen when the head is built from "
                "the target's token frequencies on the distilled answers); trim_vocab does not apply: set the "
                "head's draft_vocab_size to the K you want instead")


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
