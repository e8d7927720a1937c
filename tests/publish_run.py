"""A hand-built run folder for the publish tests (tests/test_publish.py, tests/test_publish_upload.py)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from tiny import make_model

TOKEN = "hf_sd2TestTokenDoNotLeak0123456789"   # a fake Hub token that must never leak into output
REPO = "sd2-org/tiny-drafter"


def _lineage(*steps):
    return [{"id": sid, "stage": stage, "config": cfg, "fingerprint": f"fp-{sid}"} for sid, stage, cfg in steps]


def _manifest(folder: Path, sid: str, stage: str, lineage: list, branch=None):
    (folder / "manifest.json").write_text(json.dumps({"id": sid, "stage": stage, "branch": branch, "fingerprint": f"fp-{sid}",
                                                      "output_id": f"out-{sid}", "lineage": lineage}))


def build_run(root: Path, tokenizer, mtbench_file: Path) -> Path:
    """A run folder like `sd2 run` leaves: tiny derive, finetune and prune stage folders with
    manifests (lineage), and a report.json written by a real evaluate run over them (so a drift
    between evaluate, the writer, and publish, the reader, fails the publish tests)."""
    from sd2.core.context import StageInputs, standalone_context
    from sd2.core.models import ModelSource
    from sd2.core.report import Report
    from sd2.data.prompts import PromptsConfig
    from sd2.stages import evaluate

    target = make_model(root / "target", "llama", n_layers=4, seed=0, tokenizer=tokenizer)
    (target / "README.md").write_text("---\nlicense: mit\n---\n# tiny target\n")
    run = root / "quick"
    run.mkdir()
    recipe = {"name": "quick", "target": {"path": str(target)}, "drafter": {"derive": "target", "keep_layers": 2}}
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    derive = _lineage(("drafter.derive", "derive", {"keep_layers": 2, "layers": None}))
    d0 = make_model(run / "00_drafter.derive", "llama", n_layers=2, seed=1, tokenizer=tokenizer)
    _manifest(d0, "drafter.derive", "derive", derive)
    dense_lin = derive + _lineage(("dense.finetune", "finetune", {"epochs": 1, "lr": 0.001}))
    d1 = make_model(run / "02_dense.finetune", "llama", n_layers=2, seed=2, tokenizer=tokenizer)
    _manifest(d1, "dense.finetune", "finetune", dense_lin, "dense")
    sparse_lin = derive + _lineage(("sparse.prune", "prune", {"method": "magnitude", "sparsity": 0.5}))
    d2 = make_model(run / "03_sparse.prune", "llama", n_layers=2, seed=3, tokenizer=tokenizer)
    _sparsify(d2)
    _manifest(d2, "sparse.prune", "prune", sparse_lin, "sparse")
    (run / "01_distill").mkdir()
    ev = run / "04_evaluate"
    ev.mkdir()
    cfg = evaluate.Config(prompts=PromptsConfig(source=str(mtbench_file), limit=2), gamma=[4, 2],
                          temperature=[0.0, 1.0], max_new_tokens=8, warmup=0)
    drafters = {"raw": ModelSource(str(d0), "rawfp"), "dense": ModelSource(str(d1), "densefp"),
                "sparse": ModelSource(str(d2), "sparsefp")}
    evaluate.run(cfg, StageInputs(target=ModelSource(str(target), "tfp0123456789abc"), drafters=drafters), ev,
                 standalone_context(ev))
    # a path relative to the run folder (a run under a relative --out): the reader must resolve it
    report = Report.read(ev)
    report.drafters["sparse"].path = "03_sparse.prune"
    report.save(ev / "report.json")
    _manifest(ev, "evaluate", "evaluate", [])
    return run


def _sparsify(folder: Path) -> None:
    """Zero half of every decoder linear weight (by magnitude) and write a sparsity.json, as prune would."""
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    sd = load_file(str(path))
    for k, v in sd.items():
        if ".layers." in k and v.dim() == 2:
            v[v.abs() < v.abs().median()] = 0.0
    save_file(sd, str(path), metadata={"format": "pt"})
    (folder / "sparsity.json").write_text(json.dumps({"overall": 0.5, "structure": "unstructured"}))
