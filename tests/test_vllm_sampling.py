"""Speculative sampling (temperature > 0) on vLLM's CPU backend, with sd2's fix for vLLM issue #55005
(sd2/serve/cpu_fix.py; marker vllm). A chi-square test of vLLM's answers against the target's exact
distribution passes with the fix, and fails without it (the negative control: the bug is real here).

The target is tiny with a peaky distribution: its 6 most likely tokens at each of 3 steps (216
answers) hold most of the mass, the rest is one pooled outcome. The chi-square p-value (tests/tiny.py)
must exceed 1e-3 with the fix; a correct sampler fails that 0.1% of the time, on any CPU."""

from __future__ import annotations

import collections
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiny import chi2_pvalue
from vllm_tiny import VLLM_ENV, first_layers, llama32

pytestmark = pytest.mark.vllm

N, STEPS, TOP = 2000, 3, 6


def _exact(target_dir, prompt) -> dict:
    """The target's distribution over 3-token answers at temperature 1: every answer of its TOP most
    likely tokens per step, and "other" for the rest of the mass."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(target_dir).eval()
    dist = {}

    def walk(seq, p, depth):
        if depth == STEPS:
            dist[tuple(seq[len(prompt):])] = p
            return
        with torch.no_grad():
            probs = torch.softmax(model(torch.tensor([seq])).logits[0, -1].double(), -1)
        top = torch.topk(probs, TOP)
        for t, q in zip(top.indices.tolist(), top.values.tolist()):
            walk(seq + [t], p * q, depth + 1)

    walk(list(prompt), 1.0, 0)
    dist["other"] = max(0.0, 1.0 - sum(dist.values()))
    return dist


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tokenizer):
    from transformers import AutoModelForCausalLM

    tmp = tmp_path_factory.mktemp("sampling")
    target = llama32(tmp / "target", tokenizer)
    model = AutoModelForCausalLM.from_pretrained(target)
    with torch.no_grad():
        model.lm_head.weight.mul_(3.0)              # peaky: most mass on a few answers
    model.save_pretrained(target)
    return target, first_layers(target, tmp / "drafter")


def _sample(mode, pair, tmp_path) -> dict:
    out = tmp_path / f"{mode}.json"
    env = {**__import__("os").environ, **VLLM_ENV}
    proc = subprocess.run([sys.executable, str(Path(__file__).parent / "vllm_sampling_run.py"), mode, str(pair[0]),
                           str(pair[1]), str(N), str(out)], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_speculative_sampling_on_vllms_cpu_backend_is_the_targets_distribution_with_sd2s_fix(pair, tmp_path):
    from vllm_sampling_run import PROMPT

    dist = _exact(pair[0], PROMPT)
    assert dist["other"] < 0.5
    results = {}
    for mode in ("fix", "nofix"):
        got = _sample(mode, pair, tmp_path)
        counts = collections.Counter(tuple(a) if tuple(a) in dist else "other" for a in got["answers"])
        results[mode] = {"p": chi2_pvalue(counts, dist, N), "acceptance": got["acceptance"]}
    print(json.dumps(results))
    assert results["fix"]["p"] > 1e-3, results
    assert results["nofix"]["p"] < 1e-6, results          # the negative control: vLLM #55005 is real here
    assert results["fix"]["acceptance"] > 2 * results["nofix"]["acceptance"], results
