"""Head finetuning under DDP: 2 CPU processes (gloo, via torchrun) reach the head weights of 1 process
with the same global batch, and a pruned head's zeros stay exactly zero in both. The launch and the
comparison follow tests/test_finetune_ddp.py (the causal-LM case)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from test_finetune import write_distilled
from test_finetune_ddp import _free_port

SCRIPT = """
import json, os, sys
sys.path.insert(0, {tests!r})
import conftest  # offline env
from pathlib import Path
from sd2.core.context import StageInputs, standalone_context
from sd2.core.models import ModelSource
from sd2.stages import finetune

cfg = finetune.Config(**json.loads(sys.argv[2]))
out = Path(sys.argv[1])
out.mkdir(exist_ok=True)
inputs = StageInputs(model=ModelSource({head!r}, "h", kind="head"), target=ModelSource({target!r}, "t"), dataset=Path({data!r}))
metrics = finetune.run(cfg, inputs, out, standalone_context(None))
if int(os.environ.get("RANK", "0")) == 0:  # every rank returns the metrics; one writes them
    (out / ("metrics-%d.json" % metrics["world_size"])).write_text(json.dumps(metrics))
"""


def _pruned_head(folder: Path, target_folder: Path, tokenizer, kind: str) -> Path:
    """A fresh head whose every Linear weight has its smaller half (by magnitude) at exactly zero."""
    from sd2.core.models import load_model
    from sd2.heads import io

    head = io.build(kind, load_model(target_folder), target_ref=str(target_folder))
    with torch.no_grad():
        for _, lin in head.linears():
            w = lin.weight
            w[w.abs() <= w.abs().flatten().median()] = 0.0
    return io.save(head, folder, tokenizer)


def _run(script: Path, out: Path, cfg: dict, processes: int) -> tuple[dict, dict]:
    launch = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
        str(_free_port())]
    # one compute thread per process either way (torchrun's default per rank), so that no kernel splits
    # its reductions differently between the runs: the comparison below is exact
    res = subprocess.run(launch + [str(script), str(out), json.dumps(cfg)], capture_output=True, text=True, timeout=240,
                         env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    return (json.loads((out / f"metrics-{processes}.json").read_text()), load_file(str(out / "model.safetensors")))


def test_two_processes_match_one_for_a_head(tmp_path, tokenizer, tiny_target):
    """Global batch 4 both ways: 2 processes x 2 rows, and 1 process x 2 rows x 2 accumulated micro-batches
    (the same micro-batches, so only DDP differs).

    Why not 1 process x 4 rows, as tests/test_finetune_ddp.py does: the 4-row batches pad to other
    lengths, the head's gradients then agree to ~4e-7 relative (rounding), and AdamW, which divides by
    sqrt(v), turns that into weight differences up to 2.5e-4 (fs.down_proj, lr 5e-3) on near-zero
    gradient entries; measured once, that comparison tests rounding, not DDP."""
    head = _pruned_head(tmp_path / "head", tiny_target, tokenizer, "fspad")
    data = write_distilled(tmp_path / "data", tokenizer, n=14)
    script = tmp_path / "ft.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent), head=str(head), target=str(tiny_target),
                                    data=str(data)))
    # feature_noise 0: each process draws its noise from the same seed, so 1 and 2 processes would draw
    # different noise for the same rows; unroll 1 runs the head on its own features under DDP too.
    common = dict(loss="fkl", lr=5e-3, max_steps=3, val_rows=2, checkpoint_every=2, warmup_ratio=0.0,
                  feature_noise=0.0, unroll=1, mal_gamma=2)
    m2, two = _run(script, tmp_path / "two", common | {"batch_size": 2}, 2)
    ma, accum = _run(script, tmp_path / "accum", common | {"batch_size": 2, "grad_accum": 2}, 1)

    assert ma["global_batch"] == m2["global_batch"] == 4 and m2["world_size"] == 2 and ma["world_size"] == 1
    assert ma["steps"] == m2["steps"] == 3
    for m in (ma, m2):
        assert m["mask_held"] and m["mask_exact"] and m["masked_weights"] == m2["masked_weights"] > 0
    start = load_file(str(head / "model.safetensors"))
    assert set(accum) == set(two) == set(start)
    for key in start:
        # DDP (gradients averaged by gloo, each process's loss scaled by the world size) against the
        # same micro-batches accumulated in one process: (2a)/2 + (2b)/2 == a + b exactly, bitwise on our
        # machine. Dropping the loss's world-size factor moved fc.bias by 1.4e-6 (tried once): caught.
        assert torch.allclose(two[key], accum[key], atol=1e-7, rtol=0), \
            f"{key}: max diff {(two[key] - accum[key]).abs().max()}"
        if start[key].dim() == 2:   # every Linear of the head: its zeros held exactly in every run
            zeros = start[key] == 0
            assert zeros.any() and not accum[key][zeros].any() and not two[key][zeros].any(), key
    moved = (two["model.layers.0.self_attn.q_proj.weight"] - start["model.layers.0.self_attn.q_proj.weight"]).abs().max()
    assert moved > 1e-3  # the runs trained: agreement is not the agreement of two untouched copies
    assert m2["val_mal"] == ma["val_mal"] and m2["val_tokens"] == ma["val_tokens"] > 0
