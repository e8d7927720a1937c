"""vLLM's speculative-decoding counters as sd2's MAL and acceptance, and sd2's engine on vLLM's schedule.

vLLM (v1 scheduler, ``SpecDecodingStats``) counts, per verification step of a request: one draft,
``num_speculative_tokens`` draft tokens, the accepted ones (a prefix), and per position whether it was
accepted. Each step commits its accepted tokens plus one target token, so in sd2's definition
(sd2/mal.py: tokens committed / target forwards) MAL = 1 + accepted / drafts and the acceptance
rate = accepted / draft tokens; vLLM's log calls the first "mean acceptance length". vLLM counts
every accepted token of the last step, also those cut at ``max_tokens``. vLLM's ngram drafts
nothing when it finds no match, and such a step is no draft in vLLM's counters but is a target
forward in MAL's denominator: the engine-step counter gives the decode steps when requests are
served one at a time (sd2/serve/worker.py's ``one_by_one``, as evaluation serves them).

vLLM's rounds differ from sd2's engine's in two places: the prefill commits the first token with no
draft, and every step drafts the full γ (sd2's engine drafts fewer near ``max_new_tokens``).
``engine_rounds_on_vllm_schedule`` runs sd2's engine on exactly vLLM's rounds, so the two counts of
the same drafter on the same prompts compare one to one (up to the kernels' rounding).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

DRAFTS = "vllm:spec_decode_num_drafts"
DRAFT_TOKENS = "vllm:spec_decode_num_draft_tokens"
ACCEPTED = "vllm:spec_decode_num_accepted_tokens"
PER_POS = "vllm:spec_decode_num_accepted_tokens_per_pos"
STEPS = "vllm:iteration_tokens_total"      # a histogram with one observation per engine step


@dataclass
class SpecCounts:
    drafts: int = 0                  # verification steps that carried a draft
    draft_tokens: int = 0
    accepted: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)
    steps: int = 0                   # engine steps (prefills included); see ``decode_steps``
    decode_steps: int = 0            # target forwards after the prefills, drafted or not (set by the caller)

    @property
    def mal(self) -> float:
        """Tokens committed / target forwards. Each decode step commits its accepted tokens plus one;
        a step without a draft (vLLM's ngram finds no match) commits one. Without ``decode_steps``,
        every step is taken to carry a draft (draft_model and eagle always draft)."""
        steps = self.decode_steps or self.drafts
        return (steps + self.accepted) / steps if steps else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.draft_tokens if self.draft_tokens else 0.0

    def acceptance_per_position(self) -> list[float]:
        """sd2's per-position rate, over the drafts (for draft_model and eagle every draft is a full-γ
        chain; an ngram draft may be shorter, so its later positions are lower bounds)."""
        return [a / self.drafts if self.drafts else 0.0 for a in self.accepted_per_pos]

    def to_dict(self) -> dict:
        return {**asdict(self), "mal": self.mal, "acceptance_rate": self.acceptance_rate,
                "acceptance_per_position": self.acceptance_per_position()}

    def __sub__(self, other: "SpecCounts") -> "SpecCounts":
        n = max(len(self.accepted_per_pos), len(other.accepted_per_pos))
        pad = lambda v: list(v) + [0] * (n - len(v))  # noqa: E731
        return SpecCounts(self.drafts - other.drafts, self.draft_tokens - other.draft_tokens,
                          self.accepted - other.accepted,
                          [a - b for a, b in zip(pad(self.accepted_per_pos), pad(other.accepted_per_pos))],
                          self.steps - other.steps)


def read_counts(metrics) -> SpecCounts:
    """The counters in ``llm.get_metrics()`` (summed over engines and labels); zeros when absent."""
    c = SpecCounts()
    for m in metrics:
        if m.name == DRAFTS:
            c.drafts += int(m.value)
        elif m.name == DRAFT_TOKENS:
            c.draft_tokens += int(m.value)
        elif m.name == ACCEPTED:
            c.accepted += int(m.value)
        elif m.name == STEPS:
            c.steps += int(m.count)
        elif m.name == PER_POS:
            vals = [int(v) for v in m.values]
            c.accepted_per_pos = [a + b for a, b in zip(c.accepted_per_pos + [0] * len(vals), vals)] \
                if c.accepted_per_pos else vals
    return c


def engine_rounds_on_vllm_schedule(target, proposer, prompt: list[int], gamma: int, max_tokens: int,
                                   eos: set[int] | frozenset = frozenset()):
    """sd2's engine (greedy) on vLLM's rounds for one request of at most ``max_tokens`` tokens: the first
    token from the target alone (vLLM's prefill step), then rounds of a full γ draft until ``max_tokens``
    are committed or a committed token is in ``eos``, the last round's accepted tokens counted whole.
    Drafting runs on past a stop token, as vLLM's drafters do. Returns (the tokens vLLM outputs, the
    rounds as sd2.mal.Round)."""
    from sd2.engine.loop import generate, target_generate

    first = target_generate(target, prompt, 1, set()).tokens
    if first[0] in eos:
        return first, []
    # a budget that lets every counted round draft the full gamma: min(gamma, budget - done - 1) = gamma
    gen = generate(target, proposer, prompt + first, gamma, max_tokens + gamma, set())
    seq = first + gen.tokens
    out, rounds = 1, []
    for r in gen.rounds:
        if out >= max_tokens or any(t in eos for t in seq[:out]):
            break
        rounds.append(r)
        out += r.committed
    stop = next((i + 1 for i, t in enumerate(seq[:max_tokens]) if t in eos), max_tokens)
    return seq[:stop], rounds


def counts_of_rounds(rounds, gamma: int) -> SpecCounts:
    """sd2 engine rounds as vLLM would count them."""
    per = [sum(r.accepted >= i for r in rounds) for i in range(1, gamma + 1)]
    return SpecCounts(len(rounds), sum(r.drafted for r in rounds), sum(r.accepted for r in rounds), per)
