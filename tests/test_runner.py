"""The runner's contract: manifests written last, skip on matching fingerprints, exact downstream
invalidation, --force, --until, resume of unfinished work, and the run lock."""

import json
import os
import subprocess
import sys
import time

import pytest
import yaml

import recording_stages
from sd2.core import artifacts as art
from sd2.core.errors import Sd2Error
from sd2.pipeline.registry import STAGES, StageSpec
from sd2.pipeline.runner import Runner
from sd2.pipeline.schema import validate_recipe


@pytest.fixture
def fake_stages(monkeypatch):
    """Swap the heavy stages for recording stand-ins; derive stays real (on a tiny model)."""
    for name in ("distill", "prune", "finetune", "evaluate"):
        real = STAGES[name]
        monkeypatch.setitem(STAGES, name, StageSpec(name, "recording_stages", real.summary, real.consumes,
                                                     real.produces, real.in_branch))
    recording_stages.CALLS.clear()
    return recording_stages.CALLS


def recipe(target, **changes):
    data = {"name": "r", "seed": 0, "target": {"path": str(target)},
            "drafter": {"derive": "target", "keep_layers": 2},
            "distill": {"value": 1},
            "branches": {"dense": [{"finetune": {"value": 2}}],
                         "sparse": [{"prune": {"value": 3}}, {"finetune": {"value": 4}}]},
            "evaluate": {"value": 5}}
    for path, value in changes.items():
        node = data
        *parents, last = path.split("__")
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        node[last] = value
    return validate_recipe(data)


def test_run_writes_tree_and_manifests(tmp_path, tiny_target, fake_stages):
    r = Runner(recipe(tiny_target), tmp_path)
    results = r.run()
    run_dir = tmp_path / "r"
    names = sorted(p.name for p in run_dir.iterdir())
    assert names == sorted(
        ["00_drafter.derive", "01_distill", "02_dense.finetune", "03_sparse.prune", "04_sparse.finetune",
         "05_evaluate", "metrics.jsonl", "recipe.yaml", "run.log"])
    assert [x["status"] for x in results] == ["ran"] * 6
    m = json.loads((run_dir / "03_sparse.prune" / "manifest.json").read_text())
    for key in ("fingerprint", "output_id", "seconds", "versions", "seed", "git_sha", "config", "peak_rss_mb", "lineage"):
        assert key in m
    assert m["versions"]["torch"] and m["config"] == {"value": 3, "fail": False}
    assert [x["id"] for x in m["lineage"]] == ["drafter.derive", "sparse.prune"]
    # branch steps chain: sparse.finetune reads sparse.prune's model and the distill dataset
    rec = json.loads((run_dir / "04_sparse.finetune" / "record.json").read_text())
    assert rec["model"].endswith("03_sparse.prune") and rec["dataset"].endswith("01_distill")
    ev = json.loads((run_dir / "05_evaluate" / "record.json").read_text())
    assert set(ev["drafters"]) == {"raw", "dense", "sparse"}
    assert ev["drafters"]["raw"].endswith("00_drafter.derive") and ev["drafters"]["sparse"].endswith("04_sparse.finetune")
    assert not (run_dir / ".lock").exists() and not list(run_dir.glob("*/.sd2-partial"))
    assert yaml.safe_load((run_dir / "recipe.yaml").read_text())["branches"]["sparse"][0] == {"prune": {"value": 3, "fail": False}}
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {row["stage"] for row in rows} == {"distill", "dense.finetune", "sparse.prune", "sparse.finetune", "evaluate"}


def test_rerun_skips_everything_fast(tmp_path, tiny_target, fake_stages):
    Runner(recipe(tiny_target), tmp_path).run()
    fake_stages.clear()
    t = time.time()
    results = Runner(recipe(tiny_target), tmp_path).run()
    assert time.time() - t < 10
    assert [x["status"] for x in results] == ["skipped"] * 6 and fake_stages == []


def test_changed_branch_reruns_only_it_and_evaluate(tmp_path, tiny_target, fake_stages):
    Runner(recipe(tiny_target), tmp_path).run()
    fake_stages.clear()
    Runner(recipe(tiny_target, branches__sparse__0__prune={"value": 30}), tmp_path).run()
    assert fake_stages == ["sparse.prune", "sparse.finetune", "evaluate"]
    fake_stages.clear()
    Runner(recipe(tiny_target, distill__value=10), tmp_path).run()  # upstream of every branch
    assert fake_stages == ["distill", "dense.finetune", "sparse.prune", "sparse.finetune", "evaluate"]
    fake_stages.clear()
    Runner(recipe(tiny_target, seed=7), tmp_path).run()  # the seed enters every fingerprint
    assert fake_stages == ["distill", "dense.finetune", "sparse.prune", "sparse.finetune", "evaluate"]


