"""The evaluation report (report.json): one set of typed classes that evaluate writes and that
`sd2 compare`, report.md, the plots and `sd2 publish` (selection and model card) read.

Stored are measurements: MAL and its counts, wall-clock, the cost ratio c, the verification cost v,
MACs. Derived figures (speedup, theoretical, MAC-based and modeled speedup, efficiency) are computed
here from those measurements, in one place; report.json carries them too (pydantic computed fields),
for people and tools that read the JSON, but a reader recomputes them and never trusts a stored copy.
The recommended drafter (``best``) has one definition, ``pick_best``, documented in docs/evaluate.md.

New fields go in as optional (``None`` default), so that older reports (a committed CI baseline)
still load. Unknown keys are ignored on reading for the same reason.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, computed_field, model_validator

from sd2.core.errors import Sd2Error

REPORT_FILE = "report.json"
RAW = "raw"          # the name evaluate gives the drafter before any branch (the recipe's `drafter:`)
TARGET = "target"    # the name of the target-only baseline
RESERVED_NAMES = (RAW, TARGET)


def _r(x: float | None, nd: int = 6) -> float | None:
    return None if x is None else round(float(x), nd)


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


# ---------------------------------------------------------------------------------------------
# Derived figures: the one place they are computed (these two, and Result's computed fields)


def speedup(target_wall_s: float | None, wall_s: float | None) -> float | None:
    """Measured wall-clock speedup: target-only wall ÷ speculative wall, same prompts, batch 1."""
    return target_wall_s / wall_s if target_wall_s and wall_s else None


def theoretical_speedup(mal: float, gamma: int, c: float | None) -> float | None:
    """MAL / (γc + 1) (Leviathan et al. 2023, eq. 1 with MAL for the expected tokens per round)."""
    return mal / (gamma * c + 1) if c is not None else None


# ---------------------------------------------------------------------------------------------
# The report


Kind = Literal["drafter", "cross_tokenizer", "prompt_lookup", "head"]


class Result(_Model):
    """One (drafter, γ, width, temperature) setting. Definitions: docs/evaluate.md "Metrics"."""

    drafter: str
    gamma: int = Field(description="draft depth per round (the chain length for a chain)")
    temperature: float
    width: int = Field(1, description="tree width: nodes per depth (1 = chain)")
    kind: Kind = "drafter"
    mal: float = Field(description="tokens committed ÷ target forwards, pooled")
    mal_per_request: float | None = None
    acceptance_rate: float | None = None
    acceptance_per_position: list[float] = Field(default_factory=list)
    mal_per_category: dict[str, float] = Field(default_factory=dict)
    greedy_mal_teacher_forced: float | None = None
    tokens: int | None = None
    requests: int | None = None
    drafted: int | None = Field(None, description="draft tokens (tree nodes) over all rounds")
    accepted: int | None = Field(None, description="accepted depth summed over all rounds")
    drafted_depth: int | None = Field(None, description="draft depth summed over all rounds")
    nodes_per_round: float | None = None
    target_forwards: int | None = None
    drafter_forwards: int | None = None
    wall_s: float | None = Field(None, description="speculative wall-clock, s (median over passes)")
    walls: list[float] = Field(default_factory=list)
    target_wall_s: float | None = Field(None, description="target-only wall-clock, s (median over passes)")
    c_measured: float | None = Field(None, description="drafter ÷ target single-token decode forward time")
    verify_cost: float | None = Field(None, description="v(n): target forward over n = 1 + γ·width tokens ÷ its decode step")
    draft_cost: float | None = Field(None, description="time in propose per round ÷ target decode step")
    predicted_speedup: float | None = Field(None, description="gamma: auto's modeled speedup for this shape (greedy)")
    verify_cost_mean: float | None = Field(None, description="target round forward per round ÷ its decode step")
    mac_ratio: float | None = Field(None, description="drafter ÷ target effective MACs per token")
    macs_per_token: int | None = None
    dense_macs_per_token: int | None = None
    sparsity: float | None = None
    lossless: bool | None = Field(None, description="T=0: equal to target-only greedy token for token; else None")
    lossless_mismatches: list[str] = Field(default_factory=list)
    sd2_mal: float | None = Field(None, description="engine vllm: sd2's engine MAL, same drafter, prompts and rounds (greedy)")

    @property
    def label(self) -> str:
        """The drafter's name, with "/wW" for a tree of width W (one entry per shape in tables and compare)."""
        return self.drafter + (f"/w{self.width}" if self.width > 1 else "")

    @property
    def key(self) -> tuple[str, int, float]:
        return (self.label, int(self.gamma), float(self.temperature))

    @computed_field
    @property
    def speedup(self) -> float | None:
        return _r(speedup(self.target_wall_s, self.wall_s))

    @computed_field
    @property
    def theoretical_speedup(self) -> float | None:
        return _r(theoretical_speedup(self.mal, self.gamma, self.c_measured))

    @computed_field
    @property
    def mac_speedup(self) -> float | None:
        """MAL / (γ·MAC ratio + 1): the theoretical speedup with c modelled by drafter ÷ target MACs."""
        return _r(self.mal / (self.gamma * self.mac_ratio + 1)) if self.mac_ratio is not None else None

    @computed_field
    @property
    def modeled_speedup(self) -> float | None:
        """MAL / (γc + v): the ceiling with this machine's measured cost v of one (γ+1)-token verify. For a
        proposer without a model (prompt lookup), MAL / (d + v̄): d = its measured drafting time per round
        and v̄ = the mean verification cost per round (its draft length varies), in target decode steps."""
        if self.kind == "prompt_lookup":
            d, v = self.draft_cost, self.verify_cost_mean
            return _r(self.mal / (d + v)) if d is not None and v else None
        c, v = self.c_measured, self.verify_cost
        return _r(self.mal / (self.gamma * c + v)) if c is not None and v is not None else None

    @computed_field
    @property
    def efficiency(self) -> float | None:
        """Measured ÷ theoretical speedup: how close the engine gets to MAL/(γc+1)."""
        s = speedup(self.target_wall_s, self.wall_s)
        t = theoretical_speedup(self.mal, self.gamma, self.c_measured)
        return _r(s / t) if s and t else None


