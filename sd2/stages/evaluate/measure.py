"""Measurements: prompts as token ids, the interleaved timing loop, c, and teacher-forced greedy MAL.

Timing protocol (Spec-Bench): batch size 1, warm-up first, then ``repeats`` passes over the prompts;
in each pass every prompt runs target-only first, then every (drafter, shape) on the same prompt, so
slow phases of a shared machine hit every contender alike. Wall-clock is summed over the prompts of
a pass; the reported wall is the median over passes. MAL and acceptance come from the first pass
(with a fixed seed they are deterministic).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

import torch

from sd2.engine.cached import CachedLM
from sd2.engine.loop import Generation, generate, target_generate
from sd2.engine.proposer import Proposer, Sampling
from sd2.engine.sampling import DraftVocab
from sd2.mal import MalStats, teacher_forced_rounds, teacher_forced_stats


@dataclass
class Request:
    id: str
    category: str
    messages: list[dict]
    ids: list[int]                   # the prompt in the target's tokenizer


@dataclass
class Drafter:
    """A named proposer under evaluation, with its model when it has one (for c and teacher forcing)."""
    name: str
    proposer: Proposer
    lm: CachedLM | None = None
    vocab: DraftVocab | None = None
    cross: bool = False              # a different tokenizer: drafts travel through text
    drafter: object = None           # a drafter bound to the target (sd2.drafters; a head): its teacher-forced MAL

    @property
    def widths(self) -> bool:
        """Whether the proposer can branch (has a ``width``): only those are run at width > 1."""
        return hasattr(self.proposer, "width")

    @property
    def timed(self):
        """What times the drafter's own single-token forwards (``step_times``, for c): its CachedLM, or a
        proposer that times its own model (a feature-level head); None for a drafter without a model."""
        if self.lm is not None:
            return self.lm
        return self.proposer if hasattr(self.proposer, "step_times") else None


def chat_ids(tok, messages: list[dict]) -> list[int]:
    """The prompt through the chat template when the tokenizer has one, else the plain user text."""
    if getattr(tok, "chat_template", None):
        return list(tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"])
    text = "\n\n".join(m["content"] for m in messages)
    return tok.encode(text)


def build_requests(convs, tok, turns: int, target: CachedLM, max_new_tokens: int, eos: set[int]) -> list[Request]:
    """One request per evaluated user turn. Turn t > 1 sees the target's greedy answers to the turns
    before it as history (what target-only greedy decoding would have said)."""
    out = []
    for conv in convs:
        msgs = [{"role": "system", "content": conv.system}] if conv.system else []
        n = min(turns, len(conv.turns))
        for t in range(n):
            msgs.append({"role": "user", "content": conv.turns[t]})
            ids = chat_ids(tok, msgs)
            out.append(Request(conv.id if t == 0 else f"{conv.id}#turn{t + 1}", conv.category, list(msgs), ids))
            if t + 1 < n:
                answer = target_generate(target, ids, max_new_tokens, eos).tokens
                msgs.append({"role": "assistant", "content": tok.decode(answer, skip_special_tokens=True)})
    return out


def run_drafter(target: CachedLM, d: Drafter, req: Request, gamma: int, width: int, max_new_tokens: int,
                eos: set[int], sampling: Sampling, gen) -> Generation:
    if d.widths:
        d.proposer.width = width
    return generate(target, d.proposer, req.ids, gamma, max_new_tokens, eos, sampling, gen)


def _gen(device, seed: int, *parts: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(hash((seed,) + parts) & 0x7FFF_FFFF_FFFF)
    return g


@dataclass
class Cell:
    """One (drafter, gamma, width, temperature) setting."""
    stats: MalStats = field(default_factory=MalStats)
    walls: list[float] = field(default_factory=list)     # empty: not timed (evaluate.decode: false)
    drafter_forwards: int = 0
    propose_s: float = 0.0           # first pass: time inside propose
    verify_s: float = 0.0            # first pass: time inside the target's round forwards
    lossless: bool | None = True     # None: not checked (teacher-forced rounds, no decoding)
    mismatches: list[str] = field(default_factory=list)


def grid(drafters: list[Drafter], gammas: list[int], widths: list[int]) -> dict[str, list[tuple[int, int]]]:
    """(gamma, width) settings per drafter: every width for a proposer that branches, else width 1."""
    return {d.name: [(g, w) for g in gammas for w in (widths if d.widths else [1])] for d in drafters}


def auto_shapes(target: CachedLM, drafters: list[Drafter], requests: list[Request], max_gamma: int,
                widths: list[int], max_new_tokens: int, eos: set[int], pilot_prompts: int) -> dict:
    """``gamma: auto``: per drafter, the (gamma, width) with the highest modeled speedup
    (sd2.engine.shape), from greedy pilot rounds at depth max_gamma on the first ``pilot_prompts``
    requests, the drafter's measured c (or drafting time per round) and the target's measured v(n)."""
    from sd2.engine.shape import choose, measure_verify_costs

    for r in [target] + [d.timed for d in drafters if d.timed is not None]:
        r.step_times.clear()
    pilot_reqs = requests[:pilot_prompts]
    for d in drafters:   # warm-up: first calls allocate and pick kernels
        run_drafter(target, d, pilot_reqs[0], 2, 1, min(8, max_new_tokens), eos, Sampling(), None)
    v = measure_verify_costs(target, requests[0].ids, 1 + max_gamma * max(widths))
    step = statistics.median(target.step_times)
    out = {}
    for d in drafters:
        pilot, dcost = {}, {}
        for w in (widths if d.widths else [1]):
            rounds, spent = [], 0.0
            for req in pilot_reqs:
                g = run_drafter(target, d, req, max_gamma, w, max_new_tokens, eos, Sampling(), None)
                rounds += g.rounds
                spent += g.propose_seconds
            pilot[w], dcost[w] = rounds, spent / max(len(rounds), 1) / step
        # a model drafter (standalone or head) costs gamma * c per round; one without a model its time per round
        c = c_measured(d.timed, target) if d.timed is not None else None
        out[d.name] = choose(pilot, max_gamma, v, c, None if d.timed is not None else dcost)
    return out


def measure(target: CachedLM, drafters: list[Drafter], requests: list[Request], shapes: dict[str, list[tuple[int, int]]],
            samplings: list[Sampling], max_new_tokens: int, repeats: int, warmup: int, seed: int, eos: set[int],
            progress=None) -> tuple[dict, dict, dict]:
    """``shapes``: the (gamma, width) settings of each drafter (``grid`` or ``auto_shapes``). Returns
    (baseline per temperature, cells per (name, gamma, width, temperature), greedy target outputs)."""
    dev = target.device
    progress = progress or (lambda it, **kw: it)
    for _ in range(warmup):   # first calls allocate and pick kernels: keep them out of the timings
        w = requests[0]
        target_generate(target, w.ids, min(16, max_new_tokens), eos)
        for d in drafters:
            g, wd = shapes[d.name][0]
            run_drafter(target, d, w, g, wd, min(16, max_new_tokens), eos, Sampling(), None)
    for r in [target] + [d.timed for d in drafters if d.timed is not None]:
        r.step_times.clear()
        if hasattr(r, "verify_times"):
            r.verify_times.clear()
    baseline: dict = {}
    cells: dict = {(d.name, g, wd, s.temperature): Cell() for d in drafters for g, wd in shapes[d.name]
                   for s in samplings}
    greedy_ref: dict[str, list[int]] = {}
    for s in samplings:
        temp = s.temperature
        passes, tokens = [], 0
        for rep in range(repeats):
            wall = {key: 0.0 for key in cells if key[3] == temp}
            base_wall = 0.0
            for i, req in enumerate(progress(requests, desc=f"T={temp} pass {rep + 1}/{repeats}", unit="prompt")):
                base = target_generate(target, req.ids, max_new_tokens, eos, s, _gen(dev, seed, i, rep, 0))
                base_wall += base.seconds
                if rep == 0:
                    tokens += len(base.tokens)
                if temp == 0:
                    greedy_ref.setdefault(req.id, base.tokens)
                for d in drafters:
                    for gamma, width in shapes[d.name]:
                        key = (d.name, gamma, width, temp)
                        cell = cells[key]
                        before = d.timed.forwards if d.timed is not None else 0
                        t_before = target.seconds
                        out = run_drafter(target, d, req, gamma, width, max_new_tokens, eos, s,
                                          _gen(dev, seed, i, rep, 1 + gamma, width))
                        wall[key] += out.seconds
                        if rep == 0:
                            cell.stats.add_request(out.rounds, req.category)
                            cell.drafter_forwards += (d.timed.forwards - before) if d.timed is not None else 0
                            cell.propose_s += out.propose_seconds
                            cell.verify_s += target.seconds - t_before
                        if temp == 0 and out.tokens != base.tokens:
                            cell.lossless = False
                            cell.mismatches.append(req.id)
            passes.append(base_wall)
            for key, w in wall.items():
                cells[key].walls.append(w)
        med = statistics.median(passes)
        baseline[temp] = {"wall_s": med, "tokens": tokens, "tokens_per_s": tokens / med if med else 0.0,
                          "walls": passes}
    return baseline, cells, greedy_ref


def verify_cost(target: CachedLM, n: int) -> float | None:
    """v(n): median target forward over n tokens or tree nodes (a verification of n-1 drafts plus the
    root) / median target decode step. MAL/(gamma*c + 1) assumes 1; at batch 1 on a CPU a multi-token
    forward costs more, and MAL/(gamma*c + v) is the speedup the engine can reach on this machine."""
    times = target.verify_times.get(n)
    if n == 1:
        return 1.0 if target.step_times else None
    if not times or not target.step_times:
        return None
    return statistics.median(times) / statistics.median(target.step_times)


def c_measured(drafter: CachedLM, target: CachedLM) -> float | None:
    """Median single-token decode forward of the drafter / the same of the target."""
    if not drafter.step_times or not target.step_times:
        return None
    return statistics.median(drafter.step_times) / statistics.median(target.step_times)


@torch.inference_mode()
def teacher_forced_mal(d: Drafter, requests: list[Request], greedy_ref: dict[str, list[int]],
                       gammas: list[int], max_new_tokens: int | None = None) -> dict[int, MalStats]:
    """Exact greedy chain rounds without drafting (docs/evaluate.md): one drafter forward over prompt +
    the target's greedy response gives the drafter's argmax at every response position; the rounds at
    each gamma follow from where it matches (sd2.mal.teacher_forced_rounds, with the engine's draft
    lengths under ``max_new_tokens``). Returns MalStats per gamma, the statistics the engine's rounds give."""
    model = d.lm.model

    def rounds_for(req, resp):
        ids = torch.tensor([req.ids + resp[:-1]], device=d.lm.device)
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=len(resp)).logits[0]
        idx = torch.argmax(d.vocab.cut(logits), dim=-1)
        pred = (d.vocab.map[idx] if d.vocab.map is not None else idx).tolist()
        match = [p == t for p, t in zip(pred, resp)]
        return lambda g: teacher_forced_rounds(match, g, max_new_tokens)

    return teacher_forced_stats(requests, greedy_ref, gammas, rounds_for)
