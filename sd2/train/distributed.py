"""Running under accelerate (one process, DDP over gloo on CPU or NCCL on GPUs, FSDP2: sd2/train/fsdp.py).

``Accelerator()`` reads its world from the launcher: plain ``python`` gives one process,
``torchrun --nproc_per_node N`` or ``accelerate launch`` gives N (on CPU, torchrun gives a 2-process
gloo world; ``accelerate launch --cpu --num_processes 2`` gave a world of 1 on our machines).
"""

from __future__ import annotations

import torch

from sd2.core.precision import autocast_token


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
    accelerator = Accelerator(mixed_precision=mixed, cpu=not cuda)
    from sd2.train.fsdp import enable_on_cpu

    enable_on_cpu(accelerator)   # under an FSDP launch config: FSDP2 on CPU too (accelerate alone falls back to DDP)
    return accelerator, precision


def global_sum(accelerator, *values: float) -> list[float]:
    """Sum scalars over all processes (one small all-reduce)."""
    t = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    if accelerator.num_processes > 1:
        t = accelerator.reduce(t, reduction="sum")
    return t.tolist()