class VocabInfo(_Model):
    draft_vocab_size: int | None = None
    coverage: float | None = Field(None, description="share of the target's greedy tokens the drafter can propose")
    coverage_heldout_distill: float | None = None


class ShapeChoice(_Model):
    """What ``gamma: auto`` chose for a drafter (sd2.engine.shape), with the whole modeled table."""
    gamma: int
    width: int = 1
    predicted_speedup: float | None = None
    table: list[dict] = Field(default_factory=list, description="every candidate: gamma, width, predicted_speedup")


class DrafterInfo(_Model):
    path: str = Field("", description="the model folder or id; empty for prompt lookup (no model)")
    kind: Kind = "drafter"
    settings: dict[str, Any] = Field(default_factory=dict, description="prompt lookup: its n-gram settings")
    fingerprint: str = ""
    macs: dict[str, Any] = Field(default_factory=dict, description="sd2.macs.MacCount.to_dict()")
    mac_ratio: float | None = None
    sparsity: float | None = Field(None, description="decoder-linear sparsity (sd2.sparsity)")
    cross_tokenizer: bool = False
    lineage: list[dict] = Field(default_factory=list)
    c_measured: float | None = None
    vocab: VocabInfo | None = None
    shape: ShapeChoice | None = Field(None, description="gamma: auto's choice, else null")

    @property
    def pruning(self) -> str | None:
        """'layer' or 'sparse' by the drafter's last prune step (its lineage), None when never pruned."""
        prunes = [step.get("config") or {} for step in self.lineage if step.get("stage") == "prune"]
        if not prunes:
            return None
        return "layer" if prunes[-1].get("method") == "layer" else "sparse"


