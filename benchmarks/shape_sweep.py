"""``gamma: auto`` against every fixed draft shape, on the same prompts, in one run.

Goal checked: "gamma: auto within 3% of the best fixed shape on the same prompts" (speedup of the
shape auto chooses ÷ speedup of the best fixed (gamma, width) of the grid it chooses from).

The real pair (benchmarks/peers.py's ``load_pair``): target SmolLM2-135M-Instruct (GGUF dequantised
to fp32), drafter ``--drafter`` (a trained full-vocabulary drafter folder) or the target's layers 0-5,
28, 29 untrained. Prompts: peers.py's ``load_sets`` (``--set mtbench``: MT-bench first turns held apart
from the quickstart's training prompts; ``summarize``: long ShareGPT answers to summarise). Greedy,
batch 1, ``--threads`` torch threads.

What runs, all through the evaluate stage's own code (sd2.stages.evaluate.measure), so this measures
what ``sd2 run`` / ``sd2 eval`` would do:
1. ``auto_shapes``: ``gamma: auto`` picks (gamma, width) from gamma 1..``--max-gamma`` and
   ``--widths``, from greedy pilot rounds on the first ``--pilot-prompts`` prompts of the set (which
   are also timed below, as in the evaluate stage), the measured
   drafter cost c and the target's v(n) (sd2.engine.shape); the same grid as the fixed shapes below.
2. ``measure``: the timing protocol of evaluate, interleaved per prompt: for every prompt, the target
   alone, then the drafter at every fixed (gamma, width) of the grid, then at auto's shape (a separate
   proposer timed on its own, so auto's speedup and the fixed cell of the same shape differ only by
   timing noise: the table shows how large that noise is). ``--repeats`` passes; a decoder's wall is
   the sum over prompts of a pass, median over passes. Every output is checked token for token
   against the target alone.

Reported, per shape: speedup over the target alone (sd2's own target-only decoding), MAL, auto's
modeled speedup for that shape (from the pilot) and the same cost model evaluated on the timed
rounds (``rows_of``); then auto's shape, its modeled vs measured speedup, the best fixed shape and
auto / best fixed.

Small: 4 prompts, 32 tokens, 2 passes of the target and 11 drafter runs per prompt (not timed yet;
the check with 1 prompt, 8 tokens, 1 pass took 45-52 s, model loading and pilot included, on the
2-core VM at load average 7-8)::

    PYTHONPATH=. .venv/bin/python benchmarks/shape_sweep.py --drafter artifacts/quickstart/02_dense.finetune \\
        --prompts 4 --max-new-tokens 32 --out artifacts/shape_sweep.json

The full one, for the committed result (a quiet machine; writes benchmarks/results/shape_sweep.{json,md})::

    PYTHONPATH=. .venv/bin/python benchmarks/shape_sweep.py --drafter artifacts/quickstart/02_dense.finetune \\
        --prompts 16 --max-new-tokens 64 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from peers import as_requests, load_pair, load_sets

GOAL = 0.97   # auto's speedup at least 97% of the best fixed shape's


def rows_of(cells, baseline, table, c, verify_cost) -> list[dict]:
    """One row per measured (drafter, gamma, width): speedup over the target alone, MAL, auto's modeled
    speedup for the shape (from its pilot) and the post-hoc model: the cost model of sd2.engine.shape
    evaluated on the timed rounds themselves, committed tokens / sum over rounds of
    (depth·c + v(1 + nodes)) in target decode steps (rounds near the end of an answer draft less than
    gamma, which the pilot's model, gamma·c per round, does not see)."""
    modeled = {(r["gamma"], r["width"]): r["predicted_speedup"] for r in table}
    base = baseline[0.0]["wall_s"]
    rows = []
    for (name, gamma, width, _), cell in cells.items():
        s = cell.stats.summary(gamma)
        wall = statistics.median(cell.walls)
        rounds = [r for _, rs in cell.stats.requests for r in rs]
        costs = [verify_cost(1 + r.drafted) for r in rounds]
        post = (s["tokens"] / sum(r.depth * c + v for r, v in zip(rounds, costs))
                if c is not None and None not in costs else None)
        rows.append({"decoder": name, "gamma": gamma, "width": width, "speedup": round(base / wall, 4),
                     "wall_s": round(wall, 3), "walls": [round(w, 3) for w in cell.walls], "mal": round(s["mal"], 4),
                     "acceptance_rate": round(s["acceptance_rate"], 4),
                     "modeled_by_auto": round(modeled[(gamma, width)], 4) if (gamma, width) in modeled else None,
                     "modeled_post_hoc": round(post, 4) if post is not None else None, "lossless": cell.lossless})
    return rows


def markdown(result: dict) -> str:
    s, a = result["settings"], result["auto"]
    m = result["machine"]
    lines = [f"Set {s['set']}, {s['prompts']} prompts, {s['max_new_tokens']} new tokens, {s['repeats']} passes, "
             f"{s['torch_threads']} torch thread(s); c = {result['c_measured']}; machine {m.get('host')} "
             f"({m.get('cpu_count')} CPUs), load average {result['load_avg_start'][0]:.1f} at the start, "
             f"{result['load_avg_end'][0]:.1f} at the end; {result['seconds']} s.",
             "", "| decoder | gamma | width | speedup | MAL | modeled (auto's pilot) | modeled (timed passes) | lossless |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['decoder']} | {r['gamma']} | {r['width']} | {r['speedup']:.3f}x | {r['mal']:.3f} | "
                     f"{r['modeled_by_auto']} | {r['modeled_post_hoc']} | {r['lossless']} |")
    lines += ["", f"auto chose gamma {a['gamma']}, width {a['width']} (modeled {a['modeled_speedup']}x, measured "
                  f"{a['measured_speedup']}x); best fixed: gamma {a['best_fixed']['gamma']}, width "
                  f"{a['best_fixed']['width']} ({a['best_fixed']['speedup']}x); auto / best fixed = "
                  f"{a['auto_over_best_fixed']} (goal >= {GOAL}: {'met' if a['goal_met'] else 'missed'}). The fixed cell "
                  f"of auto's shape: {a['fixed_cell_of_auto_shape']}x, {a['choice_over_best_fixed']} of the best fixed "
                  f"(the choice, without auto's own timing); timing noise between the two runs of that shape: "
                  f"{a['same_shape_noise']}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--drafter", default=None, help="a trained full-vocabulary drafter folder")
    ap.add_argument("--set", choices=["mtbench", "summarize"], default="mtbench")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--mt-skip", type=int, default=32, help="MT-bench prompts skipped (those the drafter trained on)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--max-gamma", type=int, default=5, help="the grid's gammas 1..N, also auto's range")
    ap.add_argument("--widths", type=int, nargs="+", default=[1, 2], help="the grid's widths, also auto's")
    ap.add_argument("--pilot-prompts", type=int, default=2, help="gamma: auto's pilot prompts (the set's first)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "shape_sweep.json"),
                    help="the JSON result; the markdown table goes beside it (.md)")
    args = ap.parse_args()

    import torch
    from tqdm import tqdm

    load_start = os.getloadavg()
    t_start = time.time()
    torch.set_num_threads(args.threads)
    from sd2.core.artifacts import machine, package_versions
    from sd2.core.models import model_eos_ids
    from sd2.engine.cached import CachedLM
    from sd2.engine.drafter import DrafterProposer
    from sd2.engine.proposer import Sampling
    from sd2.engine.sampling import DraftVocab
    from sd2.stages.evaluate import measure as M

    target, tok, drafter, drafter_desc = load_pair(args.drafter)
    eos = set(model_eos_ids(target, tok))
    n_mt, n_sum = (args.prompts, 0) if args.set == "mtbench" else (0, args.prompts)
    requests = as_requests(args.set, load_sets(tok, n_mt, n_sum, args.mt_skip)[args.set])
    T, D = CachedLM(target), CachedLM(drafter)
    vocab = DraftVocab(target.config.vocab_size)
    fixed = M.Drafter("fixed", DrafterProposer("fixed", D, vocab, eos), D, vocab)
    auto = M.Drafter("auto", DrafterProposer("auto", D, vocab, eos), D, vocab)

    t0 = time.perf_counter()
    shape = M.auto_shapes(T, [auto], requests, args.max_gamma, args.widths, args.max_new_tokens, eos,
                          args.pilot_prompts)["auto"]
    pilot_s = time.perf_counter() - t0
    print(json.dumps({"auto": {"gamma": shape.gamma, "width": shape.width,
                               "modeled_speedup": round(shape.predicted_speedup, 3), "pilot_s": round(pilot_s, 1)}}),
          flush=True)
    shapes = {"fixed": M.grid([fixed], list(range(1, args.max_gamma + 1)), args.widths)["fixed"],
              "auto": [(shape.gamma, shape.width)]}
    baseline, cells, _ = M.measure(T, [fixed, auto], requests, shapes, [Sampling()], args.max_new_tokens,
                                   args.repeats, args.warmup, 0, eos,
                                   progress=lambda it, **kw: tqdm(it, total=len(requests), **kw))
    c = M.c_measured(D, T)
    rows = rows_of(cells, baseline, shape.table, c, lambda n: M.verify_cost(T, n))

    best = max((r for r in rows if r["decoder"] == "fixed"), key=lambda r: r["speedup"])
    auto_row = next(r for r in rows if r["decoder"] == "auto")
    same = next(r for r in rows if r["decoder"] == "fixed" and (r["gamma"], r["width"]) == (shape.gamma, shape.width))
    ratio = auto_row["speedup"] / best["speedup"]
    result = {
        "what": "gamma: auto vs every fixed (gamma, width) of the grid it chooses from, same prompts, greedy, batch 1, "
                "interleaved per prompt (sd2.stages.evaluate.measure), median over passes; speedup over sd2's "
                "target-only decoding",
        "target": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to fp32)", "drafter": drafter_desc,
        "settings": {"set": args.set, "prompts": len(requests), "prompt_ids": [r.id for r in requests],
                     "max_new_tokens": args.max_new_tokens, "gammas": list(range(1, args.max_gamma + 1)),
                     "widths": args.widths, "pilot_prompts": args.pilot_prompts, "repeats": args.repeats,
                     "warmup": args.warmup, "torch_threads": torch.get_num_threads(), "dtype": "float32", "mt_skip": args.mt_skip},
        "target_alone": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in baseline[0.0].items()},
        "c_measured": round(c, 4) if c is not None else None,
        "auto": {"gamma": shape.gamma, "width": shape.width, "modeled_speedup": round(shape.predicted_speedup, 4),
                 "measured_speedup": auto_row["speedup"], "pilot_s": round(pilot_s, 2),
                 "best_fixed": {k: best[k] for k in ("gamma", "width", "speedup")},
                 "auto_over_best_fixed": round(ratio, 4), "goal": GOAL, "goal_met": ratio >= GOAL,
                 "fixed_cell_of_auto_shape": same["speedup"],
                 "choice_over_best_fixed": round(same["speedup"] / best["speedup"], 4),
                 "same_shape_noise": round(abs(auto_row["speedup"] / same["speedup"] - 1), 4)},
        "rows": rows, "all_lossless": all(r["lossless"] for r in rows),
        "load_avg_start": load_start, "load_avg_end": os.getloadavg(), "seconds": round(time.time() - t_start, 1),
        "machine": machine(), "versions": package_versions(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    md = markdown(result)
    out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
