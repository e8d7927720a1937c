"""finetune under FSDP2: ``accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2``
on CPU (gloo), the launch docs/finetune.md gives. Found here (accelerate 1.16, torch 2.13): torch's FSDP2
``fully_shard`` runs on CPU over gloo, but accelerate alone falls back to DDP on CPU; sd2 switches its
Accelerator to FSDP (sd2/train/fsdp.py), and these tests check that it did (``fsdp`` in the metrics,
and the frozen target's layers sharded). FSDP1 is refused (sd2 shards and checkpoints by parameter name).

What is compared, and why exactly: 2 processes with batch 2 each against 1 process with batch 2 and
grad_accum 2, the same micro-batches of the same global batch (tests/test_finetune_ddp.py gives the
reasoning for DDP). Under FSDP2 each process computes its micro-batch's whole gradient, with the
loss scaled by the world size, and the reduce-scatter sums and halves: (2a + 2b) / 2 == a + b
bitwise (scaling by 2 is exact); fused AdamW is element-wise, so each shard updates exactly as the
same entries in one process. One thing differs: the gradient norm is summed shard by shard, in
another order, so where clipping bites the coefficient can differ in its last bits. The runs
therefore clip at 1e6 (never reached: the coefficient is exactly 1.0, but clip_grad_norm_ runs over
the DTensors), and the comparison is bitwise, which holds on any CPU: no kernel sees a different
shape or thread count (OMP_NUM_THREADS=1 in every process) between the two runs. (With clipping at
1.0, which bites here, a 3-step run of the drafter below differed from 1 process by at most 1.2e-7,
measured once on the Zen 5 EPYC; not asserted, since AdamW can amplify such a difference
where a gradient is near zero, as tests/test_finetune_ddp.py explains.)

Both frozen-target paths are sharded in these runs: the drafter's online KD teacher and the head's
target (4 layers each, ``target_layers_sharded``), and every process then validates.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_finetune import prune_half, write_distilled
from test_finetune_ddp import _free_port
from test_heads_ddp import _pruned_head
from tiny import make_model

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "accelerate" / "fsdp.yaml"
# the launch docs/finetune.md and docs/scale.md give (checked below), run by test_sd2_run_under_fsdp
LAUNCH = "accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2 -m sd2.pipeline.cli run"

SCRIPT = """
import functools, json, os, signal, sys
sys.path.insert(0, {tests!r})
import conftest  # offline env
from pathlib import Path
from sd2.core.context import StageInputs, standalone_context
from sd2.core.models import ModelSource
from sd2.stages import finetune
from sd2.train import loop

kill_at = int(os.environ.get("KILL_AT", "0"))
def kill(step):   # every process kills itself after this step (a checkpoint before it is complete)
    if step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
def record(step):   # the steps this launch runs, one file per process
    with open(os.path.join(sys.argv[1], "steps-%s.txt" % os.environ.get("RANK", "0")), "a") as f:
        f.write("%d\\n" % step)
    kill(step)
loop.train = functools.partial(loop.train, on_step=record)

cfg = finetune.Config(**json.loads(sys.argv[2]))
out = Path(sys.argv[1])
out.mkdir(exist_ok=True)
inputs = StageInputs(model=ModelSource({model!r}, "h" if {head!r} else "m", kind="head" if {head!r} else "lm"),
                     target=ModelSource({target!r}, "t"), dataset=Path({data!r}))
metrics = finetune.run(cfg, inputs, out, standalone_context(None))
if int(os.environ.get("RANK", "0")) == 0:  # every rank returns the metrics; one writes them
    (out / ("metrics-%d.json" % metrics["world_size"])).write_text(json.dumps(metrics))
