"""Faults: a real SIGKILL during distill, during finetune and during evaluate, each followed by a rerun;
and a stage that cannot write its output (disk full, read-only).

After every kill the rerun skips the finished stages and resumes the interrupted one; at the end the
weights, the distilled data and the report equal an uninterrupted run's with the same seed, and nothing
is left marked unfinished. "Equal" for the report means every field except those measured with a clock
(wall times, tokens/s, the cost ratios c and v and the speedups and choices derived from them), the
machine description and the run's own folder paths and output ids (which name the run, not its result).
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from sd2.pipeline.cli import app

pytestmark = pytest.mark.filterwarnings("ignore")
HERE = Path(__file__).parent
STAGES = ["00_drafter.derive", "01_distill", "02_dense.finetune", "03_evaluate"]
# report keys measured with a clock or derived from one (wall times, tokens/s, the cost ratios c and v,
# the speedups, `best` which picks by measured speedup), and those naming the run rather than its result
CLOCK = re.compile(r"wall|cost|speedup|efficiency|per_s$|^c_measured$|^machine$|^best$|^fingerprint$|^path$|^lineage$")


def write_recipe(path: Path, target: Path, prompts: Path) -> Path:
    path.write_text(yaml.safe_dump({
        "name": "faults", "seed": 3, "device": "cpu", "target": {"path": str(target)},
        "drafter": {"derive": "target", "keep_layers": 2},
        "distill": {"prompts": {"source": str(prompts)}, "max_new_tokens": 10, "batch_size": 2, "flush_every": 2},
        "branches": {"dense": [{"finetune": {"max_steps": 5, "lr": 1e-3, "batch_size": 2, "val_rows": 1,
                                             "checkpoint_every": 2, "log_every": 1}}]},
        "evaluate": {"prompts": {"source": str(prompts), "limit": 2}, "gamma": 2, "max_new_tokens": 8,
                     "warmup": 0, "repeats": 1}}))
    return path


def killed_at(point: str, recipe: Path, out: Path, tmp: Path) -> None:
    """Run `sd2 run` until it reaches ``point``, then SIGKILL it."""
    marker = tmp / f"paused-{point}"
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(HERE / "fault_run.py"), point, str(marker), str(recipe), str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 300
        while not marker.exists():
            if proc.poll() is not None:
                raise AssertionError(f"sd2 run ended before reaching {point}: {proc.stderr.read()[-3000:]}")
            assert time.time() < deadline, f"sd2 run did not reach {point}"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def finished(run: Path) -> dict[str, float]:
    out = {}
    for name in STAGES:
        m = run / name / "manifest.json"
        if m.is_file():
            out[name] = json.loads(m.read_text())["finished"]
    return out


def report_without_clocks(path: Path, run: Path):
    def strip(node):
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if not CLOCK.search(k)}
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node
    return strip(json.loads(path.read_text()))


def dataset_rows(run: Path) -> list:
    from datasets import load_from_disk

    ds = load_from_disk(str(run / "01_distill" / "dataset"))
    return [ds[i] for i in range(len(ds))]


def _full_recipe(tmp_path, tiny_target):
    """derive -> distill -> one fine-tuned branch, named 'full', on the tiny target: the disk-full tests' run."""
    from tiny import write_mtbench

    prompts = write_mtbench(tmp_path / "q.jsonl", n=4, turns=1)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "full", "seed": 0, "device": "cpu", "target": {"path": str(tiny_target)},
        "drafter": {"derive": "target", "keep_layers": 2},
        "distill": {"prompts": {"source": str(prompts)}, "max_new_tokens": 6, "batch_size": 4},
        "branches": {"dense": [{"finetune": {"max_steps": 2, "batch_size": 2, "val_rows": 1}}]}}))
    return recipe