class TargetInfo(_Model):
    name: str = TARGET
    ref: str = ""                   # as the user named it: hub id, folder, or PACKAGE:FILE.gguf
    loaded_from: str | None = None  # a GGUF's converted folder in sd2's cache (what transformers and vLLM
    #                                 can load, for the report's snippets); None when ``ref`` itself loads
    hub_id: str | None = None
    fingerprint: str = ""
    macs: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _older_reports(cls, data):
        """Reports before 2026-12 held the loaded folder in ``ref`` and the user's name in ``label``."""
        if isinstance(data, dict) and data.get("label") and "loaded_from" not in data:
            data = dict(data)
            label = data.pop("label")
            if label != data.get("ref"):
                data["loaded_from"], data["ref"] = data.get("ref") or None, label
        return data

    @property
    def shown(self) -> str:
        """How reports name the target to a user: as the user named it."""
        return self.ref

    @property
    def loadable(self) -> str | None:
        """What transformers / vLLM load for this target: its Hub id, else the folder it was loaded from."""
        return self.hub_id or self.loaded_from or self.ref or None


class Baseline(_Model):
    wall_s: float
    tokens: int
    tokens_per_s: float
    walls: list[float] = Field(default_factory=list)


class Settings(_Model):
    engine: Literal["sd2", "vllm"] = Field("sd2", description="what decoded: sd2's engine, or vLLM (evaluate.engine)")
    gammas: list[int] = Field(default_factory=list)
    widths: list[int] = Field(default_factory=lambda: [1])
    gamma_auto: bool = False
    max_gamma: int | None = None
    temperatures: list[float] = Field(default_factory=list)
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    max_new_tokens: int | None = None
    n_prompts: int | None = None
    turns: int | None = None
    prompts: Any = None
    repeats: int | None = None
    warmup: int | None = None
    seed: int | None = None
    device: str | None = None
    dtype: str | None = None
    decode: bool = Field(True, description="False: MAL only, by teacher forcing (evaluate.decode); no speculative decoding ran")
    packed_linears: int | None = Field(None, description="the target's Linears with a prepacked oneDNN weight in sd2's "
                                                         "engine (CPU float32; 0: none, SD2_PACKED_LINEARS=0); None: "
                                                         "not recorded (reports before it existed, vLLM)")
    machine: dict[str, Any] = Field(default_factory=dict)


class Best(_Model):
    """The recommended drafter and setting, and the figure it won by."""

    drafter: str
    gamma: int
    temperature: float
    width: int = 1
    by: Literal["speedup", "mac_speedup"]
    value: float


def pick_best(results: list[Result]) -> Best | None:
    """The one definition of the drafter to recommend (report.md's "use the best drafter", and what
    `sd2 publish` publishes by default):

    1. among the results at the lowest temperature evaluated (0 when greedy was evaluated: there the
       output is checked against the target token for token), leave out any that were not lossless;
    2. take the highest measured wall-clock ``speedup`` when every candidate has one; else (a report
       without timings) the highest ``mac_speedup``, MAL/(γ·MAC ratio + 1);
    3. ties go to the higher MAL, then to the name.
    Every drafter competes, ``raw`` (the drafter before any branch) included: if no branch beats it,
    that is the honest recommendation. Not MAL per MAC, which favours a tiny drafter at MAL 1.0 that
    makes decoding slower. Prompt lookup has no model to recommend: it is shown beside the drafters,
    never picked. None when there is no candidate.
    """
    results = [r for r in results if r.kind != "prompt_lookup"]
    if not results:
        return None
    t0 = min(r.temperature for r in results)
    pool = [r for r in results if r.temperature == t0 and r.lossless is not False]
    by = "speedup" if pool and all(r.speedup is not None for r in pool) else "mac_speedup"
    pool = [r for r in pool if getattr(r, by) is not None]
    if not pool:
        return None
    top = max(pool, key=lambda r: (getattr(r, by), r.mal, r.drafter))
    return Best(drafter=top.drafter, gamma=top.gamma, temperature=top.temperature, width=top.width, by=by,
                value=getattr(top, by))


