"""Precision that follows the machine: ``dtype: auto`` resolves to bf16 only where it is computed natively.

Measured (``benchmarks/precision_probe.py``; a 64x576 by 576x1536 matmul, 2 threads):
- Intel Xeon with AMX: bf16 about 2x faster than fp32.
- AMD EPYC (Zen 5) with AVX512-BF16: bf16 248.7 against fp32 63.9 GMAC/s, 3.9x faster.
- AMD EPYC with AVX2 only: bf16 9.6 against fp32 62.1 GMAC/s, **6.5x slower** (reported), and 0.67
  against 72.4 on the one measured here (2026-12-03, torch 2.13.0), **about 100x slower**: without
  bf16 instructions there is no fast bf16 kernel.

So the rule is decided by the CPU's instruction set, which torch reports
(``torch.cpu.get_capabilities()``: ``amx_bf16``, ``avx512_bf16``), never by a timing probe: a timed
choice could flip with the machine's load, and the resolved precision enters stage fingerprints.
On CUDA, bf16 where ``torch.cuda.is_bf16_supported()``. ``ONEDNN_MAX_CPU_ISA`` below the bf16
instructions counts as no native bf16: with it (plus ``ATEN_CPU_CAPABILITY=avx2``), a newer CPU
behaves as an AVX2-only one, bf16 included, which is how the suite is checked for that kind.

Two vocabularies exist in recipes and are resolved here once: the model dtype of distill and
evaluate (``auto | float32 | bfloat16 | float16``) and finetune's autocast precision
(``auto | fp32 | bf16``).
"""

from __future__ import annotations

import functools
import logging
import os

from sd2.core.errors import Sd2Error
from dataclasses import asdict, dataclass

log = logging.getLogger("sd2")

DTYPES = ("auto", "float32", "bfloat16", "float16")
# Overrides what auto resolves to, on every device: the test suite sets float32, so that its numerics
# are the same on every CPU kind (tests of bf16 set it themselves).
FORCE_ENV = "SD2_AUTO_DTYPE"
PRECISIONS = ("auto", "fp32", "bf16")

# What running bf16 without native support costs, as measured on an AVX2-only AMD EPYC (see above).
_SLOW_BF16 = ("runs bf16 matmuls in software, 6.5x to 100x slower than float32 (9.6 against 62 GMAC/s reported "
              "on an AVX2-only AMD EPYC, 0.67 against 72 measured on another)")


@dataclass(frozen=True)
class Precision:
    """A resolved precision: ``dtype`` is a torch dtype name (float32 | bfloat16 | float16)."""

    requested: str
    dtype: str
    reason: str

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)

    def to_dict(self) -> dict:
        return asdict(self)


@functools.lru_cache(maxsize=None)
def cpu_info() -> dict:
    """The CPU as torch sees it: model name, the kernel capability torch dispatches to (AVX2,
    AVX512, ...) and the bf16 instruction sets. Every committed timing states these."""
    import torch

    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return {"cpu": caps.get("cpu_name") or _lscpu_name(), "capability": torch.backends.cpu.get_cpu_capability(),
            "amx_bf16": bool(caps.get("amx_bf16")), "avx512_bf16": bool(caps.get("avx512_bf16")),
            "cores": caps.get("num_physical_cores") or torch.get_num_threads()}


def _lscpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or "unknown"


# oneDNN's ISA levels below its bf16 instructions (AVX512_CORE_BF16); other values, DEFAULT and ALL
# included, leave them to the CPU (oneDNN ignores a value it does not know).
_BELOW_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}
_WARNED: set[tuple[str, str]] = set()


