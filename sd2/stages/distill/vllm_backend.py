"""The vLLM backend: offline ``LLM.generate`` on token prompts, tensor-parallel across GPUs.

vLLM is an optional extra (``pip install 'sd2[vllm]'``). The requests are built from the same token
prompts as the HF backend (so the chat template, multi-turn carrying and loss mask are shared),
and its outputs are normalised to ``Generated`` (the stop token kept, as the HF backend does).
Request building is plain data, unit-tested without vLLM.
"""

from __future__ import annotations

from sd2.core.errors import Sd2Error
from sd2.stages.distill.generate import Generated, Sampling

INSTALL = "pip install 'sd2[vllm]'  (or: pip install vllm)"


def sampling_kwargs(s: Sampling, seed: int) -> dict:
    """Keyword arguments of ``vllm.SamplingParams`` for these settings."""
    return {
        "n": 1,
        "temperature": float(s.temperature),      # vLLM treats 0 as greedy
        "top_p": float(s.top_p),
        "max_tokens": int(s.max_new_tokens),
        "stop_token_ids": list(s.stop_ids),
        "seed": int(seed),
        "skip_special_tokens": False,
        "detokenize": False,                      # sd2 decodes the ids itself
    }


def requests(prompts: list[list[int]]) -> list[dict]:
    """Token prompts as vLLM inputs (``TokensPrompt`` dicts): no re-tokenization of the template."""
    return [{"prompt_token_ids": list(p)} for p in prompts]


def to_generated(token_ids, finish_reason: str | None, stop_reason, stop_ids: tuple[int, ...]) -> Generated:
    """A vLLM completion as ``Generated``. vLLM keeps a stop token id in ``token_ids`` (and reports
    an explicit stop token in ``stop_reason``); append it if a version left it out."""
    ids = list(token_ids)
    stopped = finish_reason == "stop"
    if stopped and (not ids or ids[-1] not in stop_ids) and isinstance(stop_reason, int):
        ids.append(stop_reason)
    return Generated(ids, stopped)


class VllmGenerator:
    def __init__(self, model_ref: str, sampling: Sampling, tensor_parallel_size: int, dtype: str, seed: int,
                 trust_remote_code: bool = False):
        try:
            import vllm
        except ImportError:
            raise Sd2Error(f"distill.backend is 'vllm' but vLLM is not installed: {INSTALL}; "
                           "or set distill.backend: hf") from None
        self.vllm = vllm
        self.sampling = sampling
        self.llm = vllm.LLM(model=model_ref, tensor_parallel_size=tensor_parallel_size, dtype=dtype, seed=seed,
                            trust_remote_code=trust_remote_code)

    def generate(self, prompts: list[list[int]], seed: int = 0, progress=None) -> list[Generated]:
        params = self.vllm.SamplingParams(**sampling_kwargs(self.sampling, seed))
        outs = self.llm.generate(requests(prompts), params, use_tqdm=False)
        if progress is not None:
            progress.update(len(prompts))
        return [to_generated(o.outputs[0].token_ids, o.outputs[0].finish_reason, o.outputs[0].stop_reason,
                             self.sampling.stop_ids) for o in outs]
