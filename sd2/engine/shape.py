"""The cost-aware draft shape: pick the chain length / tree size that maximises the modeled speedup.

Costs are in target decode steps (one single-token target forward = 1):
- c: one drafter decode step (a model drafter drafts gamma of them per round, whatever the width:
  its siblings come from the same logits);
- d: a proposer's measured drafting time per round when it has no model (prompt lookup);
- v(n): one target forward over n tokens or tree nodes (the root plus the draft), measured.

Acceptance comes from pilot rounds drafted at the largest depth considered (``max_gamma``) with each
width. At greedy decoding, a round that accepted a tokens at depth max_gamma would have accepted
min(a, gamma) at depth gamma (the drafts along the accepted path are the same), so for every
gamma <= max_gamma:

    E[committed per round](gamma) = 1 + mean over pilot rounds of min(accepted, gamma)
    time per round(gamma, w)      = gamma * c + v(1 + gamma * w)             (model drafters)
                                  = d + mean over rounds of v(1 + nodes_r(gamma))   (prompt lookup)
    modeled speedup               = E[committed] / time per round

(Leviathan et al. 2023, eq. 1 with measured acceptance instead of a constant rate, and with the
verification cost measured instead of assumed to be 1.) ``choose`` returns the best (gamma, width)
with the whole table, so the report can show the prediction next to the measurement.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

from sd2.engine.cached import CachedLM, sync
from sd2.mal import Round


@dataclass
class Shape:
    gamma: int
    width: int
    predicted_speedup: float
    table: list[dict] = field(default_factory=list)   # every candidate: gamma, width, predicted_speedup


@torch.inference_mode()
def measure_verify_costs(target: CachedLM, prompt: list[int], max_n: int, reps: int = 3) -> dict[int, float]:
    """v(n) for n = 1..max_n: the median target forward over n new tokens after ``prompt`` (cached),
    divided by the median single-token forward. Runs 1 + reps * max_n target forwards."""
    target.reset()
    target.prefill(prompt[:-1])
    base = len(target.held)
    filler = (prompt * (max_n // max(len(prompt), 1) + 1))[:max_n]
    times: dict[int, list[float]] = {n: [] for n in range(1, max_n + 1)}
    for _ in range(reps):
        for n in range(1, max_n + 1):
            sync(target.device)
            t0 = time.perf_counter()
            target.verify(filler[:n])
            sync(target.device)
            times[n].append(time.perf_counter() - t0)
            target.crop(base)
    step = statistics.median(times[1])
    return {n: statistics.median(t) / step for n, t in times.items()}


def _v(v: dict[int, float], n: int) -> float:
    """v(n), linear between measured sizes and past the last two (measure_verify_costs covers 1..max_n)."""
    if n in v:
        return v[n]
    keys = sorted(v)
    lo = [k for k in keys if k < n]
    hi = [k for k in keys if k > n]
    if lo and hi:
        a, b = lo[-1], hi[0]
    elif len(lo) >= 2:
        a, b = lo[-2], lo[-1]
    else:
        return v[keys[0]]
    return v[a] + (n - a) * (v[b] - v[a]) / (b - a)


def predict(rounds: list[Round], gamma: int, width: int, v: dict[int, float], c: float | None,
            d: float | None = None) -> float:
    """Modeled speedup of drafting at (gamma, width), from pilot rounds drafted deeper (see the module
    docstring). ``c``: drafter step cost (model drafters); ``d``: drafting cost per round (no model)."""
    if not rounds:
        return 0.0
    committed = 1 + statistics.fmean(min(r.accepted, gamma) for r in rounds)
    if c is not None:
        cost = gamma * c + _v(v, 1 + gamma * width)
    else:   # a proposer without a model: its drafts may be shorter than gamma
        nodes = [round(r.drafted * min(r.depth, gamma) / r.depth) if r.depth else 0 for r in rounds]
        cost = (d or 0.0) + statistics.fmean(_v(v, 1 + n) for n in nodes)
    return committed / cost


def choose(pilot: dict[int, list[Round]], max_gamma: int, v: dict[int, float], c: float | None,
           d: dict[int, float] | None = None) -> Shape:
    """The (gamma, width) with the highest modeled speedup. ``pilot`` maps a width to the rounds drafted
    at max_gamma with that width; ``d`` the measured drafting cost per round per width (no model)."""
    table = []
    for width, rounds in sorted(pilot.items()):
        for gamma in range(1, max_gamma + 1):
            s = predict(rounds, gamma, width, v, c, (d or {}).get(width))
            table.append({"gamma": gamma, "width": width, "predicted_speedup": round(s, 6)})
    best = max(table, key=lambda r: (r["predicted_speedup"], -r["gamma"] * r["width"]))
    return Shape(best["gamma"], best["width"], best["predicted_speedup"], table)
