"""Running under accelerate (one process, DDP over gloo on CPU or NCCL on GPUs, FSDP).

``Accelerator()`` reads its world from the launcher: plain ``python`` gives one process,
``torchrun --nproc_per_node N`` or ``accelerate launch`` gives N (on CPU, torchrun gives a 2-process
gloo world; ``accelerate launch --cpu --num_processes 2`` gave a world of 1 on our machines).
"""

from __future__ import annotations

import torch


def make_accelerator(precision: str, device: str):
    """An Accelerator for this run. precision 'auto' is bf16 autocast on a GPU that supports it,
    fp32 otherwise (CPU bf16 autocast is slower than fp32 on most CPUs).

    Gradient accumulation is done by the trainer (``no_sync`` on all but the last micro-batch and
    a loss already normalised by the global token count), so accelerate's own accumulation, which
    divides the loss by the number of micro-steps, stays at 1."""
    from accelerate import Accelerator

    cuda = device.startswith("cuda") and torch.cuda.is_available()
    if precision == "auto":
        precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    mixed = "bf16" if precision == "bf16" else "no"
    return Accelerator(mixed_precision=mixed, cpu=not cuda), precision


def global_sum(accelerator, *values: float) -> list[float]:
    """Sum scalars over all processes (one small all-reduce)."""
    t = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    if accelerator.num_processes > 1:
        t = accelerator.reduce(t, reduction="sum")
    return t.tolist()
