"""`sd2 compare NEW BASELINE --max-mal-drop`: the CI gate's table and exit codes (0 ok, 1 regression, 2 unusable)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from sd2.pipeline.cli import app


def _report(mal: float, lossless=True, drafters=("dense",)) -> dict:
    return {"sd2_version": "0.1.0", "results": [
        {"drafter": d, "gamma": 4, "temperature": 0.0, "mal": mal, "wall_s": 1.0, "target_wall_s": 1.3,
         "lossless": lossless}
        for d in drafters]}


def _write(path, data):
    path.write_text(json.dumps(data))
    return path


def _cmp(tmp_path, new, base, *extra):
    n = _write(tmp_path / "new.json", new) if isinstance(new, dict) else new
    b = _write(tmp_path / "base.json", base) if isinstance(base, dict) else base
    return CliRunner().invoke(app, ["compare", str(n), str(b), *extra])


def test_no_regression_exits_0(tmp_path):
    res = _cmp(tmp_path, _report(1.97), _report(2.0), "--max-mal-drop", "0.05")
    assert res.exit_code == 0, res.output
    assert "dense" in res.output and "ok" in res.output
    assert "1.30" in res.output          # the speedup, computed from the walls by the report classes


def test_mal_drop_beyond_threshold_exits_1(tmp_path):
    res = _cmp(tmp_path, _report(1.8), _report(2.0), "--max-mal-drop", "0.05")
    assert res.exit_code == 1
    assert "REGRESSION" in res.output and "-10.0%" in res.output
    # the same drop passes a looser gate
    assert _cmp(tmp_path, _report(1.8), _report(2.0), "--max-mal-drop", "0.2").exit_code == 0


def test_lost_losslessness_or_missing_drafter_exits_1(tmp_path):
    res = _cmp(tmp_path, _report(2.0, lossless=False), _report(2.0))
    assert res.exit_code == 1 and "no longer lossless" in res.output
    # a MAL-only report (decode: false) checks no losslessness: not a pass against a checked baseline...
    res = _cmp(tmp_path, _report(2.0, lossless=None), _report(2.0))
    assert res.exit_code == 1 and "not checked in NEW (a MAL-only report" in res.output
    # ... but two MAL-only reports gate on MAL alone
    res = _cmp(tmp_path, _report(2.0, lossless=None), _report(2.0, lossless=None))
    assert res.exit_code == 0 and "losslessness not checked where NEW is MAL only" in res.output
    assert "not checked" in res.output.splitlines()[2] and "None" not in res.output   # the table row, not a raw None
    assert "still lossless" in _cmp(tmp_path, _report(2.0), _report(2.0)).output
    res = _cmp(tmp_path, _report(2.0), _report(2.0, drafters=("dense", "sparse")))
    assert res.exit_code == 1 and "missing in NEW" in res.output


def test_run_folder_is_accepted(tmp_path):
    """A run folder stands for its finished evaluate step's report (sd2.core.report.find_report, the
    one lookup `sd2 compare` and `sd2 publish` share): an unfinished one (no manifest) is not read."""
    ev = tmp_path / "run" / "05_evaluate"
    ev.mkdir(parents=True)
    _write(ev / "report.json", _report(2.0))
    assert _cmp(tmp_path, tmp_path / "run", _report(2.0)).exit_code == 2
    (ev / "manifest.json").write_text(json.dumps({"id": "evaluate", "output_id": "x"}))
    assert _cmp(tmp_path, tmp_path / "run", _report(2.0)).exit_code == 0


def test_unusable_input_exits_2(tmp_path):
    assert _cmp(tmp_path, tmp_path / "nope.json", _report(2.0)).exit_code == 2
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert _cmp(tmp_path, bad, _report(2.0)).exit_code == 2
    assert _cmp(tmp_path, {"foo": 1}, _report(2.0)).exit_code == 2
    assert _cmp(tmp_path, _report(2.0), _report(2.0), "--max-mal-drop", "1.5").exit_code == 2
