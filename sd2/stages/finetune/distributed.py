"""Running under accelerate (one process, DDP over gloo on CPU or NCCL on GPUs, FSDP), and the
forward pass that computes logits only where there is a loss.

``Accelerator()`` reads its world from the launcher: plain ``python`` gives one process,
``torchrun --nproc_per_node N`` or ``accelerate launch`` gives N (on CPU, torchrun gives a 2-process
gloo world; ``accelerate launch --cpu --num_processes 2`` gave a world of 1 on our machines).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from sd2.core.precision import autocast_token


class LogitsAtPositions(nn.Module):
    """Wraps a causal LM: forward(input_ids, attention_mask, positions) -> logits at the flattened
    ``positions`` ([N, V']). The lm_head runs only on loss positions (prompt tokens skip it: for a
    small drafter lm_head is about half the MACs). DDP wraps this module, so its hooks see the
    whole forward.

    Models whose logits are post-processed (Gemma's soft-capping, Cohere's logit scale) take the
    plain full forward instead."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        cfg = model.config
        self.fast = (getattr(model, "base_model", None) is not None and model.base_model is not model
                     and not getattr(cfg, "final_logit_softcapping", None) and getattr(cfg, "logit_scale", None) is None)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.fast:
            hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                           use_cache=False).last_hidden_state
            return self.model.get_output_embeddings()(hidden[positions])
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return logits[positions]


def make_accelerator(precision: str, device: str):
    """An Accelerator for this run, and the precision it trains in (fp32 or bf16 autocast).
    'auto' is bf16 where the device computes it natively (a CUDA device with bf16; a CPU with AMX or
    AVX512-BF16), fp32 elsewhere: sd2.core.precision.

    Gradient accumulation is done by the trainer (``no_sync`` on all but the last micro-batch and
    a loss already normalised by the global token count), so accelerate's own accumulation, which
    divides the loss by the number of micro-steps, stays at 1."""
    from accelerate import Accelerator

    cuda = device.startswith("cuda") and torch.cuda.is_available()
    precision = autocast_token(precision, device if cuda else "cpu")
    mixed = "bf16" if precision == "bf16" else "no"
    return Accelerator(mixed_precision=mixed, cpu=not cuda), precision


def global_sum(accelerator, *values: float) -> list[float]:
    """Sum scalars over all processes (one small all-reduce)."""
    t = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    if accelerator.num_processes > 1:
        t = accelerator.reduce(t, reduction="sum")
    return t.tolist()