class Report(_Model):
    """report.json. ``best`` is computed from ``results`` (``pick_best``)."""

    sd2_version: str = "?"
    target: TargetInfo = Field(default_factory=TargetInfo)
    settings: Settings = Field(default_factory=Settings)
    baseline: dict[str, Baseline] = Field(default_factory=dict, description="per temperature, as str(float)")
    drafters: dict[str, DrafterInfo] = Field(default_factory=dict)
    results: list[Result]

    @model_validator(mode="after")
    def _fill_row_facts(self) -> "Report":
        """Reports written before rows carried ``mac_ratio`` hold it per drafter only."""
        for r in self.results:
            d = self.drafters.get(r.drafter)
            if d is not None and r.mac_ratio is None:
                r.mac_ratio = d.mac_ratio
        return self

    @computed_field
    @property
    def best(self) -> Best | None:
        return pick_best(self.results)

    def rows(self, drafter: str | None = None, gamma: int | None = None,
             temperature: float | None = None, width: int | None = None) -> list[Result]:
        return [r for r in self.results if (drafter is None or r.drafter == drafter)
                and (gamma is None or r.gamma == gamma) and (temperature is None or r.temperature == temperature)
                and (width is None or r.width == width)]

    def best_row(self) -> Result | None:
        b = self.best
        return next(iter(self.rows(b.drafter, b.gamma, b.temperature, b.width)), None) if b else None

    def main_gamma(self) -> int | None:
        """The γ the report recommends (best's), else the first evaluated."""
        b = self.best
        if b is not None:
            return b.gamma
        return self.settings.gammas[0] if self.settings.gammas else None

    def to_json(self) -> dict:
        return self.model_dump(mode="json")

    def save(self, path: Path) -> None:
        from sd2.core.artifacts import write_json_atomic

        write_json_atomic(Path(path), self.to_json())

    @classmethod
    def read(cls, path: Path) -> "Report":
        """report.json from a file, an evaluate stage folder or a run folder. Sd2Error names the file
        and the field when it is not a report."""
        path = Path(path)
        found = path if path.is_file() else path / REPORT_FILE if (path / REPORT_FILE).is_file() else find_report(path)
        if found is None:
            raise Sd2Error(f"no {REPORT_FILE} at {path}; give a report.json, an evaluate folder or a run folder")
        try:
            data = json.loads(found.read_text())
        except (OSError, ValueError) as e:  # ValueError: JSONDecodeError, and UnicodeDecodeError on binary bytes
            raise Sd2Error(f"{found} is not valid JSON: {e}") from None
        return cls.parse(data, str(found))

    @classmethod
    def parse(cls, data: Any, where: str = REPORT_FILE) -> "Report":
        if not isinstance(data, dict) or not isinstance(data.get("results"), list):
            raise Sd2Error(f"{where} is not an sd2 report (no 'results' list)")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            field = ".".join(str(p) for p in err["loc"])
            raise Sd2Error(f"{where}: {field}: {err['msg']}; rerun the evaluate stage to rewrite it") from None


def find_report(run_dir: Path) -> Path | None:
    """The report.json of a run folder's evaluate step: only a finished one (its manifest exists);
    the last, should renumbered folders leave more than one. None when there is none."""
    from sd2.core import artifacts as art

    hits = []
    for p in sorted(Path(run_dir).iterdir()) if Path(run_dir).is_dir() else []:
        parsed = art.parse_folder(p.name) if p.is_dir() else None
        if parsed and parsed[1] == "evaluate" and (p / REPORT_FILE).is_file() and art.read_manifest(p) is not None:
            hits.append(p / REPORT_FILE)
    return hits[-1] if hits else None
