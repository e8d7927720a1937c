"""The `sd2` command line. Thin: each command wraps one typed function.

    sd2 run RECIPE [key.path=value ...] [--out DIR] [--force STAGE] [--until STAGE]
    sd2 validate RECIPE [key.path=value ...]
    sd2 stages
    sd2 show RUN_DIR
    sd2 publish RUN_OR_MODEL_DIR --repo-id ORG/NAME [--drafter BRANCH] [--private] [--dry-run --out DIR] [--exist-ok]
    sd2 eval --target MODEL --drafter [NAME=]MODEL [...] [--prompts SRC] [--limit N] [--gamma G ...]
             [--temperature T ...] [--max-new-tokens N] [--repeats N] [--device D] [--dtype T] [--out DIR]
             [--engine sd2|vllm]
    sd2 compare NEW BASELINE [--max-mal-drop 0.05]      (exit 0 ok, 1 regression, 2 unusable input)
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path
from typing import List, Optional

import typer
import yaml

from sd2.core.errors import Sd2Error

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="sd2: build small, sparse, well-aligned drafters for speculative decoding.")


def user_errors(fn):
    """Print an Sd2Error's message and exit 1, with no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Sd2Error as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(1) from None

    return wrapper


OVERRIDES = typer.Argument(None, help="overrides as key.path=value, e.g. evaluate.gamma=[2,4]")


@app.command()
@user_errors
def validate(recipe: Path = typer.Argument(..., help="recipe YAML"), overrides: Optional[List[str]] = OVERRIDES):
    """Check a whole recipe, reporting every problem at once. Loads no model."""
    from sd2.pipeline.runner import plan
    from sd2.pipeline.schema import load_recipe

    r = load_recipe(recipe, overrides or [])
    steps = plan(r)
    typer.echo(f"{recipe}: ok ({len(steps)} stages: {', '.join(s.id for s in steps)})")


@app.command()
@user_errors
def run(recipe: Path = typer.Argument(..., help="recipe YAML"), overrides: Optional[List[str]] = OVERRIDES,
        out: Path = typer.Option(Path("artifacts"), "--out", help="output root; the run folder is OUT/<name>"),
        force: Optional[List[str]] = typer.Option(None, "--force", help="rerun this stage even if done (id, folder or stage name; repeatable)"),
        until: Optional[str] = typer.Option(None, "--until", help="stop after this stage")):
    """Validate the recipe, then run its stages, skipping those already done with the same fingerprint."""
    from sd2.pipeline.runner import Runner, print_summary
    from sd2.pipeline.schema import load_recipe

    r = load_recipe(recipe, overrides or [])
    runner = Runner(r, out, force=force, until=until)
    typer.echo(f"# resolved recipe -> {runner.run_dir / 'recipe.yaml'}", err=True)
    typer.echo(yaml.safe_dump(r.resolved(), sort_keys=False), err=True)
    results = runner.run()
    typer.echo(f"run folder: {runner.run_dir}", err=True)
    print_summary(results)
    # The report of an evaluate this invocation reached (ran, or found done with the same fingerprint):
    # never one left from an earlier run past an --until.
    reached = {r["id"] for r in results}
    for step in runner.steps:
        report = runner.run_dir / step.folder / "report.md"
        if step.stage == "evaluate" and step.id in reached and report.is_file():
            typer.echo(report.read_text())


@app.command()
def stages():
    """List the stages a recipe can use."""
    from sd2.pipeline.registry import STAGES

    for name, spec in STAGES.items():
        where = "branch step" if spec.in_branch else "top level"
        typer.echo(f"{name:<11} {spec.summary}  [{where}; reads {', '.join(spec.consumes)}; writes a {spec.produces}]")


@app.command()
@user_errors
def show(run_dir: Path = typer.Argument(..., help="a run folder, e.g. artifacts/quickstart")):
    """Each stage's status, timings and key metrics."""
    from sd2.core import artifacts as art

    if not run_dir.is_dir():
        raise Sd2Error(f"run folder not found: {run_dir}")
    rows = []
    for p in sorted(run_dir.iterdir()):
        if not (p.is_dir() and art.parse_folder(p.name)):
            continue
        m = art.read_manifest(p)
        if m:
            metrics = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                for k, v in (m.get("metrics") or {}).items() if not isinstance(v, (list, dict)))
            rows.append((p.name, "done", f"{m.get('seconds', 0):.1f}s", metrics))
        else:
            rows.append((p.name, "partial" if (p / art.PARTIAL).exists() else "incomplete", "-", ""))
    if not rows:
        raise Sd2Error(f"{run_dir} holds no stage folders; is it a run folder (OUT/<name>)?")
    lock = run_dir / art.LOCK
    if lock.exists():
        try:
            holder = json.loads(lock.read_text()).get("pid")
        except (OSError, ValueError, AttributeError):  # a torn or foreign lock file still means "locked"
            holder = "unknown pid"
        typer.echo(f"(locked by sd2 process {holder}; a lock left by a killed run is cleared by the next run)")
    width = max(len(r[0]) for r in rows)
    for name, status, secs, metrics in rows:
        typer.echo(f"{name:<{width}}  {status:<10} {secs:>8}  {metrics}")