def test_kill_9_in_each_stage_then_rerun_matches_an_uninterrupted_run(tmp_path, tiny_target, caplog):
    import logging

    from tiny import write_mtbench

    caplog.set_level(logging.INFO, logger="sd2")  # in-process runs log to run.log as `sd2` does

    prompts = write_mtbench(tmp_path / "q.jsonl", n=8, turns=1)
    recipe = write_recipe(tmp_path / "faults.yaml", tiny_target, prompts)
    ref_out, out = tmp_path / "ref", tmp_path / "killed"
    res = CliRunner().invoke(app, ["run", str(recipe), "--out", str(ref_out)])
    assert res.exit_code == 0, res.output
    ref, run = ref_out / "faults", out / "faults"

    # 1. killed in distill, after its first shard (of 4)
    killed_at("distill", recipe, out, tmp_path)
    assert (run / "01_distill" / ".sd2-partial").is_file() and not (run / "01_distill" / "manifest.json").exists()
    assert (run / "01_distill" / "shards" / "shard-00000" / "stats.json").is_file()
    assert (run / ".lock").is_file()  # left by the killed process; the next run finds it stale
    done = finished(run)
    assert list(done) == ["00_drafter.derive"]

    # 2. rerun, killed in finetune after its step-2 checkpoint: derive skipped, distill resumed at shard 1
    killed_at("finetune", recipe, out, tmp_path)
    log = (run / "run.log").read_text()
    assert "skip  00_drafter.derive" in log and "resume 01_distill" in log
    assert "distill: resuming, 1 of 4 shards already written" in log
    assert finished(run)["00_drafter.derive"] == done["00_drafter.derive"]
    state = json.loads((run / "02_dense.finetune" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 2 and not (run / "02_dense.finetune" / "manifest.json").exists()
    done = finished(run)
    assert list(done) == ["00_drafter.derive", "01_distill"]

    # 3. rerun, killed in evaluate with its models loaded: finetune resumed from step 2
    killed_at("evaluate", recipe, out, tmp_path)
    log = (run / "run.log").read_text()
    assert "resume 02_dense.finetune" in log and "resumed from" in log and "at step 2 of 5" in log
    assert {k: v for k, v in finished(run).items() if k in done} == done
    assert (run / "03_evaluate" / ".sd2-partial").is_file() and not (run / "03_evaluate" / "manifest.json").exists()
    done = finished(run)

    # 4. rerun to the end: evaluate, unfinished, runs again in its folder; the rest is skipped
    res = CliRunner().invoke(app, ["run", str(recipe), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "resume 03_evaluate" in (run / "run.log").read_text()
    assert {k: v for k, v in finished(run).items() if k in done} == done

    # nothing is left unfinished: no partial marker, lock, checkpoint or temporary shard
    assert list(finished(run)) == STAGES
    leftovers = [p for p in run.rglob("*") if p.name in (".sd2-partial", ".lock", "checkpoint")
                 or p.name.startswith((".checkpoint", ".shard-", ".dataset", ".manifest"))]
    assert leftovers == []

    # the same result as the uninterrupted run
    for stage in ("00_drafter.derive", "02_dense.finetune"):
        a, b = load_file(str(ref / stage / "model.safetensors")), load_file(str(run / stage / "model.safetensors"))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{stage}: {key} differs from the uninterrupted run"
    assert dataset_rows(run) == dataset_rows(ref)
    assert report_without_clocks(run / "03_evaluate" / "report.json", run) == \
        report_without_clocks(ref / "03_evaluate" / "report.json", ref)


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EROFS])
def test_a_stage_that_cannot_write_fails_cleanly_and_resumes(tmp_path, tiny_target, monkeypatch, err):
    """The disk fills (or turns read-only) while finetune saves its model: an Sd2Error naming the stage and
    the cause, no manifest for it, the earlier stages intact; once space returns, the same command resumes."""
    import transformers.modeling_utils as mu

    from sd2.core.models import ModelRef  # noqa: F401  (imports the stack before patching)

    recipe = _full_recipe(tmp_path, tiny_target)
    out = tmp_path / "art"
    res = CliRunner().invoke(app, ["run", str(recipe), "--out", str(out), "--until", "distill"])
    assert res.exit_code == 0, res.output
    run = out / "full"
    before = finished(run)

    real = mu.safe_save_file

    def no_space(tensors, filename, *a, **k):  # what safetensors raises when the disk is full (see the tmpfs test)
        from safetensors import SafetensorError

        raise SafetensorError(f"Error while serializing: I/O error: {os.strerror(err)} (os error {err})")
    monkeypatch.setattr(mu, "safe_save_file", no_space)
    res = CliRunner().invoke(app, ["run", str(recipe), "--out", str(out)])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert f"stage dense.finetune could not write {run / '02_dense.finetune'}" in res.output
    assert os.strerror(err) in res.output and "dense.finetune resumes" in res.output
    assert not (run / "02_dense.finetune" / "manifest.json").exists()
    assert (run / "02_dense.finetune" / ".sd2-partial").is_file() and not (run / ".lock").exists()
    assert finished(run) == before

    monkeypatch.setattr(mu, "safe_save_file", real)  # space is back
    res = CliRunner().invoke(app, ["run", str(recipe), "--out", str(out)])
    assert res.exit_code == 0, res.output
    after = finished(run)
    assert {k: after[k] for k in before} == before and "02_dense.finetune" in after
    assert not list(run.rglob(".sd2-partial"))


def test_write_failure_is_found_through_wrapping_exceptions():
    from sd2.core.artifacts import write_failure

    inner = OSError(errno.ENOSPC, "No space left on device")
    try:
        try:
            raise inner
        except OSError as e:
            raise RuntimeError("datasets could not save the shard") from e
    except RuntimeError as outer:
        assert write_failure(outer) is inner
    assert write_failure(ValueError("no")) is None
    assert write_failure(FileNotFoundError(errno.ENOENT, "missing")) is None  # a bug, not a full disk


def test_a_manifest_write_that_fails_leaves_the_old_one_whole(tmp_path, monkeypatch):
    """The manifest is written to a temporary name, fsynced and renamed: a failure at any point leaves the
    previous manifest byte for byte and no temporary file."""
    from sd2.core import artifacts as art

    path = tmp_path / "manifest.json"
    art.write_json_atomic(path, {"fingerprint": "old"})
    before = path.read_bytes()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    for target in ("replace", "fsync"):
        with monkeypatch.context() as m:
            m.setattr(art.os, target, full)
            with pytest.raises(OSError):
                art.write_json_atomic(path, {"fingerprint": "new", "big": list(range(1000))})
        assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_a_real_full_disk(tmp_path, tiny_target):
    """A real tmpfs, sized to hold derive and distill but not the fine-tuned model: the stage ends in an
    Sd2Error (safetensors' own error type carries the errno in its text), and after the tmpfs grows the
    same command resumes. Needs root and mount (skipped elsewhere; the patched test above runs everywhere)."""
    import shutil


    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount") or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True).returncode != 0:
        pytest.skip("needs root and mount to make a small tmpfs")
    try:
        recipe = _full_recipe(tmp_path, tiny_target)
        res = CliRunner().invoke(app, ["run", str(recipe), "--out", str(mnt), "--until", "distill"])
        assert res.exit_code == 0, res.output
        run = mnt / "full"
        used = shutil.disk_usage(mnt).used
        model = (run / "00_drafter.derive" / "model.safetensors").stat().st_size
        size_kb = (used + model // 3) // 1024 + 1  # room for the stage folder, not for its model
        subprocess.run(["mount", "-o", f"remount,size={size_kb}k", str(mnt)], check=True)
        res = CliRunner().invoke(app, ["run", str(recipe), "--out", str(mnt)])
        assert res.exit_code == 1 and "Traceback" not in res.output, res.output
        assert "stage dense.finetune could not write" in res.output and "No space left on device" in res.output
        assert not (run / "02_dense.finetune" / "manifest.json").exists()
        subprocess.run(["mount", "-o", "remount,size=64m", str(mnt)], check=True)  # space is back
        before = finished(run)
        res = CliRunner().invoke(app, ["run", str(recipe), "--out", str(mnt)])
        assert res.exit_code == 0, res.output
        after = finished(run)
        assert {k: after[k] for k in before} == before and "02_dense.finetune" in after
    finally:
        # lazy: datasets keeps the distilled arrow files memory-mapped in this process, so a plain umount is busy
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
