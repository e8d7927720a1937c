"""finetune under DDP: 2 CPU processes (gloo, via torchrun) reach the weights of 1 process with the
same global batch. On CPU, ``torchrun --nproc_per_node 2`` gives accelerate a 2-process gloo world
(``accelerate launch --cpu --num_processes 2`` gave a world of 1 on our machines)."""

import json
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


def test_two_processes_match_one(tmp_path, tokenizer, tiny_target):
    from sd2.core.models import load_model

    drafter = make_model(tmp_path / "drafter", tokenizer=tokenizer, n_layers=2, seed=5)
    sparse = prune_half(drafter, tmp_path / "sparse", tokenizer)
    data = write_distilled(tmp_path / "data", tokenizer, n=14, teacher=load_model(tiny_target))
    script = tmp_path / "ft.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent), model=str(sparse), data=str(data)))
    common = dict(loss="fkl", ce_weight=0.5, lr=5e-3, max_steps=3, val_rows=2, checkpoint_every=2, warmup_ratio=0.0)

    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one"), json.dumps(common | {"batch_size": 4})],
                         capture_output=True, text=True, timeout=240)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(_free_port()), str(script), str(tmp_path / "two"),
                          json.dumps(common | {"batch_size": 2})], capture_output=True, text=True, timeout=240)
    assert two.returncode == 0, two.stderr[-3000:]

    m1 = json.loads((tmp_path / "one" / "metrics-1.json").read_text())
    m2 = json.loads((tmp_path / "two" / "metrics-2.json").read_text())
    assert m1["global_batch"] == m2["global_batch"] == 4 and m2["world_size"] == 2
    assert m1["mask_exact"] and m2["mask_exact"]
    a = load_file(str(tmp_path / "one" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "model.safetensors"))
    start = load_file(str(sparse / "model.safetensors"))
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5, rtol=1e-4), f"{key}: max diff {(a[key] - b[key]).abs().max()}"
    moved = (a["model.layers.1.self_attn.q_proj.weight"] - start["model.layers.1.self_attn.q_proj.weight"]).abs().max()
    assert moved > 1e-3  # the runs trained: agreement is not the agreement of two untouched copies
    assert abs(m1["val_loss"] - m2["val_loss"]) < 1e-4