@app.command()
@user_errors
def publish(source: Path = typer.Argument(..., help="a run folder (OUT/<name>) or a model folder"),
            repo_id: str = typer.Option(..., "--repo-id", help="Hub repo, org/name"),
            drafter: Optional[str] = typer.Option(None, "--drafter", help="the drafter of the run to publish (default: the report's best, by measured speedup)"),
            private: bool = typer.Option(False, "--private", help="create the repo private"),
            dry_run: bool = typer.Option(False, "--dry-run", help="build the folder in --out, upload nothing"),
            out: Optional[Path] = typer.Option(None, "--out", help="write the folder here (needed with --dry-run)"),
            exist_ok: bool = typer.Option(False, "--exist-ok", help="upload a new commit to an existing repo")):
    """Build a Hub-ready drafter folder with a model card, and upload it (token: HF_TOKEN or `hf auth login`)."""
    from sd2.publish import publish as do_publish

    do_publish(source, repo_id, drafter=drafter, private=private, dry_run=dry_run, out=out, exist_ok=exist_ok,
               say=lambda line: typer.echo(line, err=True))


@app.command()
@user_errors
def compare(new: Path = typer.Argument(..., help="the new report.json, evaluate folder or run folder"),
            baseline: Path = typer.Argument(..., help="the baseline report.json, evaluate folder or run folder"),
            max_mal_drop: float = typer.Option(0.05, "--max-mal-drop", help="largest allowed relative MAL drop")):
    """The CI gate: compare two evaluation reports; exit 1 on regression, 2 on unusable input."""
    from sd2.pipeline.commands import compare_command

    try:
        code, text = compare_command(new, baseline, max_mal_drop)
    except Sd2Error as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(text)
    raise typer.Exit(code)


@app.command("eval")
@user_errors
def eval_(target: str = typer.Option(..., "--target", help="folder, hub id, .gguf or PACKAGE:FILE.gguf"),
          drafter: List[str] = typer.Option(..., "--drafter", help="drafter model, or NAME=MODEL to name it in the report "
                                            "(repeatable); MODEL 'prompt_lookup' is n-gram prompt lookup (no model)"),
          prompts: str = typer.Option("mtbench", "--prompts", help="prompt source (sd2.data.prompts)"),
          limit: Optional[int] = typer.Option(20, "--limit", help="number of prompts"),
          skip: int = typer.Option(0, "--skip", help="skip the first N prompts"),
          shuffle_seed: Optional[int] = typer.Option(None, "--shuffle-seed", help="shuffle the prompts with this seed "
                                                     "before --skip and --limit, as a recipe's prompts: {shuffle: true, "
                                                     "seed: N} do (to hold apart the prompts a recipe distilled)"),
          gamma: List[str] = typer.Option(None, "--gamma", help="draft length (repeatable: a sweep), or 'auto'"),
          width: List[int] = typer.Option(None, "--width", help="tree width (nodes per depth) for proposers that branch; 1 = chain (repeatable)"),
          temperature: List[float] = typer.Option(None, "--temperature", help="repeatable: a sweep"),
          top_k: Optional[int] = typer.Option(None, "--top-k", help="sampling filter, target and drafters alike (0 = off)"),
          top_p: Optional[float] = typer.Option(None, "--top-p", help="sampling filter (1 = off)"),
          min_p: Optional[float] = typer.Option(None, "--min-p", help="sampling filter (0 = off)"),
          max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="new tokens per request"),
          repeats: Optional[int] = typer.Option(None, "--repeats", help="timed passes; wall-clock is the median"),
          device: str = typer.Option("auto", "--device", help="auto (cuda when available, else cpu), cpu, cuda or cuda:N"),
          dtype: Optional[str] = typer.Option(None, "--dtype", help="auto (float32 on a CPU, where losslessness is checked token for token; bfloat16 on a GPU that supports it), float32, bfloat16 or float16, for both models"),
          out: Path = typer.Option(Path("artifacts/eval"), "--out", help="where report.json/.md go"),
          mal_only: bool = typer.Option(False, "--mal-only", help="MAL only: greedy chain rounds simulated exactly by "
                                        "teacher forcing, no speculative decoding and no wall-clock (evaluate.decode: false)"),
          engine: Optional[str] = typer.Option(None, "--engine", help="sd2 (sd2's engine; the default) or vllm (vLLM "
                                               "serves the target and each drafter; docs/vllm.md)")):
    """Evaluate any drafter against a target, without a recipe. Unset options take the evaluate stage's
    defaults (docs/evaluate.md), the same as a recipe's."""
    from sd2.pipeline.commands import eval_command

    metrics = eval_command(target, drafter, prompts, limit, skip, out, device=device, shuffle_seed=shuffle_seed,
                           gamma=gamma, width=width,
                           temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                           max_new_tokens=max_new_tokens, repeats=repeats, dtype=dtype, decode=not mal_only,
                           engine=engine)
    report = out / "report.md"
    typer.echo(report.read_text() if report.is_file() else json.dumps(metrics))


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "transformers", "llmcompressor", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    app()


if __name__ == "__main__":
    main()
