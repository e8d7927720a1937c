"""The cost-aware draft shape (sd2.engine.shape) by hand, and `gamma: auto` through `sd2 eval`."""

from __future__ import annotations

import json

import pytest

from sd2.engine.shape import choose, predict
from sd2.mal import Round


def test_modeled_speedup_by_hand():
    rounds = [Round(3, 3, 4), Round(3, 1, 2), Round(3, 0, 1), Round(3, 2, 3)]   # pilot at depth 3
    v = {1: 1.0, 2: 1.1, 3: 1.2, 4: 1.3, 7: 1.5}
    # gamma 1: (1 + 3/4) / (0.1 + v(2)); gamma 2: (1 + 5/4) / (0.2 + v(3)); gamma 3: (1 + 6/4) / (0.3 + v(4))
    assert predict(rounds, 1, 1, v, 0.1) == pytest.approx(1.75 / 1.2)
    assert predict(rounds, 2, 1, v, 0.1) == pytest.approx(2.25 / 1.4)
    assert predict(rounds, 3, 1, v, 0.1) == pytest.approx(2.5 / 1.6)
    shape = choose({1: rounds}, 3, v, 0.1)
    assert (shape.gamma, shape.width) == (2, 1) and shape.predicted_speedup == pytest.approx(2.25 / 1.4, abs=1e-6)
    assert len(shape.table) == 3
    # a costlier drafter prefers a shorter chain; a free one (c = 0) the deepest worth verifying
    assert choose({1: rounds}, 3, v, 0.6).gamma == 1
    # width 2 at gamma 3 verifies 7 nodes: with its own (better) pilot rounds it can win
    tree = [Round(6, 3, 4, 3), Round(6, 3, 4, 3), Round(6, 2, 3, 3), Round(6, 3, 4, 3)]
    shape = choose({1: rounds, 2: tree}, 3, v, 0.1)
    assert (shape.gamma, shape.width) == (3, 2)
    assert shape.predicted_speedup == pytest.approx((1 + 11 / 4) / (0.3 + 1.5), abs=1e-6)
    # no model: drafting cost per round d, and each round's own draft size (shorter drafts verify fewer nodes)
    lookup = [Round(2, 2, 3, 2), Round(0, 0, 1, 0)]
    assert predict(lookup, 3, 1, v, None, d=0.05) == pytest.approx((1 + 1.0) / (0.05 + (1.2 + 1.0) / 2))


def test_gamma_auto_through_sd2_eval(tmp_path, tiny_target, mtbench_file):
    from typer.testing import CliRunner

    from sd2.pipeline.cli import app

    out = tmp_path / "auto"
    res = CliRunner().invoke(app, ["eval", "--target", str(tiny_target), "--drafter", f"self={tiny_target}",
                                   "--drafter", "pl=prompt_lookup", "--prompts", str(mtbench_file), "--limit", "2",
                                   "--gamma", "auto", "--width", "1", "--width", "2", "--max-new-tokens", "10",
                                   "--out", str(out), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "report.json").read_text())
    assert rep["settings"]["gamma_auto"] is True and rep["settings"]["max_gamma"] == 8
    for name in ("self", "pl"):
        shape = rep["drafters"][name]["shape"]
        rows = [r for r in rep["results"] if r["drafter"] == name]
        assert [(r["gamma"], r["width"]) for r in rows] == [(shape["gamma"], shape["width"])]
        assert len(shape["table"]) == 8 * 2
        assert shape["predicted_speedup"] == max(t["predicted_speedup"] for t in shape["table"])
        assert rows[0]["predicted_speedup"] == shape["predicted_speedup"] and rows[0]["lossless"] is True
    assert rep["drafters"]["pl"]["kind"] == "prompt_lookup" and rep["drafters"]["pl"]["path"] == ""
    assert rep["best"]["drafter"] == "self"          # prompt lookup is shown, never recommended
    md = (out / "report.md").read_text()
    assert "`gamma: auto`" in md and "- self: γ=" in md and "measured" in md
    bad = CliRunner().invoke(app, ["eval", "--target", str(tiny_target), "--drafter", str(tiny_target),
                                   "--gamma", "auto", "--gamma", "2", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 1 and "give it alone" in bad.output
    bad = CliRunner().invoke(app, ["eval", "--target", str(tiny_target), "--drafter", str(tiny_target),
                                   "--gamma", "four", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 1 and "--gamma must be an integer or 'auto'" in bad.output
