"""finetune under DDP: 2 CPU processes (gloo, via torchrun) reach the weights of 1 process with the
same global batch. On CPU, ``torchrun --nproc_per_node 2`` gives accelerate a 2-process gloo world
(``accelerate launch --cpu --num_processes 2`` gave a world of 1 on our machines)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from tiny import make_model
from test_finetune import prune_half, write_distilled

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
metrics = finetune.run(cfg, StageInputs(model=ModelSource({model!r}, "m"), dataset=Path({data!r})), out,
                       standalone_context(None))
if int(os.environ.get("RANK", "0")) == 0:  # every rank returns the metrics; one writes them
    (out / ("metrics-%d.json" % metrics["world_size"])).write_text(json.dumps(metrics))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args: list[str], cfg: dict) -> subprocess.CompletedProcess:
    # one compute thread per process in every run (torchrun gives each rank 1 by default): the runs then
    # differ in nothing but the process layout, not in how a kernel splits its reductions across threads
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, *args, json.dumps(cfg)], capture_output=True, text=True, timeout=240, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def test_two_processes_match_one(tmp_path, tokenizer, tiny_target):
    """2 processes (batch 2 each) reach, bit for bit, the weights of 1 process that steps over the same
    two micro-batches (batch 2, grad_accum 2): DDP's all-reduce of (2 g0, 2 g1) / 2 is exactly the
    accumulation g0 + g1. Against 1 process with batch 4 (one micro-batch of the same 4 rows) they
    differ only by floating-point summation order, which AdamW amplifies where a gradient is near 0
    (its step is about lr * sign(g) there). That difference depends on the CPU's kernels: measured max
    |diff| 3.6e-5 on an AMD EPYC with AVX-512 (Zen 5) and 6.5e-4 (embeddings) on an AVX2-only AMD EPYC,
    whose test of atol 1e-5 against batch 4 failed every time. Hence exact equality against grad_accum,
    and a bound from AdamW's step size against batch 4."""
    from sd2.core.models import load_model

    drafter = make_model(tmp_path / "drafter", tokenizer=tokenizer, n_layers=2, seed=5)
    sparse = prune_half(drafter, tmp_path / "sparse", tokenizer)
    data = write_distilled(tmp_path / "data", tokenizer, n=14, teacher=load_model(tiny_target))
    script = tmp_path / "ft.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent), model=str(sparse), data=str(data)))
    lr, steps = 5e-3, 3
    common = dict(loss="fkl", ce_weight=0.5, lr=lr, max_steps=steps, val_rows=2, checkpoint_every=2, warmup_ratio=0.0,
                  precision="fp32")   # bf16 autocast (auto on AMX / AVX512-BF16 CPUs) would round differently per shape

    _run([str(script), str(tmp_path / "accum")], common | {"batch_size": 2, "grad_accum": 2})
    _run([str(script), str(tmp_path / "one")], common | {"batch_size": 4})
    _run(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()), str(script),
          str(tmp_path / "two")], common | {"batch_size": 2})

    m1 = json.loads((tmp_path / "accum" / "metrics-1.json").read_text())
    m2 = json.loads((tmp_path / "two" / "metrics-2.json").read_text())
    assert m1["global_batch"] == m2["global_batch"] == 4 and m2["world_size"] == 2
    assert m1["mask_exact"] and m2["mask_exact"]
    accum, two, one = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("accum", "two", "one"))
    start = load_file(str(sparse / "model.safetensors"))
    assert accum.keys() == two.keys() == one.keys()
    for key in accum:
        assert torch.equal(accum[key], two[key]), f"{key}: max diff {(accum[key] - two[key]).abs().max()}"
        # summation order only: far inside AdamW's bound of 2 * lr per step for a flipped sign
        assert (one[key] - two[key]).abs().max() < 0.1 * lr * steps, key
        assert torch.equal(two[key] == 0, start[key] == 0) or "layers" not in key or "norm" in key  # the mask
    moved = (two["model.layers.1.self_attn.q_proj.weight"] - start["model.layers.1.self_attn.q_proj.weight"]).abs().max()
    assert moved > 1e-3  # the runs trained: agreement is not the agreement of two untouched copies
    assert m1["val_loss"] == m2["val_loss"]
