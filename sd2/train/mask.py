"""The sparsity mask, held exactly while training.

The mask is read from the weights themselves: every exact zero in a decoder linear weight
(sd2/sparsity.py: the layers SD² prunes; embeddings and lm_head stay dense) is pruned. A sparse model
is stored dense with zeros (docs/CONTRACTS.md), so no side file is needed.

Holding it costs one in-place element-wise pass per masked tensor and step: before the optimizer
step, gradients are zeroed at the pruned positions. Then, with torch's AdamW (the only optimizer the
stage builds), every pruned position stays exactly zero without touching the weights again:
exp_avg and exp_avg_sq never receive a value there (they stay exactly 0), the update is
0 / (sqrt(0) + eps) = 0, decoupled weight decay scales 0 to 0, and gradient clipping measures only
the live weights. Re-zeroing the weights after every step as well was measured as half the mask's
cost (benchmarks/finetune_throughput.py) and added nothing, so the guarantee is checked instead:
``verify`` checks both the weights and the optimizer state at the end.

The zeros this leaves in exp_avg_sq once tripped a slow path of torch's CPU sqrt in the foreach
AdamW (train.make_adamw); the stage therefore builds the fused AdamW, whose arithmetic is the same.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class SparsityMask:
    """Boolean masks of the pruned positions of the decoder's 2-D weights that have zeros."""

    def __init__(self, params: dict[str, nn.Parameter]):
        self.params = params
        # Stored as the *pruned* positions: masked_fill_ with a bool mask is one in-place pass,
        # where mul_ by a bool mask first materialises a float copy of it (measured ~3x slower).
        self.pruned_at = {name: p.detach() == 0 for name, p in params.items()}
        # counted once on the whole weights (under FSDP each process holds only its shards)
        self._pruned = int(sum(int(m.sum()) for m in self.pruned_at.values()))
        self._total = int(sum(m.numel() for m in self.pruned_at.values()))

    def rebind(self, old_root: nn.Module, new_root: nn.Module) -> None:
        """Hold the mask on ``new_root``'s parameters of the same names as the masked ones in
        ``old_root`` (under FSDP: the sharded copy the optimizer trains, sd2/train/fsdp.py). Under
        FSDP2 a weight is a DTensor and the mask is kept for this process's shard: the pruned
        positions of a shard are its zeros, as the whole weight's are."""
        from sd2.train.fsdp import local

        names = {id(p): n for n, p in old_root.named_parameters()}
        new = dict(new_root.named_parameters())
        self.params = {k: new[names[id(p)]] for k, p in self.params.items()}
        self.pruned_at = {k: local(p.detach()) == 0 for k, p in self.params.items()}

    @classmethod
    def of(cls, linears) -> "SparsityMask":
        """Masks for the trainable weights of ``linears`` (a drafter's ``linears()``: a causal LM's
        decoder linears, every Linear of a head) that hold at least one zero."""
        return cls({name: mod.weight for name, mod in linears
                    if mod.weight.requires_grad and bool((mod.weight.detach() == 0).any())})

    def __bool__(self) -> bool:
        return bool(self.params)

    @property
    def pruned(self) -> int:
        return self._pruned

    @property
    def total(self) -> int:
        return self._total

    @torch.no_grad()
    def mask_grads(self) -> None:
        from sd2.train.fsdp import local

        for name, p in self.params.items():
            if p.grad is not None:
                local(p.grad).masked_fill_(self.pruned_at[name], 0.0)

    @torch.no_grad()
    def verify(self, optimizer: torch.optim.Optimizer | None = None) -> dict:
        """{"mask_exact": every pruned weight is 0 and the optimizer state is 0 there,
        "mask_violations": how many entries were not}. Under FSDP: of this process's shards only
        (the loop sums the violations over the processes)."""
        from sd2.train.fsdp import local

        bad = 0
        for name, p in self.params.items():
            pruned = self.pruned_at[name]
            bad += int((local(p.detach())[pruned] != 0).sum())
            state = optimizer.state.get(p, {}) if optimizer is not None else {}
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    bad += int((local(state[key])[pruned] != 0).sum())
        return {"mask_exact": bad == 0, "mask_violations": bad}
