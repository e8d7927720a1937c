"""The round loop at batch size 1 (the Spec-Bench protocol), the same for every proposer.

One round = one target forward:
1. propose: the proposer turns the committed tokens (and, if it asks, the target's features) into a
   draft, a chain or a tree of at most ``max_depth`` levels (``sd2.engine.proposer``);
2. verify: the target reads [last committed token] + every draft node in ONE forward (a tree with a
   tree attention mask and per-node positions), returning logits at every node and, when the
   proposer wants them, its features from the same forward: the last hidden states, or the hidden
   states after the decoder layers the proposer names (``feature_layers``: an EAGLE-3 head's aux
   states); the loop keeps those of the accepted path;
3. accept: greedy walks the tree along the target's argmax; sampling runs recursive rejection over
   the children of each accepted node (``sd2.engine.sampling``), lossless for chains and trees;
4. commit the accepted path plus one target token (the correction, or the bonus token after the
   path's last node), except after an accepted EOS, which ends the request;
5. roll back: the target's cache keeps only the accepted path (a gather for a tree, a crop for a
   chain); the proposer syncs its own cache to the committed tokens when next asked.

Cache invariant: between rounds the target's cache holds every committed token but the last, which
is fed with the draft; so the prompt prefill is the only target forward outside a round, and
target-only decoding (``target_generate``) follows the same invariant: its forwards are the
single-token decode steps that c and v(n) are measured against.

``max_new_tokens`` caps the committed tokens: a round drafts at most (remaining - 1) levels, so its
committed tokens never exceed the budget.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from sd2.engine.cached import CachedLM, sync
from sd2.engine.proposer import Context, Draft, Proposer, Sampling
from sd2.engine.sampling import accept_greedy, accept_sampling, filtered_probs, sample
from sd2.mal import Round


@dataclass
class Generation:
    tokens: list[int]                          # the new tokens (EOS included when reached)
    rounds: list[Round] = field(default_factory=list)
    seconds: float = 0.0
    propose_seconds: float = 0.0               # time inside proposer.propose (the drafting cost)


def _check(draft: Draft, max_depth: int, vocab: int) -> None:
    if len(draft.parents) != len(draft.tokens):
        raise ValueError(f"draft has {len(draft.tokens)} tokens but {len(draft.parents)} parents")
    if any(not -1 <= p < i for i, p in enumerate(draft.parents)):
        raise ValueError(f"draft parents must point to an earlier node or -1 (topological order): {draft.parents}")
    if draft.tokens and max(draft.depths()) > max_depth:
        raise ValueError(f"draft depth {max(draft.depths())} exceeds max_depth {max_depth}")
    if any(not 0 <= t < vocab for t in draft.tokens):
        raise ValueError(f"draft token outside the target's vocabulary [0, {vocab}): {draft.tokens}")


@torch.inference_mode()
def target_generate(target: CachedLM, prompt: list[int], max_new_tokens: int, eos: set[int],
                    sampling: Sampling = Sampling(), gen: torch.Generator | None = None) -> Generation:
    """Plain autoregressive decoding with the target alone: the baseline and the lossless reference."""
    t0 = time.perf_counter()
    target.reset()
    target.prefill(prompt[:-1])
    seq = list(prompt)
    new: list[int] = []
    while len(new) < max_new_tokens:
        logits = target.forward([seq[-1]])[-1]
        tok = int(torch.argmax(logits)) if sampling.greedy else sample(filtered_probs(logits, sampling), gen)
        seq.append(tok)
        new.append(tok)
        if tok in eos:
            break
    sync(target.device)
    return Generation(new, [], time.perf_counter() - t0)


@torch.inference_mode()
def generate(target: CachedLM, proposer: Proposer, prompt: list[int], max_depth: int, max_new_tokens: int,
             eos: set[int], sampling: Sampling = Sampling(), gen: torch.Generator | None = None) -> Generation:
    """Speculative decoding of one request. Greedy (temperature 0) commits exactly the target's
    greedy tokens; with temperature > 0 the output distribution is exactly the target's (after the
    same top-k/top-p/min-p filtering)."""
    if max_depth < 1:
        raise ValueError(f"max_depth (gamma) must be >= 1, got {max_depth}")
    t0 = time.perf_counter()
    want = bool(proposer.wants_features)
    layers = getattr(proposer, "feature_layers", None) if want else None
    vocab = target.model.get_output_embeddings().weight.shape[0]
    target.reset()
    proposer.reset()
    feats = target.prefill(prompt[:-1], features=want, layers=layers)
    if want and feats is None:
        feats = torch.zeros(0, target.feature_width(layers), device=target.device)
    seq = list(prompt)
    n0 = len(seq)
    rounds: list[Round] = []
    spent = 0.0
    while len(seq) - n0 < max_new_tokens:
        k = min(max_depth, max_new_tokens - (len(seq) - n0) - 1)
        draft = Draft()
        if k > 0:
            tp = time.perf_counter()
            draft = proposer.propose(Context(seq, n0, feats), k, sampling, gen)
            spent += time.perf_counter() - tp
            _check(draft, k, vocab)
        chain = draft.is_chain
        logits, hidden = target.verify([seq[-1]] + draft.tokens, None if chain else draft.parents, want, layers)
        if sampling.greedy:
            path, nxt = accept_greedy(torch.argmax(logits, dim=-1).tolist(), draft)
        else:
            path, nxt = accept_sampling(filtered_probs(logits, sampling), draft, gen)
        cut = next((j for j, i in enumerate(path) if draft.tokens[i] in eos), None)
        if cut is not None:                 # nothing after an accepted EOS counts (a proposer should stop there)
            path = path[: cut + 1]
        new = [draft.tokens[i] for i in path]
        if not (new and new[-1] in eos):   # an accepted EOS ends the request: no bonus after it
            new.append(nxt)
        start = len(seq)                    # the root sits at start - 1, node i at start + i
        target.keep(start, [start + i for i in path])
        if want:
            feats = torch.cat([feats, hidden[[0] + [1 + i for i in path]]])
        seq.extend(new)
        rounds.append(Round(len(draft), len(path), len(new), max(draft.depths(), default=0)))
        if new[-1] in eos:
            break
    sync(target.device)
    return Generation(seq[n0:], rounds, time.perf_counter() - t0, spent)
