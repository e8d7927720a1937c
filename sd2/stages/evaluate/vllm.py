"""``evaluate.engine: vllm`` (``sd2 eval --engine vllm``): the target and each drafter served by vLLM.

Per temperature, vLLM serves the target alone, then the target with each drafter through
``speculative_config`` (sd2.serve.evaluate: how each drafter is given to vLLM, or why it cannot be),
one request at a time (batch size 1, the Spec-Bench protocol sd2's engine is timed with), after
``warmup`` untimed requests. The report is an ordinary report.json (``settings.engine: vllm``), so
``sd2 compare`` gates it like any other. Per drafter: ``lossless`` (greedy output equal to vLLM's
target alone, per prompt), MAL and acceptance from vLLM's counters (sd2/serve/metrics.py), the
wall-clock speedup over vLLM's target alone, and ``sd2_mal``: sd2's engine on the same drafter,
prompts and rounds (greedy; not for ngram, which is vLLM's own n-gram matcher, not sd2's prompt
lookup). Requests and the target's multi-turn history are built as sd2's engine builds them (collect.py).
"""

from __future__ import annotations

import statistics
from pathlib import Path

from sd2.core.artifacts import machine
from sd2.core.precision import resolve
from sd2.core.report import Baseline, Result, _r
from sd2.serve.evaluate import speculative_configs
from sd2.serve.metrics import counts_of_rounds, engine_rounds_on_vllm_schedule
from sd2.serve.worker import serve_apart
from sd2.stages.evaluate import collect


def evaluate_in_vllm(config, inputs, out_dir: Path, ctx) -> dict:
    out_dir = Path(out_dir)
    specs = speculative_configs(config, inputs, out_dir)
    setup = collect.load_target(config, inputs, ctx)          # the requests, as sd2's engine builds them
    drafters, infos, _ = collect.load_drafters(config, inputs, setup, ctx)
    prompts = [r.ids for r in setup.requests]
    # evaluate.dtype as resolved for this machine (auto: float32 on a CPU, as for sd2's engine)
    base = {"model": inputs.target.ref, "prompts": prompts, "max_tokens": config.max_new_tokens,
            "dtype": resolve(config.dtype, ctx.device, exact=True).dtype, "seed": ctx.seed, "one_by_one": True,
            "warmup": config.warmup, "repeats": config.repeats,
            "top_k": config.top_k, "top_p": config.top_p, "min_p": config.min_p}
    runs = []
    for t in config.temperatures:
        runs.append({**base, "name": f"target@{t}", "temperature": t})
        runs += [{**base, "name": f"{name}@{g}@{t}", "temperature": t,
                  "speculative_config": {**spec, "num_speculative_tokens": g}}
                 for name, spec in specs.items() for g in config.gammas]
        if specs:   # the target alone again, last: its passes bracket the drafters' (see _baseline)
            runs.append({**base, "name": f"target@{t}@end", "temperature": t})
    ctx.log.info("evaluate (vLLM): %d run(s) of %d request(s), one worker process and vLLM start each", len(runs),
                 len(prompts))
    # A worker process per run: in vLLM 0.32 (CPU) a second ngram proposer started in the process of
    # the first fails (AttributeError: '_lib_fn_wrapper' object has no attribute 'get');
    # tests/test_vllm_eagle3.py runs ngram at two γ.
    result = []
    for i, run in enumerate(runs):
        ctx.log.info("evaluate (vLLM): run %d/%d: %s", i + 1, len(runs), run["name"])
        result.append(serve_apart([run], out_dir / "vllm" / f"{i:02d}"))
    served = {r["name"]: r for res in result for r in res["runs"]}
    sd2_mal = _sd2_mals(config, setup, drafters)
    return _write(config, inputs, setup, infos, served, specs, sd2_mal, result[0]["vllm"], out_dir, ctx)