def test_force_and_until(tmp_path, tiny_target, fake_stages):
    Runner(recipe(tiny_target), tmp_path, until="distill").run()
    assert fake_stages == ["distill"]
    assert not (tmp_path / "r" / "02_dense.finetune").exists()
    fake_stages.clear()
    Runner(recipe(tiny_target), tmp_path).run()
    assert fake_stages == ["dense.finetune", "sparse.prune", "sparse.finetune", "evaluate"]
    fake_stages.clear()
    Runner(recipe(tiny_target), tmp_path, force=["dense.finetune"]).run()
    assert fake_stages == ["dense.finetune", "evaluate"]  # a rerun stage hands downstream a new output id
    fake_stages.clear()
    Runner(recipe(tiny_target), tmp_path, force=["finetune"]).run()  # a stage name forces each instance
    assert fake_stages == ["dense.finetune", "sparse.finetune", "evaluate"]
    with pytest.raises(Sd2Error, match="did you mean 'sparse.prune'"):
        Runner(recipe(tiny_target), tmp_path, force=["sparse.prun"])
    # --until a stage name several steps share is refused, naming them; a step id picks one
    with pytest.raises(Sd2Error, match=r"--until 'finetune' names 2 steps \(dense.finetune, sparse.finetune\); "
                                       r"give the step id .* e.g. --until dense.finetune"):
        Runner(recipe(tiny_target), tmp_path, until="finetune")
    assert Runner(recipe(tiny_target), tmp_path, until="sparse.prune").last == 3


def test_adding_a_branch_renumbers_without_rerunning(tmp_path, tiny_target, fake_stages):
    Runner(recipe(tiny_target), tmp_path).run()
    fake_stages.clear()
    r = recipe(tiny_target)
    data = r.raw
    data["branches"] = {"early": [{"finetune": {"value": 9}}], **data["branches"]}
    Runner(validate_recipe(data), tmp_path).run()
    assert fake_stages == ["early.finetune", "evaluate"]
    assert (tmp_path / "r" / "04_sparse.prune" / "manifest.json").is_file()


def test_failed_stage_leaves_no_manifest_and_resumes(tmp_path, tiny_target, fake_stages):
    with pytest.raises(RuntimeError, match="simulated crash"):
        Runner(recipe(tiny_target, branches__dense__0__finetune={"value": 2, "fail": True}), tmp_path).run()
    folder = tmp_path / "r" / "02_dense.finetune"
    assert not (folder / "manifest.json").exists() and (folder / ".sd2-partial").exists()
    assert not (tmp_path / "r" / ".lock").exists()
    # Same fingerprint: the folder (its checkpoints) is kept for the stage to resume from.
    fake_stages.clear()
    with pytest.raises(RuntimeError):
        Runner(recipe(tiny_target, branches__dense__0__finetune={"value": 2, "fail": True}), tmp_path).run()
    assert fake_stages == ["dense.finetune"]
    # A changed config starts the stage afresh (the folder is cleared first).
    (folder / "leftover").write_text("old")
    Runner(recipe(tiny_target), tmp_path).run()
    assert not (folder / "leftover").exists() and (folder / "manifest.json").exists()


