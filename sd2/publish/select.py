"""Which drafter to publish, and what is known about it.

``sd2 publish`` takes either a model folder or a run folder (``<out>/<name>/``). From a run it
reads the evaluate stage's ``report.json`` (sd2.core.report) and takes the drafter named by
``--drafter``, or else the report's own ``best`` (``sd2.core.report.pick_best``: the highest
measured speedup at the lowest temperature, among lossless results), the drafter report.md
recommends too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sd2.core import artifacts as art
from sd2.core.errors import Sd2Error, did_you_mean
from sd2.core.paths import expand
from sd2.core.report import REPORT_FILE as REPORT
from sd2.core.report import DrafterInfo, Report, Result, find_report


@dataclass
class Selection:
    """The drafter to publish: its folder and, when it comes from a run, the run's numbers for it."""

    model_dir: Path
    name: str                                   # the branch name, or the folder's name
    why: str                                    # one line: how it was chosen
    run_dir: Path | None = None
    report: Report | None = None                # the whole report.json
    entry: DrafterInfo | None = None            # report.drafters[name]
    results: list[Result] = field(default_factory=list)  # report.results for this drafter
    main_gamma: int | None = None
    lineage: list[dict] = field(default_factory=list)
    recipe: dict | None = None                  # the run's resolved recipe.yaml


def is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def select(source: Path, drafter: str | None = None) -> Selection:
    source = expand(source)
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
    sel = Selection(model_dir=folder, name=manifest.get("branch") or folder.name, why=f"the model folder {folder.name}",
                    run_dir=run_dir, lineage=manifest.get("lineage", []))
    # A stage folder inside a run: attach the run's numbers for it when the report covers it.
    if run_dir is not None and (report_path := find_report(run_dir)) is not None:
        report = Report.read(report_path)
        for name, entry in report.drafters.items():
            if _resolve_path(entry.path, run_dir) == folder.resolve():
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
    report = Report.read(report_path)
    drafters = report.drafters
    if not drafters:
        raise Sd2Error(f"{report_path} lists no drafters under 'drafters'")
    if drafter is not None:
        if drafter not in drafters:
            raise Sd2Error(f"--drafter {drafter!r} is not in {report_path}{did_you_mean(drafter, drafters)}; "
                           f"its drafters: {', '.join(drafters)}")
        name, why = drafter, f"branch '{drafter}' (--drafter)"
    else:
        name, why = best_of(report, str(report_path))
    entry = drafters[name]
    model_dir = _resolve_path(entry.path, run_dir)
    if model_dir is None or not is_model_dir(model_dir):
        hint = ("" if drafter is not None else
                f" (it is the report's best; publish another drafter with --drafter, one of: {', '.join(drafters)})")
        raise Sd2Error(f"{report_path}: drafters.{name}.path = {entry.path!r} is not a model folder "
                       f"(config.json + *.safetensors) here; was the run folder moved or a stage deleted?{hint}")
    sel = Selection(model_dir=model_dir, name=name, why=why, run_dir=run_dir)
    _attach(sel, report, name)
    manifest = art.read_manifest(model_dir) or {}
    sel.lineage = entry.lineage or manifest.get("lineage", [])
    sel.recipe = _read_recipe(run_dir)
    return sel


def best_of(report: Report, where: str = REPORT) -> tuple[str, str]:
    """(name, why): the report's own best (sd2.core.report.pick_best)."""
    b = report.best
    if b is None:
        raise Sd2Error(f"{where}: no lossless result to recommend, so no default drafter; "
                       f"name one with --drafter ({', '.join(report.drafters)})")
    what = "measured speedup" if b.by == "speedup" else "MAC-based speedup (the report has no timings)"
    return b.drafter, (f"'{b.drafter}', the report's best: the highest {what} at temperature {b.temperature:g}, "
                       f"{b.value:.4g}x at gamma {b.gamma}")


def _attach(sel: Selection, report: Report, name: str) -> None:
    sel.report = report
    sel.entry = report.drafters.get(name)
    sel.results = report.rows(drafter=name)
    sel.main_gamma = report.main_gamma()
    sel.name = name


def _read_recipe(run_dir: Path | None) -> dict | None:
    import yaml

    try:
        return yaml.safe_load((run_dir / "recipe.yaml").read_text()) if run_dir else None
    except (OSError, yaml.YAMLError):   # none, or unreadable: the card then says less
        return None


def _resolve_path(path: str | None, run_dir: Path) -> Path | None:
    if not path:
        return None
    p = expand(path)
    for cand in ([p] if p.is_absolute() else [run_dir / p, run_dir.parent / p, Path.cwd() / p]) + [run_dir / p.name]:
        if cand.is_dir():
            return cand.resolve()
    return None
