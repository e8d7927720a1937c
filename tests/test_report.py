"""The typed evaluation report (sd2.core.report): one definition of "best", derived figures computed
from stored measurements, reading old or foreign files, and the documented schema matching the classes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from sd2.core.errors import Sd2Error
from sd2.core.report import Report, Result, pick_best


def row(drafter, mal, wall_s=None, mac_ratio=0.5, gamma=4, temperature=0.0, lossless=True, **kw) -> Result:
    return Result(drafter=drafter, gamma=gamma, temperature=temperature, mal=mal, wall_s=wall_s,
                  target_wall_s=10.0 if wall_s else None, c_measured=0.25, verify_cost=1.5, mac_ratio=mac_ratio,
                  lossless=lossless if temperature == 0 else None, **kw)


def test_best_is_the_measured_speedup_not_mal_per_mac():
    # a tiny drafter at MAL 1.0: the best MAL per MAC by far, and it makes decoding slower
    tiny = row("tiny", 1.0, wall_s=12.0, mac_ratio=0.01, macs_per_token=1_000)
    good = row("good", 2.5, wall_s=7.0, mac_ratio=0.3, macs_per_token=300_000)
    b = pick_best([tiny, good])
    assert (b.drafter, b.by, b.gamma, b.temperature) == ("good", "speedup", 4, 0.0)
    assert b.value == pytest.approx(10.0 / 7.0, rel=1e-5)
    assert max([tiny, good], key=lambda r: r.mal / r.macs_per_token).drafter == "tiny"   # what MAL per MAC picked


def test_best_rules_raw_lossless_temperature_and_fallback():
    raw = row("raw", 2.0, wall_s=5.0)
    branch = row("sparse", 2.2, wall_s=6.0)
    assert pick_best([raw, branch]).drafter == "raw"                     # raw competes like any drafter
    lossy = row("broken", 3.0, wall_s=2.0, lossless=False)
    assert pick_best([raw, lossy]).drafter == "raw"                      # never recommend a lossy result
    hot = row("hot", 3.0, wall_s=1.0, temperature=1.0)
    assert pick_best([branch, hot]).drafter == "sparse"                  # the lowest temperature evaluated
    # without timings (a report written by hand or a CI summary) the MAC-based speedup decides
    a, b = row("a", 2.0, mac_ratio=0.5), row("b", 1.8, mac_ratio=0.2)
    best = pick_best([a, b])
    assert (best.drafter, best.by) == ("b", "mac_speedup") and best.value == pytest.approx(1.8 / 1.8)
    # ties go to MAL, then the name
    assert pick_best([row("x", 2.0, wall_s=5.0), row("y", 2.1, wall_s=5.0)]).drafter == "y"
    assert pick_best([]) is None and pick_best([lossy]) is None


def test_derived_figures_come_from_measurements_not_from_stored_copies():
    r = row("d", 2.4, wall_s=8.0, mac_ratio=0.2)
    assert r.speedup == pytest.approx(10.0 / 8.0)
    assert r.theoretical_speedup == pytest.approx(2.4 / (4 * 0.25 + 1))
    assert r.modeled_speedup == pytest.approx(2.4 / (4 * 0.25 + 1.5))
    assert r.mac_speedup == pytest.approx(2.4 / (4 * 0.2 + 1))
    assert r.efficiency == pytest.approx(r.speedup / r.theoretical_speedup, rel=1e-5)
    stored = r.model_dump(mode="json")
    assert stored["speedup"] == r.speedup                                 # written for readers of the JSON
    stored.update(speedup=99.0, theoretical_speedup=99.0, mac_speedup=99.0, efficiency=99.0)
    again = Result.model_validate(stored)                                 # ... but recomputed on reading
    assert again.speedup == r.speedup and again.mac_speedup == r.mac_speedup and again.efficiency == r.efficiency
    assert row("n", 2.0).speedup is None and row("n", 2.0).efficiency is None


def test_an_older_report_reads_and_gets_its_rows_mac_ratio_from_the_drafter(tmp_path):
    data = {"results": [{"drafter": "d", "gamma": 2, "temperature": 0.0, "mal": 1.5, "lossless": True,
                         "mac_speedup": 7.0}],
            "drafters": {"d": {"path": "x", "mac_ratio": 0.25}}, "best": {"drafter": "zzz", "by": "mal_per_mac"}}
    p = tmp_path / "report.json"
    p.write_text(json.dumps(data))
    rep = Report.read(p)
    assert rep.results[0].mac_ratio == 0.25 and rep.results[0].mac_speedup == pytest.approx(1.5 / 1.5)
    assert rep.best.drafter == "d" and rep.best.by == "mac_speedup"       # the stored 'best' is not trusted


def test_unusable_files_are_clear_errors(tmp_path):
    with pytest.raises(Sd2Error, match="no report.json at"):
        Report.read(tmp_path)
    (tmp_path / "report.json").write_text(json.dumps({"results": [{"drafter": "d", "gamma": "four"}]}))
    with pytest.raises(Sd2Error, match=r"report.json: results.0.gamma: .*rerun the evaluate stage"):
        Report.read(tmp_path)
    (tmp_path / "report.json").write_text(json.dumps({"foo": 1}))
    with pytest.raises(Sd2Error, match="not an sd2 report"):
        Report.read(tmp_path / "report.json")


def test_the_documented_schema_lists_exactly_the_classes_fields():
    """docs/evaluate.md's report.json example is the schema users read: it must name every field of
    a result row (stored and computed) and no other."""
    doc = (Path(__file__).resolve().parent.parent / "docs" / "evaluate.md").read_text()
    block = re.search(r"## report.json\n\n```json\n(.*?)```", doc, re.S).group(1)
    example = json.loads(block)
    rep = Report.model_validate(example)
    documented_row = set(example["results"][0])
    assert documented_row == set(Result.model_fields) | set(Result.model_computed_fields)
    assert set(example) == set(Report.model_fields) | {"best"}
    assert set(example["best"]) == set(rep.best.model_dump())


def test_sparse_vs_layer_table_pairs_equal_mac_drafters(tmp_path):
    """The Pareto section: every sparse drafter beside the layer-pruned drafter of nearest MACs, with
    the MAL ratio; drafters are told apart by the last prune step of their lineage."""
    from sd2.core.report import DrafterInfo, Report, Result
    from sd2.stages.evaluate.plots import write_plots
    from sd2.stages.evaluate.report import markdown, sparse_vs_layer

    def lineage(*prunes):
        return [{"id": "dense.finetune", "stage": "finetune", "config": {}}] + [
            {"id": f"p{i}", "stage": "prune", "config": c} for i, c in enumerate(prunes)]

    drafters = {"dense": DrafterInfo(path="d", lineage=lineage()),
                "sparse50": DrafterInfo(path="s50", lineage=lineage({"method": "sparsegpt", "sparsity": 0.5})),
                "sparse70": DrafterInfo(path="s70", lineage=lineage({"method": "sparsegpt", "sparsity": 0.7})),
                "layer50": DrafterInfo(path="l50", lineage=lineage({"method": "layer", "match_sparsity": 0.5})),
                "layer70": DrafterInfo(path="l70", lineage=lineage({"method": "sparsegpt", "sparsity": 0.3},
                                                                   {"method": "layer", "match_sparsity": 0.7}))}
    macs = {"dense": 100, "sparse50": 64, "sparse70": 46, "layer50": 65, "layer70": 47}
    mal = {"dense": 2.2, "sparse50": 2.0, "sparse70": 1.6, "layer50": 1.5, "layer70": 1.6}
    report = Report(target={"macs": {"effective": 134 * 10**6}}, settings={"gammas": [4]}, drafters=drafters, results=[
        Result(drafter=n, gamma=4, temperature=0.0, mal=mal[n], macs_per_token=macs[n] * 10**6) for n in drafters])
    assert [drafters[n].pruning for n in drafters] == [None, "sparse", "sparse", "layer", "layer"]
    rows = {(r.drafter, q.drafter): ratio for r, q, ratio in sparse_vs_layer(report)}
    assert rows == {("sparse50", "layer50"): pytest.approx(2.0 / 1.5), ("sparse70", "layer70"): pytest.approx(1.0)}
    md = markdown(report, [])
    assert "## Sparse vs layer pruning at equal MACs" in md
    assert "| 4 | 0 | sparse50 | 64.0 M | 2.000 | layer50 | 65.0 M | 1.500 | 1.333× |" in md
    assert "mal_vs_macs.png" in write_plots(report, tmp_path) and (tmp_path / "mal_vs_macs.png").stat().st_size > 0
    no_layer = Report(target=report.target, settings=report.settings, drafters={"dense": drafters["dense"]}, results=report.results[:1])
    assert sparse_vs_layer(no_layer) == [] and "Sparse vs layer" not in markdown(no_layer, [])


def test_committed_reports_load_and_their_derived_figures_are_recomputed_alike():
    """The benchmark reports in the repository (written before the classes existed, and a CI gate's
    baseline in practice) load, and the figures the classes compute equal the ones stored there."""
    root = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
    paths = sorted(root.rglob("report.json"))
    assert paths
    for p in paths:
        stored = json.loads(p.read_text())["results"]
        rep = Report.read(p)
        assert rep.best is not None, p
        for raw, row in zip(stored, rep.results):
            for k in ("speedup", "theoretical_speedup", "mac_speedup", "modeled_speedup", "efficiency"):
                if raw.get(k) is not None:
                    assert getattr(row, k) == pytest.approx(raw[k], rel=1e-3, abs=1e-6), (p.parent.name, k)
