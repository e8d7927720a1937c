"""evaluate runs an EAGLE-3 head folder (docs/eagle3.md, "In the engine"): `sd2 eval --drafter
name=FOLDER` and a recipe branch `- head: {type: eagle3, ...}` through `sd2 run`, lossless, with its
MACs, its draft vocabulary's coverage and its teacher-forced MAL (tests/test_engine_eagle3.py holds
the drafting itself)."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from sd2.pipeline.cli import app

AUX = [1, 2, 3]


def _check_report(rep: dict, name: str, k: int) -> None:
    """Every greedy row lossless with its teacher-forced MAL equal to the measured one (chains); MACs
    count the K-row output layer; the draft vocabulary's coverage is reported."""
    info = rep["drafters"][name]
    assert info["kind"] == "head" and info["settings"] == {"head": "eagle3"}
    assert info["macs"]["lm_head"] == k * 64 and info["macs"]["decoder_dense"] > 0 and info["mac_ratio"] > 0
    assert info["vocab"]["draft_vocab_size"] == k and 0 < info["vocab"]["coverage"] <= 1
    rows = [r for r in rep["results"] if r["drafter"] == name]
    assert rows
    for r in rows:
        assert 1.0 <= r["mal"] and r["drafter_forwards"] > 0
        if r["temperature"] == 0:
            assert r["lossless"] is True
            if r["width"] == 1:
                assert r["greedy_mal_teacher_forced"] == pytest.approx(r["mal"], abs=1e-9)


def test_sd2_eval_runs_an_eagle3_head_folder(tmp_path, tiny_target, tokenizer, mtbench_file, monkeypatch):
    """`sd2 eval --drafter e3=FOLDER` recognises an EAGLE-3 head folder (sd2/heads/eagle3/io.py) and runs
    it at widths 1 and 2, greedy and T = 1; `--gamma auto` models it as a model drafter (gamma * c with
    its measured step cost c)."""
    import torch

    from sd2.core.models import load_model
    from sd2.engine import shape
    from sd2.heads import io
    from sd2.heads.eagle3 import build, choose_draft_vocab

    target = load_model(tiny_target)
    seqs = torch.randint(3, len(tokenizer), (8, 24), generator=torch.Generator().manual_seed(0)).tolist()
    head = build(target, choose_draft_vocab(seqs, None, len(tokenizer), 100, always=[tokenizer.eos_token_id]),
                 aux_layers=AUX, target_ref=str(tiny_target))
    io.save(head, tmp_path / "e3", tokenizer)
    base = ["eval", "--target", str(tiny_target), "--drafter", f"e3={tmp_path / 'e3'}", "--prompts", str(mtbench_file),
            "--limit", "2", "--max-new-tokens", "10", "--device", "cpu"]
    res = CliRunner().invoke(app, base + ["--gamma", "2", "--width", "1", "--width", "2", "--temperature", "0",
                                          "--temperature", "1", "--out", str(tmp_path / "w")])
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "w" / "report.json").read_text())
    _check_report(rep, "e3", 100)
    md = (tmp_path / "w" / "report.md").read_text()       # the usage snippet: publish, then vLLM's eagle3 method
    assert f"sd2 publish {tmp_path / 'e3'} --repo-id you/head --dry-run" in md and '"method": "eagle3"' in md
    assert {(r["width"], r["temperature"]) for r in rep["results"]} == {(1, 0.0), (2, 0.0), (1, 1.0), (2, 1.0)}

    seen = {}
    real = shape.choose

    def spy(pilot, max_gamma, v, c, d=None):
        seen.update(widths=sorted(pilot), c=c, d=d)
        return real(pilot, max_gamma, v, c, d)

    monkeypatch.setattr(shape, "choose", spy)
    res = CliRunner().invoke(app, base + ["--gamma", "auto", "--out", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    assert seen["c"] > 0 and seen["d"] is None
    rep = json.loads((tmp_path / "a" / "report.json").read_text())
    sh = rep["drafters"]["e3"]["shape"]
    assert [(r["gamma"], r["width"]) for r in rep["results"]] == [(sh["gamma"], sh["width"])]


def test_an_eagle3_branch_of_a_recipe_is_evaluated(tmp_path, tiny_target):
    """distill, then a branch `- head: {type: eagle3, ...}` (its draft vocabulary from the distilled
    answers), then evaluate: the branch's head is evaluated beside the recipe's drafter, lossless."""
    from tests.tiny import write_mtbench

    prompts = write_mtbench(tmp_path / "q.jsonl", n=4, turns=1)
    recipe = {"name": "e3", "seed": 0, "target": {"path": str(tiny_target)}, "drafter": {"head": "eagle"},
              "distill": {"prompts": {"source": str(prompts)}, "max_new_tokens": 12, "batch_size": 4},
              "branches": {"e3": [{"head": {"type": "eagle3", "draft_vocab_size": 64, "aux_layers": AUX}}]},
              "evaluate": {"prompts": {"source": str(prompts), "limit": 2}, "gamma": 2, "max_new_tokens": 8,
                           "repeats": 1, "warmup": 0}}
    path = tmp_path / "e3.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    res = CliRunner().invoke(app, ["run", str(path), "--out", str(tmp_path / "art")])
    assert res.exit_code == 0, res.output
    run = tmp_path / "art" / "e3"
    rep = json.loads(next(run.glob("*_evaluate")).joinpath("report.json").read_text())
    assert set(rep["drafters"]) == {"raw", "e3"}
    _check_report(rep, "e3", 64)
