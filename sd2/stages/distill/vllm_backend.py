"""The vLLM backend: offline ``LLM.generate`` on token prompts, on a CPU or tensor-parallel across GPUs.

vLLM is optional (``SD2_VLLM=1 bash scripts/setup.sh``; vLLM's CPU build on a machine without a
GPU). It starts through sd2.serve.env, which sets what vLLM's CPU backend needs (its KV cache size,
the engine in this process) and turns start-up failures into errors naming the fix. The requests are
built from the same token prompts as the HF backend (so the chat template, multi-turn carrying and
loss mask are shared), and its outputs are normalised to ``Generated`` (the stop token kept, as the
HF backend does). Request building is plain data, unit-tested without vLLM; tests/test_vllm_distill.py
runs the backend on a tiny model.
"""

from __future__ import annotations

from sd2.stages.distill.generate import Generated, Sampling


def sampling_kwargs(s: Sampling, seed: int) -> dict:
    """Keyword arguments of ``vllm.SamplingParams`` for these settings."""
    return {
        "n": 1,
        "temperature": float(s.temperature),      # vLLM treats 0 as greedy
        "top_p": float(s.top_p),
        "top_k": int(s.top_k),                    # 0: off, as in sd2's engine and vLLM
        "min_p": float(s.min_p),
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
        from sd2.serve import env

        what = "distill.backend: vllm"
        self.vllm = env.import_vllm(what + " (or set distill.backend: hf)")
        self.sampling = sampling
        self.llm = env.start(model_ref, what, dtype=dtype, seed=seed, tensor_parallel_size=tensor_parallel_size,
                             trust_remote_code=trust_remote_code, temperature=sampling.temperature)

    def generate(self, prompts: list[list[int]], seed: int = 0, progress=None) -> list[Generated]:
        params = self.vllm.SamplingParams(**sampling_kwargs(self.sampling, seed))
        outs = self.llm.generate(requests(prompts), params, use_tqdm=False)
        if progress is not None:
            progress.update(len(prompts))
        return [to_generated(o.outputs[0].token_ids, o.outputs[0].finish_reason, o.outputs[0].stop_reason,
                             self.sampling.stop_ids) for o in outs]
