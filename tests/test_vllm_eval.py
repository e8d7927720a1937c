"""sd2 eval --engine vllm (evaluate.engine: vllm; marker vllm, skipped without vLLM): vLLM serves the
tiny target alone and with a standalone drafter (draft_model), an EAGLE-1 head (exported on the fly
to vLLM's layout) and vLLM's own ngram; the report is an ordinary report.json that sd2 compare reads."""

from __future__ import annotations

import pytest

from sd2.core.errors import Sd2Error
from sd2.core.report import Report
from tiny import write_mtbench
from vllm_tiny import VLLM_ENV

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def report(vllm_pair, tmp_path_factory):
    from sd2.pipeline.commands import eval_command

    mp = pytest.MonkeyPatch()
    for k, v in VLLM_ENV.items():
        mp.setenv(k, v)
    tmp = tmp_path_factory.mktemp("vllm_eval")
    prompts = write_mtbench(tmp / "q.jsonl", n=4, turns=1)
    try:
        eval_command(str(vllm_pair["target"]), [f"first_layer={vllm_pair['drafter']}", f"eagle={vllm_pair['eagle']}",
                     "pld=prompt_lookup"], str(prompts), 4, 0, tmp / "out", gamma=["3"], max_new_tokens=20,
                     engine="vllm")
    finally:
        mp.undo()
    return Report.read(tmp / "out"), tmp / "out"


def test_eval_engine_vllm_reports_every_drafter_lossless_with_sd2s_mal_beside(report):
    rep, out = report
    assert rep.settings.engine == "vllm" and rep.settings.machine["vllm"]
    assert {r.drafter for r in rep.results} == {"first_layer", "eagle", "pld"}
    # the target alone is served first and last (one timed pass each): its wall is the median of both
    base = rep.baseline["0.0"]
    assert len(base.walls) == 2 and base.wall_s == pytest.approx(sum(base.walls) / 2, abs=2e-4)
    assert all(r.target_wall_s == base.wall_s for r in rep.results)
    assert rep.drafters["eagle"].settings["vllm"]["method"] == "eagle"
    assert rep.drafters["first_layer"].settings["vllm"]["method"] == "draft_model"
    assert rep.drafters["pld"].settings["vllm"]["method"] == "ngram"
    assert (out / "vllm_exports" / "eagle" / "model.safetensors").is_file()
    for r in rep.results:
        assert r.lossless is True and not r.lossless_mismatches, r
        assert r.gamma == 3 and r.speedup is not None and r.wall_s > 0 and 1.0 <= r.mal <= 4.0
        assert r.tokens == 4 * 20 or r.tokens < 4 * 20       # at most max_new_tokens per prompt
        if r.drafter != "pld":     # draft_model and eagle draft a full γ at every step; ngram when it finds a match
            assert r.drafted == 3 * r.target_forwards
        else:
            assert r.drafted <= 3 * r.target_forwards and r.sd2_mal is None
    for name in ("first_layer", "eagle"):
        r = rep.rows(name)[0]
        assert r.acceptance_rate > 0.25, r          # a trained drafter, served right
        # sd2's engine on the same rounds; both stop at the target's EOS (tolerance: see test_vllm_serve.py)
        assert abs(r.mal - r.sd2_mal) <= 0.03 * r.sd2_mal, (r.mal, r.sd2_mal)
    assert "report.md" in {p.name for p in out.iterdir()}


def test_compare_gates_a_vllm_report_like_any_other(report):
    from sd2.pipeline.commands import compare_command

    code, text = compare_command(report[1], report[1], 0.05)
    assert code == 0 and "eagle" in text


def test_engine_vllm_refuses_what_vllm_cannot_run(vllm_pair, tmp_path, tokenizer):
    """Before vLLM starts: a head vLLM cannot load, and settings only sd2's engine has."""
    from transformers import AutoModelForCausalLM

    from sd2.heads import io
    from sd2.pipeline.commands import eval_command

    target = AutoModelForCausalLM.from_pretrained(vllm_pair["target"])
    io.save(io.build("fspad", target), tmp_path / "fspad", tokenizer)
    prompts = write_mtbench(tmp_path / "q.jsonl", n=1, turns=1)
    with pytest.raises(Sd2Error, match=r"drafter 'fspad' .* has an FSPAD head: nothing in vLLM runs it.*engine: sd2"):
        eval_command(str(vllm_pair["target"]), [f"fspad={tmp_path / 'fspad'}"], str(prompts), 1, 0, tmp_path / "out",
                     gamma=["2"], max_new_tokens=8, engine="vllm")
    with pytest.raises(Sd2Error, match=r"^--engine vllm needs a fixed gamma, not auto"):
        eval_command(str(vllm_pair["target"]), ["prompt_lookup"], str(prompts), 1, 0, tmp_path / "out2",
                     gamma=["auto"], max_new_tokens=8, engine="vllm")


def test_engine_vllm_at_temperature_above_0_is_refused_where_the_fix_cannot_apply(vllm_pair, tmp_path, monkeypatch):
    """vLLM #55005: with the model in another process (VLLM_ENABLE_V1_MULTIPROCESSING=1) sd2's fix cannot
    apply, and the worker refuses every speculative run at T > 0 before it starts any model."""
    from sd2.pipeline.commands import eval_command

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    prompts = write_mtbench(tmp_path / "q.jsonl", n=1, turns=1)
    with pytest.raises(Sd2Error, match=r"the vLLM worker failed .*temperature 1.0 on vLLM's CPU backend .*#55005"):
        eval_command(str(vllm_pair["target"]), ["pld=prompt_lookup"], str(prompts), 1, 0, tmp_path / "out",
                     gamma=["2"], temperature=[0.0, 1.0], max_new_tokens=8, engine="vllm")