def test_manifest_is_written_atomically(tmp_path):
    art.write_json_atomic(tmp_path / "manifest.json", {"a": 1})
    assert json.loads((tmp_path / "manifest.json").read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_lock_refuses_a_live_run_and_clears_a_stale_one(tmp_path, tiny_target, fake_stages):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (run_dir / ".lock").write_text(json.dumps({"pid": live.pid, "host": os.uname().nodename, "started": time.time()}))
        with pytest.raises(Sd2Error, match=f"in use by another sd2 run \\(pid {live.pid}"):
            Runner(recipe(tiny_target), tmp_path).run()
        assert fake_stages == []
    finally:
        live.kill()
        live.wait()
    # The process is gone: its lock is stale and the run proceeds.
    Runner(recipe(tiny_target), tmp_path).run()
    assert "distill" in fake_stages and not (run_dir / ".lock").exists()


def test_killed_run_leaves_a_stale_lock_that_is_recognised(tmp_path):
    """A run killed with -9 leaves its lock behind; the next run recognises it as stale and takes it over."""
    # Hold the lock from a child that we kill -9, exactly as a crashed run would leave it.
    code = ("import sys,time; from pathlib import Path; from sd2.core.artifacts import RunLock;"
            f"l=RunLock(Path({str(tmp_path / 'r')!r})); l.__enter__(); print('locked', flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "locked"
    child.kill()
    child.wait()
    assert (tmp_path / "r" / ".lock").exists()
    with art.RunLock(tmp_path / "r"):
        held = json.loads((tmp_path / "r" / ".lock").read_text())
        assert held["pid"] == os.getpid()


def test_cli_prints_only_a_report_this_invocation_reached(tmp_path, tiny_target, fake_stages):
    from typer.testing import CliRunner

    from sd2.pipeline.cli import app

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe(tiny_target).resolved()))
    out = tmp_path / "out"
    assert CliRunner().invoke(app, ["run", str(path), "--out", str(out)]).exit_code == 0
    (out / "r" / "05_evaluate" / "report.md").write_text("# THE EARLIER REPORT\n")
    res = CliRunner().invoke(app, ["run", str(path), "--out", str(out), "--until", "distill"])
    assert res.exit_code == 0, res.output
    assert "THE EARLIER REPORT" not in res.output
    res = CliRunner().invoke(app, ["run", str(path), "--out", str(out)])  # reaches evaluate (done: skipped)
    assert res.exit_code == 0 and "THE EARLIER REPORT" in res.output


def test_a_recipe_without_a_drafter_runs_without_one_and_keeps_the_heads_fingerprints(tmp_path, tiny_target,
                                                                                      fake_stages, monkeypatch):
    """Every branch builds its own head, so `drafter:` is left out: no drafter step or source, the
    tokenizer check loads no drafter, the run folder's recipe.yaml leaves it out and validates again,
    and every stage but evaluate (which no longer times raw) has the fingerprint it has beside a derived
    drafter: dropping an unused `drafter:` reruns none of them."""
    from sd2.pipeline.runner import Produced

    # the stand-in distill reads the target only, as the real one does unless on-policy (distill.consumes)
    monkeypatch.setitem(STAGES, "distill", StageSpec("distill", "recording_stages", "", ("target",), "dataset"))
    data = {"name": "r", "seed": 0, "target": {"path": str(tiny_target)}, "distill": {"value": 1},
            "branches": {"h": [{"head": {"type": "fspad"}}, {"finetune": {"value": 2}}],
                         "hs": [{"from": "h"}, {"prune": {"value": 3}}]},
            "evaluate": {"value": 5}}
    bare = Runner(validate_recipe(data), tmp_path / "bare")
    derived = Runner(validate_recipe(data | {"drafter": {"derive": "target", "keep_layers": 2}}), tmp_path / "derived")
    assert [s.id for s in bare.steps] == ["distill", "h.head", "h.finetune", "hs.prune", "evaluate"]
    assert [s.id for s in derived.steps] == ["drafter.derive"] + [s.id for s in bare.steps]
    assert bare.steps[-1].sources["drafters"] == {"h": "h.finetune", "hs": "hs.prune"}
    assert "raw" in derived.steps[-1].sources["drafters"]

    def no_drafter(role, load):
        assert role != "drafter", "a recipe without a drafter loaded one"
        return real_source(role, load)

    real_source = bare._source
    monkeypatch.setattr(bare, "_source", no_drafter)
    assert bare._check_tokenizers() is False
    for r in (bare, derived):
        r.produced = {s.id: Produced(tmp_path, f"out-{s.id}", []) for s in r.steps}
    fps = [{s.id: r._fingerprint(s)[3] for s in r.steps if s.stage != "evaluate"} for r in (bare, derived)]
    assert fps[0] == {k: v for k, v in fps[1].items() if k != "drafter.derive"}

    results = Runner(validate_recipe(data), tmp_path, until="distill").run()
    assert [x["id"] for x in results] == ["distill"] and fake_stages == ["distill"]
    assert json.loads((tmp_path / "r" / "00_distill" / "record.json").read_text())["model"] is None
    written = yaml.safe_load((tmp_path / "r" / "recipe.yaml").read_text())
    assert "drafter" not in written
    assert [s.id for s in Runner(validate_recipe(written), tmp_path).steps] == [s.id for s in bare.steps]
