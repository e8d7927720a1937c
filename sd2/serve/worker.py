"""Serve token prompts in vLLM, with and without a ``speculative_config``, in one process.

    python -m sd2.serve.worker JOB.json OUT.json

JOB.json: ``{"runs": [RUN, ...]}``; RUN: ``name``, ``model`` (a folder or Hub id), ``prompts``
(lists of token ids), ``max_tokens``, and optionally ``speculative_config`` (vLLM's dict),
``temperature`` (0), ``ignore_eos`` (false), ``dtype`` ("float32"), ``seed`` (0),
``max_model_len``, ``top_k``/``top_p``/``min_p`` (off), ``one_by_one`` (false: all prompts in one
batch; true: one request at a time, the batch-size-1 protocol wall-clock speedups are measured
with), ``warmup`` (0: untimed requests of the first prompt before timing), ``repeats`` (1: timed
passes; ``seconds`` is their median).
OUT.json: ``{"vllm": version, "cpu": bool, "runs": [{"name", "outputs": [[ids]] (the first pass),
"seconds", "walls", "tokens", "spec": SpecCounts.to_dict() over the timed passes, or null}]}``. Runs go in order, one ``LLM`` each, freed
before the next starts. An Sd2Error (sd2/serve/env.py) exits 2 with its message on stderr.
A separate process because vLLM changes process-wide state (threads, logging, signal handlers).
"""

from __future__ import annotations

import gc
import json
import statistics
import sys
import time
from pathlib import Path


def serve_run(run: dict) -> dict:
    from sd2.serve import env
    from sd2.serve.metrics import read_counts

    vllm = env.import_vllm("sd2.serve.worker")
    spec = run.get("speculative_config")
    temperature = float(run.get("temperature", 0.0))
    llm = env.start(run["model"], f"run {run['name']!r}", dtype=run.get("dtype", "float32"), seed=run.get("seed", 0),
                    max_model_len=run.get("max_model_len"), speculative_config=spec, temperature=temperature,
                    log_stats=True)
    params = vllm.SamplingParams(temperature=temperature, max_tokens=int(run["max_tokens"]),
                                 ignore_eos=bool(run.get("ignore_eos", False)), seed=run.get("seed", 0),
                                 top_k=int(run.get("top_k", 0)), top_p=float(run.get("top_p", 1.0)),
                                 min_p=float(run.get("min_p", 0.0)), detokenize=False)
    prompts = [{"prompt_token_ids": list(p)} for p in run["prompts"]]
    for _ in range(int(run.get("warmup", 0))):
        llm.generate(prompts[:1], params, use_tqdm=False)
    before = read_counts(llm.get_metrics())
    walls, outputs = [], None
    for _ in range(int(run.get("repeats", 1))):
        t0 = time.perf_counter()
        if run.get("one_by_one"):
            outs = [llm.generate([p], params, use_tqdm=False)[0] for p in prompts]
        else:
            outs = llm.generate(prompts, params, use_tqdm=False)
        walls.append(time.perf_counter() - t0)
        outputs = outputs or [list(o.outputs[0].token_ids) for o in outs]
    counts = read_counts(llm.get_metrics()) - before
    if run.get("one_by_one"):   # an engine step serves one request: its steps are the prefills and decode steps
        counts.decode_steps = counts.steps - len(prompts) * int(run.get("repeats", 1))
    del llm
    gc.collect()
    return {"name": run["name"], "outputs": outputs, "seconds": round(statistics.median(walls), 4),
            "walls": [round(w, 4) for w in walls], "tokens": sum(len(o) for o in outputs),
            "spec": counts.to_dict() if spec else None}


def main(argv: list[str]) -> int:
    from sd2.core.errors import Sd2Error
    from sd2.serve import env

    if len(argv) != 2:
        print("usage: python -m sd2.serve.worker JOB.json OUT.json", file=sys.stderr)
        return 2
    job = json.loads(Path(argv[0]).read_text())
    try:
        vllm = env.import_vllm("sd2.serve.worker")
        cpu = env.on_cpu()
        if cpu:
            env.cpu_environment()
        for r in job["runs"]:       # every refusal before the first start
            env.sampling_fix(float(r.get("temperature", 0.0)), r.get("speculative_config") is not None, cpu)
        result = {"vllm": vllm.__version__, "cpu": cpu, "runs": [serve_run(r) for r in job["runs"]]}
    except Sd2Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    Path(argv[1]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


def serve_apart(runs: list[dict], workdir: Path, timeout: float | None = None, env: dict | None = None) -> dict:
    """Run ``runs`` in a fresh ``python -m sd2.serve.worker`` process (this interpreter) and return its
    OUT.json. ``env`` adds environment variables (e.g. threads). Raises Sd2Error with the worker's
    message, or the tail of its log when it failed otherwise."""
    import os
    import subprocess

    from sd2.core.errors import Sd2Error

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    job, out = workdir / "vllm_job.json", workdir / "vllm_out.json"
    job.write_text(json.dumps({"runs": runs}))
    out.unlink(missing_ok=True)
    proc = subprocess.run([sys.executable, "-m", "sd2.serve.worker", str(job), str(out)], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})
    (workdir / "vllm_worker.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not out.is_file():
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
        tail = errors[-1][len("error: "):] if errors else "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise Sd2Error(f"the vLLM worker failed (exit {proc.returncode}; log {workdir / 'vllm_worker.log'}): {tail}")
    return json.loads(out.read_text())
