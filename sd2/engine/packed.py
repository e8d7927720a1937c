"""Prepacked oneDNN Linears for decoding on CPU: a verify forward over a few tokens costs one decode step.

Why sd2 has its own code here (measured, 2026-12-03, 2-core AMD EPYC Zen 5, AVX512, torch 2.13 CPU,
fp32, SmolLM2-135M-Instruct with 300 cached tokens, median of 25 forwards, idle machine): torch's
``nn.Linear`` on CPU runs a GEMV for one token but a GEMM that repacks the whole weight on every call
for two or more, so a forward over 3 tokens cost **2.08** decode steps (93.7 against 45.0 ms), over
a 5-node tree 1.49, over 8 tokens 1.53. That is the verify cost v(n) of the cost model
MAL/(γc + v), and it ate most of what a drafter saves. With each weight reordered once into oneDNN's
blocked layout (``torch.ops.mkldnn._reorder_linear_weight``, the op torch's Inductor uses when it
freezes a CPU model) and applied with ``torch.ops.mkldnn._linear_pointwise``, the same forwards cost
30.8 ms for one token (**1.46x faster decoding**) and v = 1.05 (3 tokens), 1.00 (5-node tree), 1.09
(8 tokens). MKL's packed GEMM (``torch.ops.mkl._mkl_linear``) was measured too and did not help
(v(3) = 1.94). Logits differ from the unpacked model's by at most 9e-5 (same argmax). A rerun through
``pack_linears`` itself (benchmarks/verify_cost.py, 2026-12-03 04:35, the same machine kind, idle, every
forward about 10% slower that hour): one token 49.4 -> 35.5 ms, v = 2.27 -> 1.16 (3 tokens), 1.70 -> 1.11
(5-node tree), 1.81 -> 1.25 (8 tokens).

A packed Linear keeps its weight and falls back to ``F.linear`` whenever packing cannot be right:
gradients are wanted (the op has no backward), the input is not a CPU tensor of the weight's dtype,
or the weight changed since it was packed (another tensor, or an in-place update: its version
counter moved), in which case it is packed again on the next no-grad call. So training a packed
module stays correct. Each weight is checked once against ``F.linear`` when it is packed; a mismatch
or a missing op leaves that Linear as it was.

Only float32 is packed (the precision evaluation uses on CPU, where losslessness is checked token for
token); bf16 was not measured. ``SD2_PACKED_LINEARS=0`` turns packing off. Memory: a packed copy
of every Linear weight (about the model's size again).
"""

from __future__ import annotations

import logging
import os
import types
import weakref

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

ENV = "SD2_PACKED_LINEARS"
BATCH_HINT = 4   # the rows oneDNN lays the weight out for: verify forwards carry 2-8 tokens (measured above)
# Linear -> (weight, version, packed or None). Kept off the module: a oneDNN tensor has no storage, so a
# module holding one could not be deep-copied or saved; a copy of a packed module packs itself on first use.
_STATE: "weakref.WeakKeyDictionary[torch.nn.Linear, tuple]" = weakref.WeakKeyDictionary()


def enabled() -> bool:
    """False when ``SD2_PACKED_LINEARS`` is 0/false/no/off, or the oneDNN ops are missing."""
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _version(w: torch.Tensor) -> int | None:
    try:
        return w._version
    except RuntimeError:     # an inference tensor has no version counter: never trust a packed copy of it
        return None


def _pack(mod: torch.nn.Linear) -> tuple:
    """(weight, its version, packed weight or None): None when it cannot be packed right (no version
    counter, an op error, or a mismatch against F.linear)."""
    w = mod.weight
    version = _version(w)
    if version is None:
        return w, version, None
    wd = w.detach()
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(wd, BATCH_HINT)
        x = torch.randn(2, wd.shape[1], dtype=wd.dtype)
        got = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [None], "")
        want = F.linear(x, wd)
    except RuntimeError as e:
        log.debug("packed linear unavailable for %s: %s", tuple(wd.shape), e)
        return w, version, None
    if not torch.allclose(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max().clamp(min=1.0))):
        log.debug("packed linear disagrees with F.linear for %s; left unpacked", tuple(wd.shape))
        return w, version, None
    return w, version, packed


def _forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    w = self.weight
    if (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad)) or x.device.type != "cpu" \
            or x.dtype != w.dtype:
        return F.linear(x, w, self.bias)
    st = _STATE.get(self)
    if st is None or st[0] is not w or st[1] != _version(w):     # a copy, or trained or replaced since packed
        st = _STATE[self] = _pack(self)
    if st[2] is None:
        return F.linear(x, w, self.bias)
    bias = None if self.bias is None else self.bias.detach()
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), st[2], bias, "none", [None], "")


def pack_linears(model: torch.nn.Module) -> int:
    """Give every float32 CPU ``nn.Linear`` of ``model`` (exactly that class, not a subclass) a prepacked oneDNN weight and a forward that
    uses it (module docstring). Idempotent; returns how many Linears are packed now (0 when disabled,
    on another device or dtype, or when the ops are missing)."""
    if not enabled():
        return 0
    n = 0
    for mod in model.modules():
        # exactly nn.Linear: a subclass (a compressed or LoRA Linear) has a forward of its own to keep
        if type(mod) is not torch.nn.Linear or mod.weight.device.type != "cpu" or mod.weight.dtype != torch.float32:
            continue
        if getattr(mod.__dict__.get("forward"), "__func__", None) is not _forward:
            state = _pack(mod)
            if state[2] is None:
                continue
            _STATE[mod] = state
            mod.forward = types.MethodType(_forward, mod)
        n += 1
    return n
