"""``evaluate.engine: vllm`` (``sd2 eval --engine vllm``): the target and each drafter served by vLLM.

Per temperature, vLLM serves the target alone, then the target with each drafter through
``speculative_config``, one request at a time (batch size 1, the Spec-Bench protocol sd2's engine is
timed with), after ``warmup`` untimed requests:
- a standalone drafter as ``draft_model`` (its folder; it must share the target's tokenizer and
  have the full vocabulary: ``sd2 publish`` writes the full-vocabulary equivalent of a trimmed one);
- an EAGLE-1 head as ``eagle``, exported to vLLM's layout first (sd2/heads/export.py) under
  ``out_dir/vllm_exports``; heads vLLM cannot run are refused with the reason;
- ``evaluate.prompt_lookup`` as vLLM's own ``ngram`` (``prompt_lookup_max/min`` = max/min_ngram).
The report is an ordinary report.json (``settings.engine: vllm``), so ``sd2 compare`` gates it like
any other. Per drafter: ``lossless`` (greedy output equal to vLLM's target alone, per prompt), MAL
and acceptance from vLLM's counters (sd2/serve/metrics.py), the wall-clock speedup over vLLM's
target alone, and ``sd2_mal``: sd2's engine on the same drafter, prompts and rounds (greedy; not for
ngram, which is vLLM's own n-gram matcher, not sd2's prompt lookup).
Requests and the target's multi-turn history are built as sd2's engine builds them (collect.py).
"""

from __future__ import annotations

from pathlib import Path

from sd2.core.errors import Sd2Error


def conflicts(config) -> list[str]:
    """What engine: vllm needs that ``config`` does not have (evaluate.Config validates with it)."""
    bad = []
    if not config.decode:
        bad.append("decode: true (vLLM decodes; decode: false is sd2's teacher forcing)")
    if config.gamma == "auto":
        bad.append("a fixed gamma, not auto (vLLM drafts a fixed num_speculative_tokens)")
    if (config.width if isinstance(config.width, list) else [config.width]) != [1]:
        bad.append("width 1 (vLLM's draft_model, eagle and ngram draft chains)")
    return bad


def speculative_configs(config, inputs, out_dir: Path) -> dict[str, dict]:
    """{drafter name: vLLM speculative_config without num_speculative_tokens}; refusals as Sd2Error."""
    from sd2 import vocab
    from sd2.core.models import load_tokenizer, same_tokenizer
    from sd2.heads import io
    from sd2.heads.export import vllm_unsupported, write_vllm_eagle

    tok = load_tokenizer(inputs.target)
    out = {}
    for name, src in (inputs.drafters or {}).items():
        ref = Path(src.ref)
        if io.is_head(ref):
            why = vllm_unsupported(io.read_config(ref))
            if why is not None:
                raise Sd2Error(f"evaluate.engine: vllm: drafter {name!r} ({ref}) has {why}; evaluate it with "
                               "engine: sd2 (sd2 eval without --engine vllm)")
            dest = out_dir / "vllm_exports" / name
            dest.mkdir(parents=True, exist_ok=True)
            write_vllm_eagle(ref, dest)
            out[name] = {"model": str(dest), "method": "eagle"}
        elif (ref / vocab.MAP_FILE).is_file():
            raise Sd2Error(f"evaluate.engine: vllm: drafter {name!r} ({ref}) has a trimmed vocabulary, which vLLM's "
                           "draft_model cannot load; `sd2 publish` writes its full-vocabulary equivalent: evaluate that")
        elif bool(inputs.cross_tokenizer) or not same_tokenizer(tok, load_tokenizer(src)):
            raise Sd2Error(f"evaluate.engine: vllm: drafter {name!r} ({ref}) has another tokenizer than the target; "
                           "vLLM's draft_model needs the target's vocabulary (engine: sd2 drafts across tokenizers)")
        else:
            out[name] = {"model": str(ref), "method": "draft_model"}
    if config.prompt_lookup:
        pl = config.prompt_lookup
        out[pl.name] = {"method": "ngram", "prompt_lookup_max": pl.max_ngram, "prompt_lookup_min": pl.min_ngram}
    return out


def evaluate_in_vllm(config, inputs, out_dir: Path, ctx) -> dict:
    from sd2.serve.worker import serve_apart
    from sd2.stages.evaluate import collect

    out_dir = Path(out_dir)
    specs = speculative_configs(config, inputs, out_dir)
    setup = collect.load_target(config, inputs, ctx)          # the requests, as sd2's engine builds them
    drafters, infos, _ = collect.load_drafters(config, inputs, setup, ctx)
    prompts = [r.ids for r in setup.requests]
    base = {"model": inputs.target.ref, "prompts": prompts, "max_tokens": config.max_new_tokens,
            "dtype": _dtype(config, ctx), "seed": ctx.seed, "one_by_one": True, "warmup": config.warmup,
            "repeats": config.repeats,
            "top_k": config.top_k, "top_p": config.top_p, "min_p": config.min_p}
    runs = []
    for t in config.temperatures:
        runs.append({**base, "name": f"target@{t}", "temperature": t})
        runs += [{**base, "name": f"{name}@{g}@{t}", "temperature": t,
                  "speculative_config": {**spec, "num_speculative_tokens": g}}
                 for name, spec in specs.items() for g in config.gammas]
    ctx.log.info("evaluate (vLLM): %d run(s) of %d request(s), one vLLM start each", len(runs), len(prompts))
    result = serve_apart(runs, out_dir / "vllm")
    served = {r["name"]: r for r in result["runs"]}
    sd2_mal = _sd2_mals(config, setup, drafters)
    return _write(config, inputs, setup, infos, served, specs, sd2_mal, result["vllm"], out_dir, ctx)


def _dtype(config, ctx) -> str:
    """evaluate.dtype as resolved for this machine (auto: float32 on a CPU, as for sd2's engine), for vLLM too."""
    from sd2.core.precision import resolve

    return resolve(config.dtype, ctx.device, exact=True).dtype


def _sd2_mals(config, setup, drafters) -> dict[tuple[str, int], float]:
    """sd2's engine MAL for each drafter and γ on vLLM's rounds (greedy), for the report's sd2_mal."""
    from sd2.serve.metrics import counts_of_rounds, engine_rounds_on_vllm_schedule

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


def _write(config, inputs, setup, infos, served, specs, sd2_mal, vllm_version: str, out_dir: Path, ctx) -> dict:
    from sd2 import __version__
    from sd2.core.artifacts import machine
    from sd2.core.report import Baseline, Report, Result, Settings
    from sd2.stages.evaluate.collect import _r, summary, target_info
    from sd2.stages.evaluate.report import write_report

    ids = [r.id for r in setup.requests]
    dtype = _dtype(config, ctx)
    baseline, results = {}, []
    for t in config.temperatures:
        tgt = served[f"target@{t}"]
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
    report = Report(
        sd2_version=__version__,
        target=target_info(inputs, setup),
        settings=Settings(gammas=config.gammas, temperatures=config.temperatures, top_k=config.top_k,
                          top_p=config.top_p, min_p=config.min_p, max_new_tokens=config.max_new_tokens,
                          n_prompts=len(ids), turns=config.turns, prompts=config.model_dump(mode="json")["prompts"],
                          repeats=config.repeats, warmup=config.warmup, seed=ctx.seed, device="vllm", dtype=dtype,
                          engine="vllm", machine={**machine(), "vllm": vllm_version}),
        baseline=baseline, drafters=infos, results=results)
    write_report(report, out_dir)
    return summary(report, ctx)