def _sd2_mals(config, setup, drafters) -> dict[tuple[str, int], float]:
    """sd2's engine MAL for each drafter and γ on vLLM's rounds (greedy), for the report's sd2_mal."""
    if 0.0 not in config.temperatures:
        return {}
    out = {}
    for d in drafters:
        for g in config.gammas:
            rounds = []
            for r in setup.requests:
                rounds += engine_rounds_on_vllm_schedule(setup.target, d.proposer, r.ids, g, config.max_new_tokens,
                                                         setup.eos)[1]
            out[(d.name, g)] = counts_of_rounds(rounds, g).mal
    return out


def _baseline(served: dict, t: float, ctx) -> dict:
    """vLLM's target alone at temperature ``t``: served first and, when drafters were served, again last.
    A worker process per run means the runs cannot interleave per prompt as sd2's engine does, so the
    target's wall-clock is the median over the passes of both runs: a machine that slows or speeds up
    during the comparison moves the baseline with the drafters. Measured (2-core EPYC, SmolLM2, 8
    prompts x 64 tokens): single runs of vLLM's target alone gave 34.3, 42.7 and 39.7 tok/s on three
    invocations. Greedy outputs of the two runs are the same requests and are compared."""
    first, end = served[f"target@{t}"], served.get(f"target@{t}@end")
    if end is None:
        return first
    if t == 0 and end["outputs"] != first["outputs"]:
        ctx.log.warning("evaluate (vLLM): the target alone's greedy outputs differ between its first and last run "
                        "(%d of %d prompts); lossless is checked against the first",
                        sum(a != b for a, b in zip(first["outputs"], end["outputs"])), len(first["outputs"]))
    walls = first["walls"] + end["walls"]
    return {**first, "walls": walls, "seconds": statistics.median(walls)}


def _write(config, inputs, setup, infos, served, specs, sd2_mal, vllm_version: str, out_dir: Path, ctx) -> dict:
    ids = [r.id for r in setup.requests]
    baseline, results = {}, []
    for t in config.temperatures:
        tgt = _baseline(served, t, ctx)
        baseline[str(t)] = Baseline(wall_s=_r(tgt["seconds"]), tokens=tgt["tokens"], walls=[_r(w) for w in tgt["walls"]],
                                    tokens_per_s=_r(tgt["tokens"] / max(tgt["seconds"], 1e-9)))
        for name in specs:
            for g in config.gammas:
                run = served[f"{name}@{g}@{t}"]
                spec = run["spec"]
                same = [a == b for a, b in zip(run["outputs"], tgt["outputs"])]
                info = infos[name]
                results.append(Result(
                    drafter=name, kind=info.kind, gamma=g, temperature=t, mal=_r(spec["mal"]),
                    acceptance_rate=_r(spec["acceptance_rate"]),
                    acceptance_per_position=[_r(x) for x in spec["acceptance_per_position"]],
                    tokens=run["tokens"], requests=len(ids), drafted=spec["draft_tokens"], accepted=spec["accepted"],
                    target_forwards=spec["decode_steps"] or spec["drafts"], wall_s=_r(run["seconds"]), walls=[_r(w) for w in run["walls"]],
                    target_wall_s=_r(tgt["seconds"]), mac_ratio=info.mac_ratio, sparsity=info.sparsity,
                    macs_per_token=info.macs.get("effective", 0), dense_macs_per_token=info.macs.get("dense", 0),
                    lossless=all(same) if t == 0 else None,
                    lossless_mismatches=[i for i, s in zip(ids, same) if not s] if t == 0 else [],
                    sd2_mal=_r(sd2_mal.get((name, g))) if t == 0 and info.kind != "prompt_lookup" else None))
    for name, spec in specs.items():
        infos[name].settings = {**infos[name].settings, "vllm": spec}
    return collect.write(config, inputs, setup, infos, baseline, results, out_dir, ctx, device="vllm", engine="vllm",
                         machine={**machine(), "vllm": vllm_version})
