"""Magnitude pruning in plain torch: zero the smallest |w| of each decoder linear layer.

Why not llm-compressor: its ``MagnitudePruningModifier`` (0.14) is a schedule for training. Its
masks are applied on optimizer steps and removed at finalize, so ``oneshot`` with
``init_sparsity == final_sparsity == 0.5, start=0`` returned the weights unchanged (checked on a
tiny Llama: 0% zeros afterwards). Its mask factory also has no N:M pattern (only unstructured,
channel, filter and block). Magnitude pruning needs no data, so a few lines of torch do it exactly.

Conventions match llm-compressor's SparseGPT/Wanda: sparsity is per layer (every layer gets the
same share), and "N:M" zeroes N of every M consecutive weights along the input dimension.
"""

from __future__ import annotations


def magnitude_mask(weight, sparsity: float, nm: tuple[int, int] | None = None):
    """A bool mask, True where the weight is kept. ``weight`` is (out_features, in_features)."""
    import torch

    w = weight.detach().abs().float()
    if nm is not None:
        n, m = nm
        rows, cols = w.shape
        if cols % m:
            raise ValueError(f"input dimension {cols} is not a multiple of M={m}")
        groups = w.reshape(rows, cols // m, m)
        drop = torch.topk(groups, n, dim=-1, largest=False).indices
        keep = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, drop, False)
        return keep.reshape(rows, cols)
    k = int(round(sparsity * w.numel()))
    keep = torch.ones(w.numel(), dtype=torch.bool)
    if k > 0:
        # the k smallest by magnitude (ties broken by position, so exactly k go)
        keep[torch.topk(w.flatten(), k, largest=False).indices] = False
    return keep.reshape(w.shape)


def magnitude_prune(linears: list, sparsity: float, nm: tuple[int, int] | None = None) -> None:
    """Prune each (name, linear module) in place: a drafter's ``linears()`` (a causal LM's decoder
    linears, every Linear of a head). GPT-2's Conv1D stores (in, out): it is transposed."""
    import torch

    from sd2.core.errors import Sd2Error

    with torch.no_grad():
        for name, mod in linears:
            conv1d = type(mod).__name__ == "Conv1D"
            w = mod.weight.t() if conv1d else mod.weight
            try:
                keep = magnitude_mask(w, sparsity, nm)
            except ValueError as e:
                raise Sd2Error(f"cannot apply mask_structure {nm[0]}:{nm[1]} to {name}: {e}") from None
            w.mul_(keep.to(w.dtype))
