"""fp32 against bf16 matmul throughput on this CPU: the measurement behind ``dtype: auto``.

    .venv/bin/python benchmarks/precision_probe.py [--threads 2] [--out benchmarks/results/precision_probe.json]

Times ``x @ w`` for the shapes that dominate SmolLM2-135M (d=576, MLP 1536): M=64 rows (batched
distillation, prefill, training) and M=1 (batch-1 decoding), in float32 and bfloat16, and records
the CPU as torch reports it (model, kernel capability, AMX-BF16 / AVX512-BF16) and what
``dtype: auto`` resolves to. Appends one entry per run to the JSON, keyed by CPU, so the results of
several machine kinds sit side by side. Each figure is the median of 5 timed repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from sd2.core.precision import cpu_info, resolve


def gmacs(m: int, k: int, n: int, dtype, iters: int) -> float:
    x, w = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    for _ in range(10):
        x @ w
    runs = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(iters):
            x @ w
        runs.append(m * k * n * iters / (time.perf_counter() - t) / 1e9)
    return round(statistics.median(runs), 2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "precision_probe.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows = {}
    for m, iters in ((64, 200), (1, 2000)):
        f32, b16 = gmacs(m, 576, 1536, torch.float32, iters), gmacs(m, 576, 1536, torch.bfloat16, iters)
        rows[f"M{m}_576x1536"] = {"float32_gmacs": f32, "bfloat16_gmacs": b16, "bf16_over_fp32": round(b16 / f32, 2)}
        print(f"M={m:<3} 576x1536: fp32 {f32:7.1f}  bf16 {b16:7.1f} GMAC/s  (bf16/fp32 {b16 / f32:.2f})")
    auto = resolve("auto", "cpu", quiet=True)
    env = {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS") if k in os.environ}
    entry = {"machine": cpu_info(), "env": env, "threads": a.threads, "load_1min": round(os.getloadavg()[0], 2),
             "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "results": rows,
             "auto_resolves_to": auto.dtype, "auto_reason": auto.reason}
    out = Path(a.out)
    data = json.loads(out.read_text()) if out.is_file() else {"runs": []}
    data["runs"].append(entry)
    out.write_text(json.dumps(data, indent=1) + "\n")
    print(f"auto -> {auto.dtype} ({auto.reason}); wrote {out}")


if __name__ == "__main__":
    main()
