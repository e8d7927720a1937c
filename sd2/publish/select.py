"""Which drafter to publish, and what is known about it.

``sd2 publish`` takes either a model folder or a run folder (``<out>/<name>/``). From a run it
reads the evaluate stage's ``report.json`` (docs/CONTRACTS.md "Evaluation report") and takes the
branch named by ``--drafter``, or else the best by MAL per MAC: the highest
``mal / macs_per_token`` among the results at temperature 0 and the report's main γ, ignoring
``raw`` (the drafter before any branch) unless it is the only one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from sd2.core import artifacts as art
from sd2.core.errors import Sd2Error, did_you_mean

RAW = "raw"
REPORT = "report.json"


@dataclass
class Selection:
    """The drafter to publish: its folder and, when it comes from a run, the run's numbers for it."""

    model_dir: Path
    name: str                                   # the branch name, or the folder's name
    why: str                                    # one line: how it was chosen
    run_dir: Path | None = None
    report: dict | None = None                  # the whole report.json
    entry: dict | None = None                   # report["drafters"][name]
    results: list[dict] = field(default_factory=list)  # report["results"] for this drafter
    main_gamma: int | None = None
    lineage: list[dict] = field(default_factory=list)
    recipe: dict | None = None                  # the run's resolved recipe.yaml


def is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def select(source: Path, drafter: str | None = None) -> Selection:
    source = Path(source).expanduser()
    if not source.is_dir():
        raise Sd2Error(f"{source} is not a folder; give a run folder (OUT/<name>) or a model folder")
    if is_model_dir(source):
        if drafter is not None:
            raise Sd2Error(f"--drafter {drafter!r} picks a branch of a run, but {source} is a model folder; drop --drafter")
        return _from_model_dir(source)
    return _from_run(source, drafter)


def _from_model_dir(folder: Path) -> Selection:
    manifest = art.read_manifest(folder) or {}
    run_dir = folder.parent if manifest else None
    sel = Selection(model_dir=folder, name=manifest.get("branch") or folder.name, why=f"the model folder {folder}",
                    run_dir=run_dir, lineage=manifest.get("lineage", []))
    # A stage folder inside a run: attach the run's numbers for it when the report covers it.
    if run_dir is not None and (report_path := find_report(run_dir)) is not None:
        report = _read_report(report_path)
        for name, entry in (report.get("drafters") or {}).items():
            if _resolve_path(entry.get("path"), run_dir) == folder.resolve():
                _attach(sel, report, name)
                break
    sel.recipe = _read_recipe(run_dir) if run_dir else None
    return sel


def _from_run(run_dir: Path, drafter: str | None) -> Selection:
    report_path = find_report(run_dir)
    if report_path is None:
        raise Sd2Error(f"{run_dir} is neither a model folder (config.json + *.safetensors) nor a run folder with a "
                       f"finished evaluate stage (NN_evaluate/{REPORT}); run `sd2 run` through evaluate, "
                       f"or give the model folder itself")
    report = _read_report(report_path)
    drafters = report.get("drafters") or {}
    if not drafters:
        raise Sd2Error(f"{report_path} lists no drafters under 'drafters'")
    if drafter is not None:
        if drafter not in drafters:
            raise Sd2Error(f"--drafter {drafter!r} is not in {report_path}{did_you_mean(drafter, drafters)}; "
                           f"its drafters: {', '.join(drafters)}")
        name, why = drafter, f"branch '{drafter}' (--drafter)"
    else:
        name, why = best_by_mal_per_mac(report, str(report_path))
    entry = drafters[name]
    model_dir = _resolve_path(entry.get("path"), run_dir)
    if model_dir is None or not is_model_dir(model_dir):
        raise Sd2Error(f"{report_path}: drafters.{name}.path = {entry.get('path')!r} is not a model folder "
                       f"(config.json + *.safetensors) here; was the run folder moved or a stage deleted?")
    sel = Selection(model_dir=model_dir, name=name, why=why, run_dir=run_dir)
    _attach(sel, report, name)
    manifest = art.read_manifest(model_dir) or {}
    sel.lineage = entry.get("lineage") or manifest.get("lineage", [])
    sel.recipe = _read_recipe(run_dir)
    return sel


def best_by_mal_per_mac(report: dict, where: str = REPORT) -> tuple[str, str]:
    """(name, why): the drafter with the highest MAL / MACs-per-token at temperature 0 and the main γ."""
    gamma = main_gamma(report)
    best: dict[str, float] = {}
    for r in report.get("results") or []:
        if r.get("gamma") != gamma or float(r.get("temperature", -1)) != 0.0:
            continue
        macs = r.get("macs_per_token")
        if not r.get("mal") or not macs:
            continue
        best[r["drafter"]] = max(best.get(r["drafter"], 0.0), float(r["mal"]) / float(macs))
    pool = {k: v for k, v in best.items() if k != RAW} or best
    if not pool:
        raise Sd2Error(f"{where}: no result at temperature 0 and gamma {gamma} with mal and macs_per_token; "
                       f"name the drafter with --drafter")
    name = max(sorted(pool), key=lambda k: pool[k])
    others = ", ".join(f"{k} {v * 1e6:.4g}" for k, v in sorted(pool.items(), key=lambda kv: -kv[1]))
    return name, (f"'{name}', the best by MAL per MAC at temperature 0, gamma {gamma} "
                  f"(MAL per million MACs/token: {others})")


def main_gamma(report: dict) -> int | None:
    best = report.get("best") or {}
    if best.get("gamma") is not None:
        return int(best["gamma"])
    gammas = (report.get("settings") or {}).get("gammas") or []
    return int(gammas[0]) if gammas else None


def find_report(run_dir: Path) -> Path | None:
    """The report of the run's evaluate stage; only a finished one (its manifest exists)."""
    hits = []
    for p in sorted(Path(run_dir).iterdir()):
        parsed = art.parse_folder(p.name) if p.is_dir() else None
        if parsed and parsed[1] == "evaluate" and (p / REPORT).is_file() and art.read_manifest(p) is not None:
            hits.append(p / REPORT)
    return hits[-1] if hits else None


def _attach(sel: Selection, report: dict, name: str) -> None:
    sel.report = report
    sel.entry = (report.get("drafters") or {}).get(name)
    sel.results = [r for r in report.get("results") or [] if r.get("drafter") == name]
    sel.main_gamma = main_gamma(report)
    sel.name = name


def _read_report(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise Sd2Error(f"cannot read {path}: {e}; rerun the evaluate stage (sd2 run RECIPE --force evaluate)") from None


def _read_recipe(run_dir: Path | None) -> dict | None:
    import yaml

    p = run_dir / "recipe.yaml" if run_dir else None
    if p is None or not p.is_file():
        return None
    try:
        return yaml.safe_load(p.read_text())
    except yaml.YAMLError:
        return None


def _resolve_path(path: str | None, run_dir: Path) -> Path | None:
    if not path:
        return None
    p = Path(path).expanduser()
    for cand in ([p] if p.is_absolute() else [run_dir / p, run_dir.parent / p, Path.cwd() / p]) + [run_dir / p.name]:
        if cand.is_dir():
            return cand.resolve()
    return None
