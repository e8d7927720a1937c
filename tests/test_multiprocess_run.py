"""`sd2 run` under torchrun with 2 CPU processes: rank 0 runs every stage and writes the manifests;
rank 1 follows them and joins only the distributed stage (finetune). No second lock, no race."""

import json
import socket
import subprocess
import sys

import yaml
from safetensors.torch import load_file


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sd2_run_under_torchrun(tmp_path, tiny_target):
    from tiny import write_mtbench

    prompts = write_mtbench(tmp_path / "q.jsonl", n=8, turns=1)
    recipe = {"name": "mp", "seed": 0, "device": "cpu", "target": {"path": str(tiny_target)},
              "drafter": {"derive": "target", "keep_layers": 2},
              "distill": {"prompts": {"source": str(prompts)}, "max_new_tokens": 8, "batch_size": 8},
              "branches": {"dense": [{"finetune": {"max_steps": 2, "batch_size": 2, "val_rows": 2, "lr": 1e-3}}]}}
    path = tmp_path / "mp.yaml"
    path.write_text(yaml.safe_dump(recipe))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "sd2.pipeline.cli", "run", str(path), "--out", str(tmp_path / "art")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    run = tmp_path / "art" / "mp"
    m = json.loads((run / "02_dense.finetune" / "manifest.json").read_text())
    assert m["metrics"]["world_size"] == 2 and m["metrics"]["mask_exact"] is not False
    assert not (run / ".lock").exists()
    raw, tuned = load_file(str(run / "00_drafter.derive" / "model.safetensors")), load_file(str(run / "02_dense.finetune" / "model.safetensors"))
    assert any(k in tuned and not (raw[k] == tuned[k]).all() for k in raw)
    # a second launch finds every stage done
    res = subprocess.run(cmd[:6] + [str(_free_port())] + cmd[7:], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    assert json.loads((run / "02_dense.finetune" / "manifest.json").read_text())["finished"] == m["finished"]