"""


def _launch(script: Path, out: Path, cfg: dict, fsdp: bool, kill_at: int = 0) -> subprocess.CompletedProcess:
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG), "--num_processes", "2",
              "--main_process_port", str(_free_port())] if fsdp else [sys.executable]
    env = os.environ | {"OMP_NUM_THREADS": "1", "KILL_AT": str(kill_at)}
    return subprocess.run(launch + [str(script), str(out), json.dumps(cfg)], capture_output=True, text=True,
                          timeout=240, env=env)


def _run(script: Path, out: Path, cfg: dict, fsdp: bool) -> tuple[dict, dict]:
    res = _launch(script, out, cfg, fsdp)
    assert res.returncode == 0, res.stderr[-4000:]
    metrics = json.loads((out / f"metrics-{2 if fsdp else 1}.json").read_text())
    return metrics, load_file(str(out / "model.safetensors"))


def _script(tmp_path: Path, model: Path, data: Path, target: Path, head: bool) -> Path:
    script = tmp_path / "ft.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent), model=str(model), data=str(data),
                                    head=head, target=str(target)))
    return script


def _assert_same(a: dict, b: dict, start: dict, what: str) -> None:
    assert a.keys() == b.keys() == start.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{what}: {key} max diff {(a[key] - b[key]).abs().max()}"


def _assert_mask(weights: dict, start: dict, keys) -> int:
    """Every zero of the pruned start weights in ``keys`` is still exactly zero; returns how many."""
    held = 0
    for key in keys:
        zeros = start[key] == 0
        assert zeros.any() and not weights[key][zeros].any(), key
        held += int(zeros.sum())
    return held


def test_fsdp_two_processes_match_one_and_resume_bit_identically(tmp_path, tokenizer, tiny_target):
    """A pruned causal-LM drafter with an online KD teacher (the target, sharded layer by layer under
    FSDP): FSDP on 2 processes == 1 process with the same global batch (bitwise, module docstring);
    a run killed (SIGKILL, every process) after its step-2 checkpoint and launched
    again resumes from the gathered checkpoint to the uninterrupted run's weights, bitwise; the mask
    holds in every run; the checkpoint is safetensors + JSON with the optimizer state keyed by name."""
    from sd2.core.models import load_model

    drafter = make_model(tmp_path / "drafter", tokenizer=tokenizer, n_layers=2, seed=5)
    sparse = prune_half(drafter, tmp_path / "sparse", tokenizer)
    data = write_distilled(tmp_path / "data", tokenizer, n=14, teacher=load_model(tiny_target))
    script = _script(tmp_path, sparse, data, tiny_target, head=False)
    common = dict(loss="fkl", ce_weight=0.5, teacher="online", lr=5e-3, max_steps=4, val_rows=2, checkpoint_every=2, eval_every=3,
                  warmup_ratio=0.0, max_grad_norm=1e6, precision="fp32")

    m1, accum = _run(script, tmp_path / "accum", common | {"batch_size": 2, "grad_accum": 2}, fsdp=False)
    m2, fsdp = _run(script, tmp_path / "fsdp", common | {"batch_size": 2}, fsdp=True)
    assert m2["fsdp"] is True and m2["world_size"] == 2 and m1["fsdp"] is False
    assert m2["target_layers_sharded"] == 4 and m1["target_layers_sharded"] == 0   # the tiny target's 4 layers
    assert m1["global_batch"] == m2["global_batch"] == 4 and m2["steps"] == 4
    start = load_file(str(sparse / "model.safetensors"))
    _assert_same(fsdp, accum, start, "FSDP x 2 against 1 process")
    assert m2["val_loss"] == m1["val_loss"] and m2["val_mal"] == m1["val_mal"]
    pruned = [k for k in start if "layers" in k and start[k].dim() == 2]
    assert _assert_mask(fsdp, start, pruned) == m2["masked_weights"] == m1["masked_weights"] > 0
    assert m2["mask_exact"] is True and m2["mask_violations"] == 0
    key = "model.layers.1.self_attn.q_proj.weight"
    assert (fsdp[key] - start[key]).abs().max() > 1e-3   # it trained: agreement is not that of untouched copies

    out = tmp_path / "resumed"
    killed = _launch(script, out, common | {"batch_size": 2}, fsdp=True, kill_at=3)
    assert killed.returncode != 0 and ("SIGKILL" in killed.stderr or f"exitcode  : -{int(signal.SIGKILL)}" in killed.stderr), \
        killed.stderr[-3000:]
    ckpt = out / "checkpoint"
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 2 and state["fsdp"] is True and not (out / "model.safetensors").exists()
    assert not list(ckpt.glob("*.pt")) and {"model.safetensors", "optimizer.safetensors", "optimizer.json",
                                            "rng-0.json", "rng-1.json"} <= {p.name for p in ckpt.iterdir()}
    saved = load_file(str(ckpt / "model.safetensors"))   # the trained module: the drafter under "model."
    assert saved.keys() == {f"model.{k}" for k in start} and saved[f"model.{key}"].shape == start[key].shape
    moments = json.loads((ckpt / "optimizer.json").read_text())["state"]
    assert "model.model.layers.1.self_attn.q_proj.weight" in moments   # keyed by name, whole tensors:
    opt = load_file(str(ckpt / "optimizer.safetensors"))
    assert opt["optimizer.state.model.model.layers.1.self_attn.q_proj.weight.exp_avg"].shape == start[key].shape

    (out / "steps-0.txt").unlink()
    m3, resumed = _run(script, out, common | {"batch_size": 2}, fsdp=True)
    assert (out / "steps-0.txt").read_text().split() == ["3", "4"]   # it resumed after step 2
    assert m3["steps"] == 4 and m3["mask_exact"] is True and not ckpt.exists()
    _assert_same(resumed, fsdp, start, "resumed against uninterrupted FSDP")


def test_fsdp_head_with_its_target_sharded_matches_one_process(tmp_path, tokenizer, tiny_target):
    """A pruned FSPAD head under FSDP: the head sharded by accelerate, its frozen target sharded layer by
    layer (its embeddings and lm_head, which the head reads, whole on each process), every process
    validating (the target's forwards are collectives). Equal, bitwise, to 1 process with grad_accum 2;
    the head's zeros stay zero."""
    head = _pruned_head(tmp_path / "head", tiny_target, tokenizer, "fspad")
    data = write_distilled(tmp_path / "data", tokenizer, n=14)
    script = _script(tmp_path, head, data, tiny_target, head=True)
    # feature_noise 0 (each process would draw its own noise: tests/test_heads_ddp.py); unroll 1 runs the
    # head on its own features, i.e. twice per forward, with its layers gathered twice
    common = dict(loss="fkl", lr=5e-3, max_steps=3, val_rows=2, checkpoint_every=2, warmup_ratio=0.0,
                  feature_noise=0.0, unroll=1, mal_gamma=2, max_grad_norm=1e6, precision="fp32")
    ma, accum = _run(script, tmp_path / "accum", common | {"batch_size": 2, "grad_accum": 2}, fsdp=False)
    res = _launch(script, tmp_path / "fsdp", common | {"batch_size": 2}, fsdp=True)
    assert res.returncode == 0, res.stderr[-4000:]
    m2 = json.loads((tmp_path / "fsdp" / "metrics-2.json").read_text())
    fsdp = load_file(str(tmp_path / "fsdp" / "model.safetensors"))
    assert m2["fsdp"] is True and m2["world_size"] == 2 and m2["steps"] == ma["steps"] == 3
    assert m2["target_layers_sharded"] == 4 and ma["target_layers_sharded"] == 0   # the tiny target's 4 layers
    start = load_file(str(head / "model.safetensors"))
    _assert_same(fsdp, accum, start, "FSDP head x 2 against 1 process")
    assert _assert_mask(fsdp, start, [k for k in start if start[k].dim() == 2]) == m2["masked_weights"] > 0
    assert m2["mask_exact"] is True
    key = "model.layers.0.self_attn.q_proj.weight"
    assert (fsdp[key] - start[key]).abs().max() > 1e-3
    assert m2["val_mal"] == ma["val_mal"] and m2["val_tokens"] == ma["val_tokens"] > 0


def test_the_docs_give_the_launch_the_tests_run():
    for page in ("docs/finetune.md", "docs/scale.md"):
        assert LAUNCH in (ROOT / page).read_text(), page


@pytest.mark.slow   # ~90 s on 2 loaded cores: derive + distill + 2 finetunes (a drafter, a head); the launch itself is tested above
def test_sd2_run_under_fsdp_as_the_docs_give_it(tmp_path, tiny_target):
    """The documented command, verbatim (from the repository root): ``sd2 run`` under accelerate launch with
    the committed FSDP config. Rank 0 runs the other stages, both processes join finetune under FSDP."""
    import yaml

    from tiny import write_mtbench

    prompts = write_mtbench(tmp_path / "q.jsonl", n=8, turns=1)
    recipe = {"name": "fsdp", "seed": 0, "device": "cpu", "target": {"path": str(tiny_target)},
              "drafter": {"derive": "target", "keep_layers": 2},
              "distill": {"prompts": {"source": str(prompts)}, "max_new_tokens": 8, "batch_size": 8},
              "branches": {"dense": [{"finetune": {"max_steps": 2, "batch_size": 2, "val_rows": 2, "lr": 1e-3,
                                                   "precision": "fp32"}}],
                           # a head after a standalone drafter in the same run: accelerate keeps the layer class it
                           # inferred for the first model on its one plugin (sd2.train.fsdp.fresh_wrap_policy)
                           "head": [{"head": {"type": "fspad"}},
                                    {"finetune": {"max_steps": 2, "batch_size": 2, "val_rows": 2, "lr": 1e-3,
                                                  "precision": "fp32", "loss": "fkl"}}]}}
    path = tmp_path / "fsdp.yaml"
    path.write_text(yaml.safe_dump(recipe))
    cmd = LAUNCH.split()
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *cmd[2:cmd.index("-m")], "--main_process_port",
           str(_free_port()), *cmd[cmd.index("-m"):], str(path), "--out", str(tmp_path / "art")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-4000:]
    for stage in ("dense.finetune", "head.finetune"):
        folder, = (tmp_path / "art" / "fsdp").glob(f"*_{stage}")
        m = json.loads((folder / "manifest.json").read_text())["metrics"]
        assert m["fsdp"] is True and m["world_size"] == 2 and m["steps"] == 2, stage


def test_fsdp1_is_refused_with_the_field_to_change(monkeypatch):
    """sd2 shards and checkpoints by parameter name (FSDP2's DTensors); an FSDP1 launch config is refused
    before anything is wrapped, naming the field. (FSDP1 itself does run on CPU over gloo here.)"""
    from types import SimpleNamespace

    from sd2.core.errors import Sd2Error
    from sd2.train.fsdp import enable_on_cpu

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(Sd2Error, match="fsdp_version: 2"):
        enable_on_cpu(SimpleNamespace(state=SimpleNamespace()))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    enable_on_cpu(SimpleNamespace(state=SimpleNamespace()))   # no FSDP launch: nothing to do
