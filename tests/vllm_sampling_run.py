"""Run by tests/test_vllm_sampling.py in a fresh process (a patched kernel stays patched in its process):

    python tests/vllm_sampling_run.py fix|nofix TARGET DRAFTER N OUT.json

samples N answers of 3 tokens from TARGET at temperature 1 with DRAFTER as vLLM's draft_model (γ=2),
through sd2.serve.env.start (fix: sd2's fix for vLLM #55005 applied) or vllm.LLM directly with the
same in-process settings (nofix: the negative control), and writes the answers and the acceptance."""

from __future__ import annotations

import json
import os
import sys

PROMPT = [5, 17, 42, 8, 99, 3, 77]

if __name__ == "__main__":
    mode, target, drafter, n, out = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
    from sd2.serve import env
    from sd2.serve.metrics import read_counts

    spec = {"model": drafter, "method": "draft_model", "num_speculative_tokens": 2}
    if mode == "fix":
        llm = env.start(target, "test", max_model_len=128, speculative_config=spec, temperature=1.0, log_stats=True)
    else:
        import vllm

        env.cpu_environment()
        llm = vllm.LLM(model=target, dtype="float32", enforce_eager=True, max_model_len=128, seed=0,
                       speculative_config=spec, disable_log_stats=False, distributed_executor_backend="uni")
    from vllm import SamplingParams

    outs = llm.generate([{"prompt_token_ids": PROMPT}] * n,
                        SamplingParams(temperature=1.0, max_tokens=3, ignore_eos=True), use_tqdm=False)
    counts = read_counts(llm.get_metrics())
    with open(out, "w") as f:
        json.dump({"answers": [list(o.outputs[0].token_ids) for o in outs], "acceptance": counts.acceptance_rate,
                   "pid": os.getpid()}, f)
