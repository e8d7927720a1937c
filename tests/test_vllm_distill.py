"""distill.backend: vllm on this CPU (marker vllm; skipped without vLLM): a tiny target's greedy answers
through vLLM make a dataset of the same format as sd2's own batched generator's (columns, prompts,
multi-turn structure, loss mask rule), and the share of identical answers is reported, not assumed:
vLLM's CPU kernels and torch round differently, so a near-tie can flip a greedy token."""

from __future__ import annotations

import json

import pytest

from sd2.core.context import StageInputs, standalone_context
from sd2.core.models import ModelSource
from sd2.data.dataset import load_distilled
from sd2.stages.distill import Config, run
from tiny import write_mtbench
from vllm_tiny import VLLM_ENV, eos_llama32

pytestmark = pytest.mark.vllm


def _distill(tmp, target, prompts, backend, **cfg):
    out = tmp / backend
    out.mkdir()
    config = Config(prompts={"source": str(prompts)}, max_new_tokens=16, batch_size=4, backend=backend, **cfg)
    metrics = run(config, StageInputs(target=ModelSource(str(target), "fp-target")), out, standalone_context(tmp))
    return metrics, load_distilled(out)


def test_vllm_distill_matches_the_hf_generators_format(tmp_path, tokenizer, monkeypatch):
    for k, v in VLLM_ENV.items():
        monkeypatch.setenv(k, v)
    # what vLLM's CPU backend needs is sd2's to set (sd2.serve.env.cpu_environment), not the user's
    for k in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_ENABLE_V1_MULTIPROCESSING"):
        monkeypatch.delenv(k, raising=False)
    target = eos_llama32(tmp_path / "target", tokenizer)   # answers that stop on <|im_end|> at times
    prompts = write_mtbench(tmp_path / "q.jsonl", n=8, turns=2)
    hf_metrics, hf = _distill(tmp_path, target, prompts, "hf")
    vl_metrics, vl = _distill(tmp_path, target, prompts, "vllm")

    assert vl.column_names == hf.column_names and len(vl) == len(hf) == 8
    assert vl_metrics["rows"] == hf_metrics["rows"] and vl_metrics["tokens"] > 0
    same_answers = total = 0
    for a, b in zip(hf, vl):
        assert a["id"] == b["id"] and [m["role"] for m in a["messages"]] == [m["role"] for m in b["messages"]]
        assert a["messages"][0] == b["messages"][0]                      # the first user turn, as given
        assert len(b["input_ids"]) == len(b["loss_mask"])
        first = b["loss_mask"].index(1)                                  # the prompt, tokenized alike
        assert first == a["loss_mask"].index(1) and b["input_ids"][:first] == a["input_ids"][:first]
        for ma, mb in zip(a["messages"], b["messages"]):
            if ma["role"] == "assistant":
                total += 1
                same_answers += ma["content"] == mb["content"]
        if a["messages"] == b["messages"]:
            assert a["input_ids"] == b["input_ids"] and a["loss_mask"] == b["loss_mask"]
    share = same_answers / total
    print(json.dumps({"identical_greedy_answers": same_answers, "answers": total, "share": share,
                      "hf_tokens": hf_metrics["tokens"], "vllm_tokens": vl_metrics["tokens"]}))
    # a real generator of the same model: most answers identical (not all need be, see the docstring)
    assert share >= 0.5, share
