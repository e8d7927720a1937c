"""A whole recipe through every real stage on tiny models: the artifact tree, weights that changed,
zeros that stayed zero, a lossless report, a fast all-skipped rerun, and exact invalidation."""

import json
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from sd2.pipeline.cli import app

pytestmark = pytest.mark.filterwarnings("ignore")


def write_recipe(path, target, prompts, sparse_lr=1e-3):
    recipe = {
        "name": "tiny", "seed": 0,
        "target": {"path": str(target)},
        "drafter": {"derive": "target", "keep_layers": 2},
        "distill": {"prompts": {"source": str(prompts)}, "max_new_tokens": 12, "batch_size": 4},
        "branches": {
            "dense": [{"finetune": {"epochs": 2, "lr": 1e-3, "batch_size": 2, "val_rows": 1}}],
            "sparse": [{"prune": {"method": "magnitude", "sparsity": 0.5}},
                       {"finetune": {"epochs": 2, "lr": sparse_lr, "batch_size": 2, "val_rows": 1}}],
            "trim": [{"trim_vocab": {"k": 40, "heldout": 0.0}},
                     {"finetune": {"epochs": 1, "lr": 1e-3, "batch_size": 2, "val_rows": 1}}],
        },
        "evaluate": {"prompts": {"source": str(prompts), "limit": 2}, "gamma": 3, "max_new_tokens": 10,
                     "repeats": 1, "warmup": 0},
    }
    path.write_text("# sd2 run " + str(path) + "\n" + yaml.safe_dump(recipe))
    return path


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


def test_tiny_recipe_end_to_end(tmp_path, tiny_target, tmp_path_factory):
    from tiny import write_mtbench

    prompts = write_mtbench(tmp_path / "q.jsonl", n=6, turns=1)
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny_target, prompts)
    out = tmp_path / "art"
    res = CliRunner().invoke(app, ["run", str(recipe), "--out", str(out)])
    assert res.exit_code == 0, res.output
    run = out / "tiny"
    folders = sorted(p.name for p in run.iterdir() if p.is_dir())
    assert folders == ["00_drafter.derive", "01_distill", "02_dense.finetune", "03_sparse.prune",
                       "04_sparse.finetune", "05_trim.trim_vocab", "06_trim.finetune", "07_evaluate"]
    for f in folders:
        assert (run / f / "manifest.json").is_file(), f

    # fine-tuning changed the weights; the sparse branch kept every zero at zero
    raw, dense = weights(run / "00_drafter.derive"), weights(run / "02_dense.finetune")
    assert any(not torch.equal(raw[k], dense[k]) for k in raw if "layers" in k)
    pruned, tuned = weights(run / "03_sparse.prune"), weights(run / "04_sparse.finetune")
    changed = 0
    for k, w in pruned.items():
        if "layers" in k and w.dim() == 2:
            zeros = w == 0
            assert zeros.float().mean() > 0.45, k
            assert torch.all(tuned[k][zeros] == 0), f"{k}: a pruned weight came back"
            changed += int(not torch.equal(w, tuned[k]))
    assert changed > 0
    sparsity = json.loads((run / "04_sparse.finetune" / "sparsity.json").read_text())
    assert sparsity["decoder_sparsity"] == pytest.approx(0.5, abs=0.005)

    report = json.loads((run / "07_evaluate" / "report.json").read_text())
    assert set(report["drafters"]) == {"raw", "dense", "sparse", "trim"}
    for entry in report["results"]:
        for key in ("mal", "acceptance_per_position", "macs_per_token", "speedup", "lossless"):
            assert key in entry
        assert entry["lossless"] is True
        assert 1.0 <= entry["mal"] <= 4.0
    by = {e["drafter"]: e for e in report["results"]}
    assert by["sparse"]["macs_per_token"] < by["dense"]["macs_per_token"]
    assert by["trim"]["macs_per_token"] < by["dense"]["macs_per_token"]
    assert (run / "07_evaluate" / "report.md").is_file()

    # a rerun with nothing changed skips every stage, quickly
    t = time.time()
    res = CliRunner().invoke(app, ["run", str(recipe), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert time.time() - t < 10
    statuses = [json.loads((run / f / "manifest.json").read_text())["finished"] for f in folders]
    # one branch changed: only it and evaluate rerun
    write_recipe(recipe, tiny_target, prompts, sparse_lr=5e-4)
    res = CliRunner().invoke(app, ["run", str(recipe), "--out", str(out)])
    assert res.exit_code == 0, res.output
    after = [json.loads((run / f / "manifest.json").read_text())["finished"] for f in folders]
    rerun = [f for f, a, b in zip(folders, statuses, after) if a != b]
    assert rerun == ["04_sparse.finetune", "07_evaluate"]

    res = CliRunner().invoke(app, ["show", str(run)])
    assert res.exit_code == 0 and "04_sparse.finetune" in res.output and "done" in res.output
