"""Heads through the pipeline: head branches in `sd2 run`, bit-identical resume of head fine-tuning,
and the export to vLLM's EAGLE layout (tests/test_heads.py holds the head module and its drafting)."""

from __future__ import annotations

import pytest
import torch

from sd2.heads import io
from tests.tiny import greedy_rows, killed_after_checkpoint, learnable_target


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return learnable_target(tmp_path_factory.mktemp("tgt") / "target")


import json


def _head_recipe(path, target, prompts, branches, evaluate=None):
    import yaml

    recipe = {"name": "heads", "seed": 0, "target": {"path": str(target)}, "drafter": {"head": "fspad"},
              "distill": {"prompts": {"source": str(prompts)}, "max_new_tokens": 16, "batch_size": 4},
              "branches": branches}
    if evaluate:
        recipe["evaluate"] = evaluate
    path.write_text("# sd2 run " + str(path) + "\n" + yaml.safe_dump(recipe, sort_keys=False))
    return path


def test_head_branches_through_the_pipeline(tmp_path, tiny_target):
    """drafter: {head: fspad} -> wanda 50% -> finetune with the mask held exactly; trim_vocab K rows."""
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from sd2.pipeline.cli import app
    from tests.tiny import write_mtbench

    prompts = write_mtbench(tmp_path / "q.jsonl", n=8, turns=1)
    ft = {"epochs": 2, "lr": 1e-3, "batch_size": 2, "val_rows": 1, "loss": "fkl", "feature_noise": 0.05}
    recipe = _head_recipe(tmp_path / "h.yaml", tiny_target, prompts, {
        "sparse": [{"prune": {"method": "wanda", "sparsity": 0.5, "calibration": {"samples": 4}}}, {"finetune": ft}],
        "trim": [{"trim_vocab": {"k": 40, "heldout": 0.0}}, {"finetune": dict(ft, unroll=1)}],
        "eagle": [{"head": {"type": "eagle"}}, {"finetune": ft}],
    }, evaluate={"prompts": {"source": str(prompts), "limit": 2}, "gamma": 2, "max_new_tokens": 8,
                 "temperature": [0.0, 1.0], "repeats": 1, "warmup": 0})
    res = CliRunner().invoke(app, ["run", str(recipe), "--out", str(tmp_path / "art")])
    assert res.exit_code == 0, res.output
    run = tmp_path / "art" / "heads"
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == [
        "00_drafter.head", "01_distill", "02_sparse.prune", "03_sparse.finetune", "04_trim.trim_vocab",
        "05_trim.finetune", "06_eagle.head", "07_eagle.finetune", "08_evaluate"]
    assert io.read_config(run / "07_eagle.finetune").type == "eagle"
    report = json.loads((run / "08_evaluate" / "report.json").read_text())
    assert {d["kind"] for d in report["drafters"].values()} == {"head"}
    for r in report["results"]:
        assert r["lossless"] in (True, None) and 1.0 <= r["mal"] <= 3.0
        if r["temperature"] == 0:
            assert r["lossless"] is True
            assert r["greedy_mal_teacher_forced"] == pytest.approx(r["mal"], abs=1e-6), r["drafter"]
    assert report["drafters"]["trim"]["macs"]["lm_head"] < report["drafters"]["sparse"]["macs"]["lm_head"]
    assert report["drafters"]["sparse"]["sparsity"] == pytest.approx(0.5, abs=0.02)
    cfg = io.read_config(run / "00_drafter.head")
    assert cfg.type == "fspad" and cfg.target == str(tiny_target.resolve())
    pruned, tuned = (load_file(str(run / f / "model.safetensors")) for f in ("02_sparse.prune", "03_sparse.finetune"))
    changed = 0
    for k, w in pruned.items():
        if w.dim() == 2:
            zeros = w == 0
            assert zeros.float().mean() == pytest.approx(0.5, abs=0.02), k
            assert torch.all(tuned[k][zeros] == 0), f"{k}: a pruned weight came back"
            changed += int(not torch.equal(w, tuned[k]))
    assert changed > 0
    trimmed = load_file(str(run / "05_trim.finetune" / "model.safetensors"))
    assert trimmed["lm_head.weight"].shape[0] == trimmed["d2t"].shape[0] <= 40 + 3
    assert not any("embed" in k for k in trimmed)


def test_head_finetune_resume_is_bit_identical(tmp_path, target):
    """Interrupted after a checkpoint and resumed, training ends with the same weights bit for bit."""
    from sd2.heads.train import train_head
    from sd2.core.context import standalone_context
    from sd2.stages.finetune import Config

    rows, val = greedy_rows(target, 24, 0), greedy_rows(target, 2, 1)
    cfg = Config(loss="fkl", lr=3e-3, max_steps=6, batch_size=4, checkpoint_every=3, feature_noise=0.1, mal_gamma=2)
    cj = cfg.model_dump(mode="json")

    def fresh():
        return io.build("eagle", target, seed=0)

    a = fresh()
    train_head(cfg, a, target, rows, val, 0, tmp_path / "a", standalone_context(tmp_path), cj)

    b = fresh()
    with killed_after_checkpoint():
        train_head(cfg, b, target, rows, val, 0, tmp_path / "b", standalone_context(tmp_path), cj)
    c = fresh()
    train_head(cfg, c, target, rows, val, 0, tmp_path / "b", standalone_context(tmp_path), cj)
    for (k, x), (_, y) in zip(a.state_dict().items(), c.state_dict().items()):
        assert torch.equal(x, y), k


def test_export_eagle_for_vllm_round_trip(tmp_path, target, tokenizer):
    """The exported folder's tensor names and shapes are exactly vLLM's EAGLE-1 loader contract
    (sd2/heads/export.py), the config is a Llama config; FSPAD and trimmed heads are refused with
    the sd2 command that runs them."""
    from safetensors.torch import load_file

    from sd2.core.errors import Sd2Error
    from sd2.heads.export import vllm_eagle_tensors, write_vllm_eagle

    head = io.build("eagle", target, num_layers=2, target_ref="tgt")
    io.save(head, tmp_path / "h", tokenizer)
    (tmp_path / "out").mkdir()
    cfg = write_vllm_eagle(tmp_path / "h", tmp_path / "out")
    got = {k: tuple(v.shape) for k, v in load_file(str(tmp_path / "out" / "model.safetensors")).items()}
    d = 64
    assert got["fc.weight"] == (d, 2 * d) and "fc.bias" not in got
    assert "layers.0.input_layernorm.weight" not in got and got["layers.1.input_layernorm.weight"] == (d,)
    assert got["layers.0.self_attn.k_proj.weight"] == (2 * 16, d)      # 2 KV heads of 16
    assert got == vllm_eagle_tensors(head.head_config)
    assert not any(k.startswith(("model.", "embed_tokens", "lm_head", "norm")) for k in got)
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["num_hidden_layers"] == 2
    exported = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert torch.equal(exported["layers.1.mlp.down_proj.weight"], head.model.layers[1].mlp.down_proj.weight)
    fs = io.build("fspad", target, target_ref="tgt")
    io.save(fs, tmp_path / "f", tokenizer)
    with pytest.raises(Sd2Error, match="nothing in vLLM runs it.*sd2 eval --target tgt --drafter fspad="):
        write_vllm_eagle(tmp_path / "f", tmp_path / "out")
    head.trim(range(10))
    io.save(head, tmp_path / "t", tokenizer)
    with pytest.raises(Sd2Error, match="trimmed output layer"):
        write_vllm_eagle(tmp_path / "t", tmp_path / "out")


