"""Load the target and every drafter, run the measurements and assemble report.json's content."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from sd2.core.errors import Sd2Error


def _lineage(ref: str) -> list:
    manifest = Path(ref) / "manifest.json"
    if manifest.is_file():
        try:
            return json.loads(manifest.read_text()).get("lineage", [])
        except (OSError, json.JSONDecodeError):
            return []
    return []


def _vocab_info(model, ref: str, map_ids, greedy_tokens: list[int]) -> dict | None:
    if map_ids is None:
        return None
    kept = set(map_ids.tolist())
    info = {"draft_vocab_size": len(kept),
            # share of the target's greedy output tokens (on these prompts) the drafter can propose at all
            "coverage": round(sum(t in kept for t in greedy_tokens) / len(greedy_tokens), 6) if greedy_tokens else None}
    stats = Path(ref) / "vocab_stats.json"
    if stats.is_file():
        info["coverage_heldout_distill"] = json.loads(stats.read_text()).get("coverage_heldout")
    return info


def _r(x, nd=6):
    return None if x is None else round(float(x), nd)


def evaluate_and_report(config, inputs, out_dir: Path, ctx) -> dict:
    import torch

    from sd2 import __version__
    from sd2.data.prompts import load_prompts
    from sd2.macs import count_macs
    from sd2.core.artifacts import machine
    from sd2.core.models import load_model, load_tokenizer, same_tokenizer
    from sd2.stages.evaluate import measure as M
    from sd2.stages.evaluate.engine import Runner
    from sd2.stages.evaluate.report import write_report
    from sd2.stages.evaluate.sampling import DraftVocab
    from sd2.vocab import draft_to_target

    if inputs.target is None or not inputs.drafters:
        raise Sd2Error("evaluate needs a target and at least one drafter (inputs.target, inputs.drafters)")
    dtype = getattr(torch, config.dtype)
    device = ctx.device
    target_model = load_model(inputs.target, device=device, dtype=dtype)
    t_tok = load_tokenizer(inputs.target)
    target = Runner(target_model)
    eos = M.eos_ids(target_model, t_tok)
    convs = load_prompts(config.prompts)
    if not convs:
        raise Sd2Error("evaluate.prompts selected no prompts; check source, skip and limit")
    requests = M.build_requests(convs, t_tok, config.turns, target, config.max_new_tokens, eos)
    target_macs = count_macs(target_model)
    t_vocab = target_model.get_output_embeddings().weight.shape[0]

    drafters, infos = [], {}
    for name, src in inputs.drafters.items():
        model = load_model(src, device=device, dtype=dtype)
        tok = load_tokenizer(src)
        cross = bool(inputs.cross_tokenizer) or not same_tokenizer(t_tok, tok)
        map_ids = draft_to_target(model)
        d = M.Drafter(name, Runner(model), tok, DraftVocab(t_vocab, map_ids).to(target.device), cross, M.eos_ids(model, tok))
        if cross:
            d.prompts = {r.id: M.chat_ids(tok, r.messages) for r in requests}
            ctx.log.info("drafter %s: different tokenizer, drafts are translated through text", name)
        drafters.append(d)
        macs = count_macs(model)
        infos[name] = {"path": src.ref, "fingerprint": src.fingerprint, "macs": macs.to_dict(),
                       "mac_ratio": _r(macs.ratio_to(target_macs)), "sparsity": _r(macs.decoder_sparsity),
                       "cross_tokenizer": cross, "lineage": _lineage(src.ref), "_macs": macs, "_map": map_ids}

    ctx.log.info("evaluating %d drafter(s) on %d request(s): gamma %s, temperature %s, %d new tokens, %d pass(es)",
                 len(drafters), len(requests), config.gammas, config.temperatures, config.max_new_tokens, config.repeats)
    baseline, cells, greedy_ref = M.measure(
        target, t_tok, drafters, requests, config.gammas, config.temperatures, config.max_new_tokens,
        config.repeats, config.warmup, ctx.seed, eos, progress=lambda it, **kw: ctx.progress(it, total=len(requests), **kw))

    greedy_tokens = [t for toks in greedy_ref.values() for t in toks]
    tf = {}
    for d in drafters:
        info = infos[d.name]
        info["c_measured"] = _r(M.c_measured(d.runner, target))
        info["vocab"] = _vocab_info(d.runner.model, info["path"], info.pop("_map"), greedy_tokens)
        if config.teacher_forced and greedy_ref and not d.cross:
            tf[d.name] = M.teacher_forced_mal(d, requests, greedy_ref, config.gammas)

    verify = {g: M.verify_cost(target, g) for g in config.gammas}   # the target's alone: once per gamma
    results = []
    for (name, gamma, temp), cell in cells.items():
        info = infos[name]
        s = cell.stats.summary(gamma)
        wall = statistics.median(cell.walls)
        base_wall = baseline[temp]["wall_s"]
        c = info["c_measured"]
        macs = info["_macs"]
        theo = s["mal"] / (gamma * c + 1) if c is not None else None
        v = verify[gamma]
        modeled = s["mal"] / (gamma * c + v) if c is not None and v is not None else None
        speedup = base_wall / wall if wall else None
        row = {
            "drafter": name, "gamma": gamma, "temperature": temp,
            **{k: _r(s[k]) for k in ("mal", "mal_per_request", "acceptance_rate")},
            "acceptance_per_position": [_r(x) for x in s["acceptance_per_position"]],
            "mal_per_category": {k: _r(v) for k, v in s["mal_per_category"].items()},
            "greedy_mal_teacher_forced": _r(tf[name][gamma]) if temp == 0 and name in tf else None,
            "tokens": s["tokens"], "requests": s["requests"], "drafted": s["drafted"], "accepted": s["accepted"],
            "target_forwards": s["target_forwards"], "drafter_forwards": cell.drafter_forwards,
            "wall_s": _r(wall), "walls": [_r(w) for w in cell.walls], "target_wall_s": _r(base_wall),
            "speedup": _r(speedup), "c_measured": c, "theoretical_speedup": _r(theo),
            "mac_speedup": _r(s["mal"] / (gamma * macs.ratio_to(target_macs) + 1)),
            "efficiency": _r(speedup / theo) if speedup and theo else None,
            "verify_cost": _r(v), "modeled_speedup": _r(modeled),
            "macs_per_token": macs.effective, "dense_macs_per_token": macs.dense, "sparsity": info["sparsity"],
            "lossless": cell.lossless if temp == 0 else None,
            "lossless_mismatches": cell.mismatches,
        }
        results.append(row)
        ctx.log_metrics(**{k: v for k, v in row.items() if not isinstance(v, (list, dict))})
    for info in infos.values():
        info.pop("_macs")

    report = {
        "sd2_version": __version__,
        "target": {"name": "target", "ref": inputs.target.ref, "fingerprint": inputs.target.fingerprint,
                   "macs": target_macs.to_dict()},
        "settings": {"gammas": config.gammas, "temperatures": config.temperatures,
                     "max_new_tokens": config.max_new_tokens, "n_prompts": len(requests), "turns": config.turns,
                     "prompts": config.model_dump(mode="json")["prompts"],
                     "repeats": config.repeats, "warmup": config.warmup, "seed": ctx.seed, "device": str(device),
                     "dtype": config.dtype, "machine": machine()},
        "baseline": {str(t): {k: (_r(v) if isinstance(v, float) else v) for k, v in b.items()} for t, b in baseline.items()},
        "drafters": infos,
        "results": results,
        "best": pick_best(results),
    }
    write_report(report, out_dir)
    best = report["best"]
    greedy = [r for r in results if r["temperature"] == 0]
    lossless = all(r["lossless"] for r in greedy) if greedy else None
    if lossless is False:
        bad = [f"{r['drafter']} gamma={r['gamma']}: {r['lossless_mismatches'][:3]}" for r in greedy if not r["lossless"]]
        ctx.log.error("NOT LOSSLESS at temperature 0 (prompts differ from target-only greedy): %s", "; ".join(bad))
    top = next((r for r in results if best and r["drafter"] == best["drafter"] and r["gamma"] == best["gamma"]
                and r["temperature"] == best["temperature"]), None)
    return {"best": best["drafter"] if best else None, "best_mal": top["mal"] if top else None,
            "best_speedup": top["speedup"] if top else None, "lossless": lossless, "results": len(results)}


def pick_best(results: list[dict]) -> dict | None:
    """The drafter to recommend: highest MAC-based speedup MAL/(gamma*mac_ratio+1) at the lowest
    temperature evaluated (deterministic, unlike wall-clock on a shared machine); MAL breaks ties."""
    if not results:
        return None
    t0 = min(r["temperature"] for r in results)
    top = max((r for r in results if r["temperature"] == t0), key=lambda r: (r["mac_speedup"], r["mal"]))
    return {"drafter": top["drafter"], "by": "mac_speedup", "gamma": top["gamma"], "temperature": top["temperature"]}