def native_bf16(device: str | object = "cpu") -> tuple[bool, str]:
    """Whether ``device`` computes bf16 natively, and why (a sentence for the log and manifest)."""
    device = str(device)
    if device.startswith("cuda"):
        import torch

        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return ok, f"CUDA device {'supports' if ok else 'does not support'} bf16"
    info = cpu_info()
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if isa in _BELOW_BF16:
        # oneDNN, which runs torch's bf16 matmuls, is held below the bf16 instructions: they are unused
        return False, f"CPU {info['cpu']}: ONEDNN_MAX_CPU_ISA={isa} keeps oneDNN off its bf16 instructions"
    if info["amx_bf16"]:
        return True, f"CPU {info['cpu']} has AMX-BF16"
    if info["avx512_bf16"]:
        return True, f"CPU {info['cpu']} has AVX512-BF16"
    return False, f"CPU {info['cpu']} ({info['capability']}) has neither AMX-BF16 nor AVX512-BF16"


def check_env() -> None:
    """Refuses a malformed SD2_AUTO_DTYPE before any work (Sd2Error naming the variable)."""
    forced = os.environ.get(FORCE_ENV, "")
    if forced and forced not in ("float32", "bfloat16"):
        raise Sd2Error(f"{FORCE_ENV} must be float32 or bfloat16 (what dtype: auto resolves to), got {forced!r}; "
                       f"unset it to let auto follow the machine")


def resolve(requested: str, device: str | object = "cpu", *, exact: bool = False, quiet: bool = False) -> Precision:
    """Resolve a recipe's ``dtype`` (auto | float32 | bfloat16 | float16) for ``device``.

    ``auto``: bfloat16 where the device computes it natively, float32 elsewhere. ``exact`` (evaluate):
    on a CPU, auto is float32 always: losslessness is checked token for token, and in bf16 a verify
    forward over gamma + 1 tokens rounds differently from one-token decoding, which flips greedy
    near-ties (seen on the AVX512-BF16 EPYC: the tiny pipeline and SmolLM2 both came out "NOT
    LOSSLESS" in bf16, lossless in fp32). An explicit ``bfloat16`` on a CPU without native bf16 is
    kept, with a warning (once per process) of what it costs. Raises ValueError for a name outside
    DTYPES, Sd2Error for a malformed SD2_AUTO_DTYPE."""
    if requested not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {requested!r}")
    check_env()
    forced = os.environ.get(FORCE_ENV, "")
    if requested == "auto" and forced:
        return Precision("auto", forced, f"{FORCE_ENV}={forced} in the environment")
    cpu = not str(device).startswith("cuda")
    native, why = native_bf16(device)
    if requested == "auto":
        if exact and cpu:
            return Precision("auto", "float32", "evaluation on a CPU: losslessness is checked token for token, and "
                             "bf16 verify forwards round differently from one-token decoding")
        return Precision("auto", "bfloat16" if native else "float32", why)
    if requested == "bfloat16" and not native and cpu and not quiet and (requested, why) not in _WARNED:
        _WARNED.add((requested, why))
        log.warning("dtype bfloat16 on a CPU without native bf16: %s; this %s. Use dtype: auto (float32 here).",
                    why, _SLOW_BF16)
    return Precision(requested, requested, "set in the recipe" + ("" if native or requested != "bfloat16" else f"; {why}"))


def resolve_autocast(requested: str, device: str | object = "cpu", *, quiet: bool = False) -> Precision:
    """Resolve finetune's ``precision`` (auto | fp32 | bf16): the autocast precision of training.
    Same rule as :func:`resolve`; ``dtype`` is ``float32`` or ``bfloat16``."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    p = resolve({"auto": "auto", "fp32": "float32", "bf16": "bfloat16"}[requested], device, quiet=quiet)
    return Precision(requested, p.dtype, p.reason)


def autocast_token(requested: str, device: str | object = "cpu", *, quiet: bool = True) -> str:
    """finetune's precision as resolved for ``device``: ``fp32`` or ``bf16``."""
    return "bf16" if resolve_autocast(requested, device, quiet=quiet).dtype == "bfloat16" else "fp32"


def legacy_autocast(device: str | object) -> str:
    """What finetune's ``precision: auto`` meant before 2026-12-02: bf16 autocast on a CUDA device with
    bf16, fp32 on every CPU."""
    return "bf16" if str(device).startswith("cuda") and native_bf16(device)[0] else "fp32"
