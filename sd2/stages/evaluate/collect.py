"""Load the target and every drafter, run the measurements and assemble the typed report
(sd2.core.report). Phases, in order: load the target and the prompts, load the drafters, measure,
per-drafter facts (c, vocabulary coverage, teacher-forced MAL), one result row per setting, write."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from sd2 import __version__
from sd2 import drafters as kinds
from sd2.core.artifacts import machine, read_manifest
from sd2.core.errors import Sd2Error
from sd2.core.precision import resolve
from sd2.core.report import Baseline, DrafterInfo, Report, Result, Settings, ShapeChoice, TargetInfo, VocabInfo, _r
from sd2.data.prompts import load_prompts, with_user_turn
from sd2.engine.cached import CachedLM
from sd2.engine.crosstok import CrossTokenizerProposer
from sd2.engine.drafter import DrafterProposer
from sd2.engine.lookup import PromptLookupProposer
from sd2.engine.proposer import Sampling
from sd2.engine.sampling import DraftVocab
from sd2.macs import count_macs
from sd2.stages.evaluate import measure as M
from sd2.stages.evaluate.report import write_report
from sd2.vocab import draft_to_target


@dataclass
class Setup:
    """The target side of an evaluation: model, tokenizer, stop ids, requests, MACs."""

    target: object             # the engine's cached target model
    tokenizer: object
    eos: set[int]
    requests: list
    macs: object               # sd2.macs.MacCount
    vocab_size: int


def load_target(config, inputs, ctx) -> Setup:
    from sd2.core.models import load_model, load_tokenizer, model_eos_ids   # at call time: tests replace them

    if inputs.target is None or not (inputs.drafters or config.prompt_lookup):
        raise Sd2Error("evaluate needs a target and at least one drafter (inputs.target, inputs.drafters, "
                       "or evaluate.prompt_lookup)")
    if config.prompt_lookup and config.prompt_lookup.name in (inputs.drafters or {}):
        raise Sd2Error(f"evaluate.prompt_lookup.name {config.prompt_lookup.name!r} is also a drafter's name; "
                       "choose another")
    convs = with_user_turn(load_prompts(config.prompts), "evaluate.prompts", ctx.log)   # before the model loads
    model = load_model(inputs.target, device=ctx.device, dtype=resolve(config.dtype, ctx.device, exact=True).torch_dtype)
    tok = load_tokenizer(inputs.target)
    target = CachedLM(model)
    eos = set(model_eos_ids(model, tok))
    requests = M.build_requests(convs, tok, config.turns, target, config.max_new_tokens, eos)
    return Setup(target, tok, eos, requests, count_macs(model), model.get_output_embeddings().weight.shape[0])


def load_drafters(config, inputs, setup: Setup, ctx):
    """(drafters under evaluation, {name: DrafterInfo}, {name: draft-to-target map or None}). Each model
    becomes a proposer (sd2.engine): a causal LM a drafter, or a cross-tokenizer drafter when the
    tokenizers differ; a kind that reads the target (a head) the proposer its kind builds, bound to
    the evaluated target (sd2.drafters); ``evaluate.prompt_lookup`` adds prompt lookup decoding."""
    from sd2.core.models import load_model, load_tokenizer, model_eos_ids, same_tokenizer

    dtype = resolve(config.dtype, ctx.device, exact=True).torch_dtype
    drafters, infos, maps = [], {}, {}
    for name, src in (inputs.drafters or {}).items():
        kind, settings, cross = src.kind, {}, False
        if kinds.KINDS[src.kind].causal_lm:
            model = load_model(src, device=ctx.device, dtype=dtype)
            tok = load_tokenizer(src)
            cross = bool(inputs.cross_tokenizer) or not same_tokenizer(setup.tokenizer, tok)
            maps[name], macs, kind = draft_to_target(model), count_macs(model), "cross_tokenizer" if cross else "drafter"
            lm, vocab = CachedLM(model), DraftVocab(setup.vocab_size, maps[name]).to(setup.target.device)
            if cross:
                prompts = {tuple(r.ids): M.chat_ids(tok, r.messages) for r in setup.requests}
                proposer = CrossTokenizerProposer(name, lm, setup.tokenizer, tok, set(model_eos_ids(model, tok)),
                                                  setup.eos, prompts)
                ctx.log.info("drafter %s: different tokenizer, drafts are translated through text", name)
            else:
                proposer = DrafterProposer(name, lm, vocab, setup.eos)
            drafters.append(M.Drafter(name, proposer, lm, vocab, cross))
        else:   # it reads the target's features and shares its embeddings and lm_head
            drafter = kinds.load(src, setup.target.model, device=ctx.device, dtype=dtype)
            maps[name], macs, settings = drafter.d2t(), drafter.macs(), drafter.settings()
            drafters.append(M.Drafter(name, drafter.proposer(setup.eos, name), drafter=drafter))
        infos[name] = DrafterInfo(path=src.ref, kind=kind, fingerprint=src.fingerprint, macs=macs.to_dict(),
                                  mac_ratio=_r(macs.ratio_to(setup.macs)), sparsity=_r(macs.decoder_sparsity),
                                  cross_tokenizer=cross, settings=settings,
                                  lineage=(read_manifest(Path(src.ref)) or {}).get("lineage", []))
    if config.prompt_lookup:
        pl = config.prompt_lookup
        drafters.append(M.Drafter(pl.name, PromptLookupProposer(pl.name, setup.eos, pl.max_ngram, pl.min_ngram)))
        infos[pl.name] = DrafterInfo(kind="prompt_lookup", mac_ratio=0.0, settings=pl.model_dump())
        maps[pl.name] = None
    return drafters, infos, maps


def vocab_info(ref: str, map_ids, greedy_tokens: list[int]):
    """Coverage of a trimmed-vocabulary drafter; None for a full-vocabulary one."""
    if map_ids is None:
        return None
    kept = set(map_ids.tolist())
    # share of the target's greedy output tokens (on these prompts) the drafter can propose at all
    cov = round(sum(t in kept for t in greedy_tokens) / len(greedy_tokens), 6) if greedy_tokens else None
    stats = Path(ref) / "vocab_stats.json"
    heldout = json.loads(stats.read_text()).get("coverage_heldout") if stats.is_file() else None
    return VocabInfo(draft_vocab_size=len(kept), coverage=cov, coverage_heldout_distill=heldout)


def drafter_facts(config, setup: Setup, drafters, infos, maps, greedy_ref, gammas: list[int]) -> dict:
    """Fill c and the vocabulary of each DrafterInfo; return teacher-forced greedy chain statistics
    (MalStats) per drafter and γ, for the drafters that have them (a model on the target's tokenizer)."""
    greedy_tokens = [t for toks in greedy_ref.values() for t in toks]
    wanted = (config.teacher_forced or not config.decode) and greedy_ref
    tf = {}
    for d in drafters:
        info = infos[d.name]
        info.c_measured = _r(M.c_measured(d.timed, setup.target)) if d.timed is not None else None
        info.vocab = vocab_info(info.path, maps[d.name], greedy_tokens)
        if wanted and d.lm is not None and not d.cross:
            tf[d.name] = M.teacher_forced_mal(d, setup.requests, greedy_ref, gammas, config.max_new_tokens)
        elif wanted and d.drafter is not None:
            tf[d.name] = d.drafter.teacher_forced_mal(setup.target.model, setup.requests, greedy_ref, gammas,
                                                      config.max_new_tokens)
    return tf


def result_rows(config, setup: Setup, infos, baseline, cells, tf) -> list:
    """One Result per (drafter, γ, width, temperature): stored measurements only; derived figures are
    computed by the Result class."""
    target = setup.target
    step = statistics.median(target.step_times) if target.step_times else None
    rows = []
    for (name, gamma, width, temp), cell in cells.items():
        info = infos[name]
        s = cell.stats.summary(gamma)
        n = s["target_forwards"]
        timed = bool(cell.walls)   # False: teacher-forced rounds (decode: false), nothing was decoded or timed
        # v(n) at the full shape, 1 + gamma*width nodes (a model drafter's rounds are full but near the end)
        v = M.verify_cost(target, 1 + gamma * width) if info.kind != "prompt_lookup" else None
        rows.append(Result(
            drafter=name, kind=info.kind, gamma=gamma, width=width, temperature=temp,
            predicted_speedup=info.shape.predicted_speedup if info.shape is not None and temp == 0 else None,
            drafted_depth=s["drafted_depth"], nodes_per_round=_r(s["drafted"] / n) if n else None,
            draft_cost=_r(cell.propose_s / n / step) if n and step and timed else None,
            verify_cost_mean=_r(cell.verify_s / n / step) if n and step and timed else None,
            **{k: _r(s[k]) for k in ("mal", "mal_per_request", "acceptance_rate")},
            acceptance_per_position=[_r(x) for x in s["acceptance_per_position"]],
            mal_per_category={k: _r(v) for k, v in s["mal_per_category"].items()},
            greedy_mal_teacher_forced=_r(tf[name][gamma].summary(gamma)["mal"]) if temp == 0 and name in tf and width == 1
            else None,
            tokens=s["tokens"], requests=s["requests"], drafted=s["drafted"], accepted=s["accepted"],
            target_forwards=s["target_forwards"], drafter_forwards=cell.drafter_forwards if timed else None,
            wall_s=_r(statistics.median(cell.walls)) if cell.walls else None, walls=[_r(w) for w in cell.walls],
            target_wall_s=_r(baseline[temp]["wall_s"]), c_measured=info.c_measured, verify_cost=_r(v),
            mac_ratio=info.mac_ratio, macs_per_token=info.macs.get("effective", 0),
            dense_macs_per_token=info.macs.get("dense", 0), sparsity=info.sparsity,
            lossless=cell.lossless if temp == 0 else None, lossless_mismatches=cell.mismatches))
    return rows


def evaluate_and_report(config, inputs, out_dir: Path, ctx) -> dict:
    setup = load_target(config, inputs, ctx)
    drafters, infos, maps = load_drafters(config, inputs, setup, ctx)
    if not config.decode:
        return _mal_only(config, inputs, setup, drafters, infos, maps, out_dir, ctx)
    ctx.log.info("evaluating %d drafter(s) on %d request(s): gamma %s, temperature %s, %d new tokens, %d pass(es)",
                 len(drafters), len(setup.requests), config.gammas, config.temperatures, config.max_new_tokens,
                 config.repeats)
    if config.auto:
        chosen = M.auto_shapes(setup.target, drafters, setup.requests, config.max_gamma, config.widths,
                               config.max_new_tokens, setup.eos, config.pilot_prompts)
        for name, shape in chosen.items():
            infos[name].shape = ShapeChoice(gamma=shape.gamma, width=shape.width,
                                            predicted_speedup=_r(shape.predicted_speedup), table=shape.table)
            ctx.log.info("gamma auto: %s -> gamma %d, width %d (modeled speedup %.3f)", name, shape.gamma,
                         shape.width, shape.predicted_speedup)
        shapes = {name: [(s.gamma, s.width)] for name, s in chosen.items()}
    else:
        shapes = M.grid(drafters, config.gammas, config.widths)
    baseline, cells, greedy_ref = M.measure(
        setup.target, drafters, setup.requests, shapes, config.samplings(),
        config.max_new_tokens, config.repeats, config.warmup, ctx.seed, setup.eos,
        progress=lambda it, **kw: ctx.progress(it, total=len(setup.requests), **kw))
    gammas = sorted({g for s in shapes.values() for g, _ in s})
    tf = drafter_facts(config, setup, drafters, infos, maps, greedy_ref, gammas)
    return _write_cells(config, inputs, setup, infos, baseline, cells, tf, gammas, out_dir, ctx)


def _mal_only(config, inputs, setup: Setup, drafters, infos, maps, out_dir: Path, ctx) -> dict:
    """``decode: false``: the target's greedy answers (timed, the baseline), then each drafter's exact
    greedy chain rounds at every γ by teacher forcing; no speculative decoding runs."""
    cross = [d.name for d in drafters if d.cross]
    if cross:   # before the target generates anything
        raise Sd2Error(f"evaluate.decode: false cannot simulate {', '.join(cross)}: a drafter with another tokenizer "
                       "drafts through text and has no teacher-forced rounds; set decode: true")
    ctx.log.info("evaluating %d drafter(s) on %d request(s): gamma %s, greedy, %d new tokens, MAL only (decode: "
                 "false: teacher-forced chain rounds, no speculative decoding)", len(drafters),
                 len(setup.requests), config.gammas, config.max_new_tokens)
    baseline, _, greedy_ref = M.measure(
        setup.target, [], setup.requests, {}, [Sampling()], config.max_new_tokens, config.repeats, config.warmup,
        ctx.seed, setup.eos, progress=lambda it, **kw: ctx.progress(it, total=len(setup.requests), **kw))
    tf = drafter_facts(config, setup, drafters, infos, maps, greedy_ref, config.gammas)
    if missing := [d.name for d in drafters if d.name not in tf]:
        raise Sd2Error(f"evaluate.decode: false has no teacher-forced rounds for {', '.join(missing)}; set decode: true")
    # one cell per (drafter, γ), holding the teacher-forced rounds, untimed, losslessness not checked (None)
    cells = {(d.name, g, 1, 0.0): M.Cell(stats=tf[d.name][g], lossless=None) for d in drafters for g in config.gammas}
    return _write_cells(config, inputs, setup, infos, baseline, cells, tf, config.gammas, out_dir, ctx)


def write(config, inputs, setup: Setup, infos, baseline: dict, results: list, out_dir: Path, ctx, **settings) -> dict:
    """Assemble report.json from ``results`` and ``baseline`` ({str(temperature): Baseline}), write it
    with report.md and the plots (report.write_report); return the stage's metrics. ``settings``:
    the report's Settings that differ from the config's (the γ measured, what decoded, the machine)."""
    report = Report(
        sd2_version=__version__,
        target=target_info(inputs, setup),
        settings=Settings(**{
            "gammas": config.gammas, "widths": config.widths, "gamma_auto": config.auto,
            "max_gamma": config.max_gamma if config.auto else None, "temperatures": config.temperatures,
            "top_k": config.top_k, "top_p": config.top_p, "min_p": config.min_p,
            "max_new_tokens": config.max_new_tokens, "n_prompts": len(setup.requests), "turns": config.turns,
            "prompts": config.model_dump(mode="json")["prompts"], "repeats": config.repeats,
            "warmup": config.warmup, "seed": ctx.seed, "device": str(ctx.device),
            "dtype": resolve(config.dtype, ctx.device, exact=True).dtype, "decode": config.decode,
            "packed_linears": setup.target.packed, "machine": machine(), **settings}),
        baseline=baseline, drafters=infos, results=results)
    write_report(report, out_dir)
    return summary(report, ctx)


def _write_cells(config, inputs, setup: Setup, infos, baseline, cells, tf, gammas, out_dir: Path, ctx) -> dict:
    """sd2's engine: the result rows of the measured (or teacher-forced) cells, logged, then written."""
    results = result_rows(config, setup, infos, baseline, cells, tf)
    for row in results:
        ctx.log_metrics(**{k: v for k, v in row.model_dump().items() if not isinstance(v, (list, dict))})
    baseline = {str(t): Baseline(**{k: (_r(v) if isinstance(v, float) else v) for k, v in b.items()})
                for t, b in baseline.items()}
    return write(config, inputs, setup, infos, baseline, results, out_dir, ctx, gammas=gammas)


def target_info(inputs, setup: Setup):
    """report.json's target: as the user named it, and the folder it loaded from when that differs."""
    return TargetInfo(ref=inputs.target.label or inputs.target.ref,
                      loaded_from=inputs.target.ref if inputs.target.label not in ("", inputs.target.ref) else None,
                      hub_id=inputs.target.hub_id, fingerprint=inputs.target.fingerprint, macs=setup.macs.to_dict())


def summary(report, ctx) -> dict:
    """The stage's key metrics (manifest, `sd2 show`); logs an error when greedy was not lossless."""
    greedy = report.rows(temperature=0.0)
    checked = [r.lossless for r in greedy if r.lossless is not None]
    lossless = all(checked) if checked else None      # None: nothing decoded greedily (or decode: false)
    if lossless is False:
        bad = [f"{r.drafter} gamma={r.gamma}: {r.lossless_mismatches[:3]}" for r in greedy if r.lossless is False]
        ctx.log.error("NOT LOSSLESS at temperature 0 (prompts differ from target-only greedy): %s", "; ".join(bad))
    best, top = report.best, report.best_row()
    return {"best": best.drafter if best else None, "best_mal": top.mal if top else None,
            "best_speedup": top.speedup if top else None, "lossless": lossless, "results": len(report.results)}
