"""The runner: turns a validated recipe into an ordered plan of stages and executes it.

Order: ``drafter.derive`` (when the drafter is derived), ``distill``, every branch's steps in
order, then ``evaluate``. A recipe without a drafter (every branch builds its own: ``- head:``)
plans no ``drafter`` source and evaluates no ``raw``. Each stage's fingerprint hashes its resolved
config, the identities of the inputs it consumes, the seed and the sd2 version. A stage whose
manifest holds the same fingerprint is skipped; a stage that reran hands downstream a new output
id, so exactly the stages downstream of a change rerun and nothing else.
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from sd2.core import artifacts as art
from sd2.core.context import PeakRSS, StageContext, StageInputs, pick_device, rank_world
from sd2.core.errors import Sd2Error, did_you_mean
from sd2.core.fields import config_identity, precisions
from sd2.core.models import ModelSource, load_tokenizer, resolve, same_tokenizer
from sd2.core.report import RAW
from sd2.pipeline.registry import consumed_inputs, get_stage
from sd2.pipeline.schema import ValidatedRecipe

log = logging.getLogger("sd2")


@dataclass
class Step:
    index: int
    id: str
    stage: str
    config: object
    branch: str | None = None
    # where each consumed input comes from: "target", "drafter" or the id of an earlier step
    sources: dict[str, object] = field(default_factory=dict)
    kind: str | None = None     # the drafter kind of the model it produces (sd2.drafters.KINDS)

    @property
    def folder(self) -> str:
        return art.stage_folder(self.index, self.id)


def plan(recipe: ValidatedRecipe) -> list[Step]:
    steps: list[Step] = []

    def add(sid, stage, config, branch=None, kind=None, **sources):
        steps.append(Step(len(steps), sid, stage, config, branch, sources, get_stage(stage).kind or kind))

    drafter_src = "drafter" if recipe.has_drafter else None   # None: no branch step reads it (the schema's check)
    if recipe.drafter_build is not None:     # derive or head: its stage's config, checked by the schema
        stage, cfg = recipe.drafter_build
        add(f"drafter.{stage}", stage, cfg, target="target")
        drafter_src = f"drafter.{stage}"
    dataset_src = None
    if recipe.distill is not None:
        add("distill", "distill", recipe.distill, target="target", model=drafter_src)
        dataset_src = "distill"
    finals = {RAW: drafter_src} if drafter_src is not None else {}
    data_finals: dict[str, str | None] = {}
    for bname, bsteps in recipe.branches.items():
        model_src, data_src = drafter_src, dataset_src
        if bname in recipe.branch_from:   # {from: earlier}: continue from that branch's model and dataset
            model_src, data_src = finals[recipe.branch_from[bname]], data_finals[recipe.branch_from[bname]]
        seen: dict[str, int] = {}
        for i, (sname, cfg) in enumerate(bsteps):
            seen[sname] = seen.get(sname, 0) + 1
            sid = f"{bname}.{sname}" + (f"-{seen[sname]}" if seen[sname] > 1 else "")
            add(sid, sname, cfg, bname, recipe.kinds[bname][i], target="target", model=model_src, dataset=data_src)
            produces = get_stage(sname).produces
            if produces == "model":
                model_src = sid
            elif produces == "dataset":
                data_src = sid
        finals[bname] = model_src
        data_finals[bname] = data_src
    if recipe.evaluate is not None:
        chosen = getattr(recipe.evaluate, "drafters", None)   # a subset, checked against the branches by the schema
        add("evaluate", "evaluate", recipe.evaluate, target="target",
            drafters={k: v for k, v in finals.items() if chosen is None or k in chosen})
    return steps


def _match(steps: list[Step], key: str, option: str) -> list[Step]:
    """Steps named by ``key``: a step id ("sparse.prune"), a folder ("03_sparse.prune") or a stage name ("prune")."""
    hits = [s for s in steps if key in (s.id, s.folder, s.stage)]
    if not hits:
        raise Sd2Error(f"{option} {key!r} matches no stage{did_you_mean(key, [s.id for s in steps])}; "
                       f"stages of this run: {', '.join(s.id for s in steps)}")
    return hits


def _until(steps: list[Step], key: str) -> Step:
    """The one step ``--until`` names. A stage name that several steps share (the top-level distill and a
    branch's own) is refused: running on to the last of them ran far past what was meant."""
    hits = _match(steps, key, "--until")
    if len(hits) > 1:
        raise Sd2Error(f"--until {key!r} names {len(hits)} steps ({', '.join(s.id for s in hits)}); give the step "
                       f"id or folder of the one to stop after, e.g. --until {hits[0].id}")
    return hits[0]


@dataclass
class Produced:
    path: Path
    output_id: str
    lineage: list


class Runner:
    def __init__(self, recipe: ValidatedRecipe, out: Path, force: list[str] | None = None, until: str | None = None):
        self.recipe = recipe
        self.run_dir = Path(out) / recipe.name
        self.steps = plan(recipe)
        self.force = {s.id for key in (force or []) for s in _match(self.steps, key, "--force")}
        self.last = _until(self.steps, until).index if until else len(self.steps) - 1
        self.produced: dict[str, Produced] = {}
        self._external: dict[tuple[str, bool], ModelSource] = {}
        self._cross_tokenizer: bool | None = None
        self.kinds = {"drafter": recipe.drafter_kind} | {s.id: s.kind for s in self.steps if s.kind}

    # -- external models ------------------------------------------------------------------
    def _source(self, role: str, load: bool) -> ModelSource:
        """The target or given drafter, resolved once. Fingerprinting needs no GGUF conversion; loading does."""
        if (role, load) not in self._external:
            self._external[role, load] = resolve(getattr(self.recipe.recipe, role), convert=load)
        return self._external[role, load]

    def _input(self, name: str, src, load: bool):
        if src is None:
            return None
        if name == "drafters":
            return {k: self._input("model", v, load) for k, v in src.items()}
        if src in ("target", "drafter"):
            return replace(self._source(src, load), kind=self.kinds.get(src, "lm"))
        p = self.produced[src]
        return p.path if name == "dataset" else ModelSource(str(p.path), p.output_id, kind=self.kinds[src])

    def _identity(self, src):
        """What identifies an input in a fingerprint: an external model's content fingerprint, or the
        output id of the step that produced it (new each time that step reruns)."""
        if src is None:
            return None
        if isinstance(src, dict):
            return {k: self._identity(v) for k, v in src.items()}
        if src in ("target", "drafter"):
            return self._source(src, load=False).fingerprint
        return self.produced[src].output_id

    # -- execution ------------------------------------------------------------------------
    def run(self) -> list[dict]:
        rank, world = rank_world()
        if world > 1 and rank != 0:
            return self._follow(rank)
        art.writable_dir(self.run_dir, "the run folder (--out)")  # before any model loads
        handler = logging.FileHandler(self.run_dir / "run.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        try:
            with art.RunLock(self.run_dir, log):
                resolved = self.recipe.resolved()
                (self.run_dir / "recipe.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
                self._adopt_renumbered()
                return [self._run_step_safely(step) for step in self.steps[: self.last + 1]]
        finally:
            log.removeHandler(handler)
            handler.close()

    def _fingerprint(self, step: Step):
        """(spec, the sources it reads, their identities, the fingerprint) of a step."""
        spec = get_stage(step.stage)
        consumed = consumed_inputs(spec, step.config)
        sources = {k: v for k, v in step.sources.items() if k in consumed}
        idents = {k: self._identity(v) for k, v in sources.items()}
        fp = art.fingerprint(step.stage, config_identity(step.config, self._device()), idents, self.recipe.recipe.seed)
        return spec, sources, idents, fp

    def _follow(self, rank: int, poll: float = 1.0) -> list[dict]:
        """A non-zero rank of a multi-process launch: no lock and no manifests of its own. It takes
        each stage's outcome from rank 0's manifest, and joins only the distributed stages
        (finetune), whose main process alone writes files."""
        started = time.time()
        results = []
        for step in self.steps[: self.last + 1]:
            spec, sources, idents, fp = self._fingerprint(step)
            folder = self.run_dir / step.folder
            fresh = step.id in self.force
            m = art.read_manifest(folder)
            done = m is not None and m.get("fingerprint") == fp and (not fresh or m.get("finished", 0) >= started)
            if not done and spec.distributed:
                partial = folder / art.PARTIAL
                while not (partial.is_file() and partial.read_text().strip() == fp):
                    time.sleep(poll)  # rank 0 clears and marks the folder first
                inputs = StageInputs(**{k: self._input(k, v, load=True) for k, v in sources.items()})
                ctx = StageContext(seed=self.recipe.recipe.seed, device=self._device(), log=log, stage_id=step.id,
                                   metrics_path=None, run_dir=self.run_dir)
                spec.load().run(step.config, inputs, folder, ctx)
            while not done:
                m = art.read_manifest(folder)
                done = m is not None and m.get("fingerprint") == fp and (not fresh or m.get("finished", 0) >= started)
                if not done:
                    time.sleep(poll)
            self.produced[step.id] = Produced(folder, m["output_id"], m.get("lineage", []))
            results.append({"id": step.id, "status": f"rank{rank}", **m})
        return results

    def _adopt_renumbered(self) -> None:
        """If a step's folder exists under another number (a branch was added or removed), rename it
        rather than redo its work."""
        existing = {}
        for p in self.run_dir.iterdir():
            parsed = art.parse_folder(p.name) if p.is_dir() else None
            if parsed:
                existing.setdefault(parsed[1], []).append(p)
        wanted = {s.folder for s in self.steps}
        for s in self.steps:
            target = self.run_dir / s.folder
            if target.exists():
                continue
            for cand in existing.get(s.id, []):
                if cand.exists() and cand.name not in wanted:
                    cand.rename(target)
                    log.info("renumbered %s -> %s", cand.name, target.name)
                    break

    def _run_step_safely(self, step: Step) -> dict:
        """A stage whose output cannot be written (disk full, read-only, permission) ends in an
        Sd2Error, not a traceback. Its folder stays marked unfinished, with whatever checkpoints it
        wrote, and no manifest: the next run with the same recipe skips the finished stages and
        resumes this one."""
        try:
            return self._run_step(step)
        except Sd2Error:
            raise
        except Exception as e:
            failed = art.write_failure(e)
            if failed is None:
                raise
            where = failed.filename or self.run_dir / step.folder
            raise Sd2Error(f"stage {step.id} could not write {where}: {failed.strerror or failed}. Nothing is "
                           f"marked done for it; free space or fix the permissions, then run the same command "
                           f"again: finished stages are skipped and {step.id} resumes") from e

    def _run_step(self, step: Step) -> dict:
        spec, sources, idents, fp = self._fingerprint(step)
        config_json = step.config.model_dump(mode="json")
        folder = self.run_dir / step.folder
        manifest = art.read_manifest(folder)
        upstream = self.produced.get(sources.get("model"))     # the model it reads, if a step of this run made it
        lineage_in = upstream.lineage if upstream is not None else []

        if manifest and manifest.get("fingerprint") == fp and step.id not in self.force:
            log.info("skip  %-28s (fingerprint %s matches)", step.folder, fp)
            self.produced[step.id] = Produced(folder, manifest["output_id"], manifest.get("lineage", []))
            return {"id": step.id, "status": "skipped", **manifest}

        partial = folder / art.PARTIAL
        if folder.exists():
            resumable = partial.is_file() and partial.read_text().strip() == fp and step.id not in self.force
            if resumable:
                log.info("resume %s (unfinished work with the same fingerprint)", step.folder)
            else:
                shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        partial.write_text(fp)

        inputs = StageInputs(**{k: self._input(k, v, load=True) for k, v in sources.items()})
        if "model" in sources or "drafters" in sources:
            inputs.cross_tokenizer = self._check_tokenizers()
        ctx = StageContext(seed=self.recipe.recipe.seed, device=self._device(), log=log, stage_id=step.id,
                           metrics_path=self.run_dir / "metrics.jsonl", run_dir=self.run_dir)
        log.info("run   %-28s (%s)", step.folder, spec.summary)
        chosen = precisions(step.config, ctx.device, quiet=False)  # warns of an explicit bf16 without native support
        for name, p in chosen.items():
            log.info("      %s: %s -> %s (%s)", name, p["requested"], p["dtype"], p["reason"])
        module = spec.load()
        started = time.time()
        with PeakRSS() as rss:
            metrics = module.run(step.config, inputs, folder, ctx) or {}
        finished = time.time()
        lineage = lineage_in + [{"id": step.id, "stage": step.stage, "config": config_json, "fingerprint": fp}]
        output_id = art.fingerprint("output", {"fp": fp, "finished": finished}, {}, 0)
        manifest = {
            "id": step.id, "stage": step.stage, "branch": step.branch, "fingerprint": fp, "output_id": output_id,
            "config": config_json,
            "inputs": {k: {"source": v, "identity": idents[k]} for k, v in sources.items()},
            "seed": self.recipe.recipe.seed, "started": started, "finished": finished,
            "seconds": round(finished - started, 3), "peak_rss_mb": rss.peak_mb,
            "versions": art.package_versions(), "git_sha": art.git_sha(), "machine": art.machine(),
            "metrics": metrics, "lineage": lineage, **({"precision": chosen} if chosen else {}),
        }
        art.write_json_atomic(folder / art.MANIFEST, manifest)
        partial.unlink(missing_ok=True)
        self.produced[step.id] = Produced(folder, output_id, lineage)
        log.info("done  %-28s in %.1f s", step.folder, finished - started)
        return {"status": "ran", **manifest}

    def _device(self) -> str:
        return pick_device(self.recipe.recipe.device)

    def _check_tokenizers(self) -> bool:
        """Compare the target's and the drafter's tokenizers once; a mismatch means cross-tokenizer mode.
        A built drafter, and every model of a recipe without one (heads), has the target's tokenizer."""
        if self._cross_tokenizer is None:
            if self.recipe.drafter_build is not None or not self.recipe.has_drafter:
                self._cross_tokenizer = False
            else:
                same = same_tokenizer(load_tokenizer(self._source("target", True)), load_tokenizer(self._source("drafter", True)))
                self._cross_tokenizer = not same
                if not same:
                    log.warning("the drafter's tokenizer differs from the target's: cross-tokenizer mode "
                                "(drafts are translated through text; greedy stays lossless)")
        return self._cross_tokenizer


def print_summary(results: list[dict], stream=None) -> None:
    stream = stream or sys.stderr  # looked up per call: the CLI's stderr may be replaced (tests, pipes)
    for r in results:
        metrics = ", ".join(f"{k}={_fmt(v)}" for k, v in list((r.get("metrics") or {}).items())[:4])
        print(f"  {r['status']:<8} {r['id']:<28} {r.get('seconds', 0):>8.1f}s  {metrics}", file=stream)


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else (str(v) if not isinstance(v, (list, dict)) else "…")
