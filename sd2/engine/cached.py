"""A causal LM with its KV cache and the token ids the cache holds: what the round loop and the
model-based proposers drive. Every forward is counted and timed (the costs c and v(n)).

On CPU in float32 every Linear gets a prepacked oneDNN weight (sd2/engine/packed.py): a verify
forward over a few tokens then costs about one decode step instead of 1.5-2.

The cache is sd2/kvcache.py's in-place ``GrowingLayer`` cache (DynamicCache's per-step ``torch.cat``
copies the whole cache on every forward). Roll back is a crop for a chain and a gather for a tree:
after a tree round only the accepted path's keys and values stay, moved down to follow the prefix.

Tree verification (one forward over the root and every node): each node gets position
``past + depth`` and a 4D additive mask row that sees the cached prefix, the root and its own
ancestors. transformers 5.x uses a 4D ``attention_mask`` as given (``masking_utils``: "If the mask
is already 4D, simply return as-is"), with a cache as well; tests/test_engine_tree.py checks that a
tree forward's logits equal each path's own causal forward.

Features: with ``features=True`` the forward also returns the target's last hidden state, the one its
lm_head reads. transformers 5.x overwrites ``hidden_states[-1]`` with the model's
``last_hidden_state`` (after the final norm) for language models; tests/test_engine.py checks that
``lm_head(features) == logits``. With ``layers`` (a tuple of k, 0 <= k < N decoder layers) it returns
instead the hidden states after k decoder layers, before the final norm, concatenated in that order
(an EAGLE-3 head's auxiliary states): transformers records ``hidden_states[k]`` (k >= 1) with a forward
hook on decoder layer k-1, the hook ``sd2.heads.eagle3.model.target_aux`` uses, in the same forward
that gives the logits (tests/test_engine_eagle3.py checks them against ``target_aux``).
"""

from __future__ import annotations

import time

import torch

from sd2.engine.packed import pack_linears
from sd2.engine.proposer import ForwardCounter
from sd2.kvcache import growing_cache

CACHE_RESERVE = 256  # positions preallocated past the prompt; the cache doubles when a request runs longer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tree_mask(parents: list[int], past: int, dtype: torch.dtype, device) -> torch.Tensor:
    """The [1, 1, n+1, past+n+1] additive mask for a forward over [root] + n tree nodes: every row sees
    the ``past`` cached positions; the root sees itself; node i sees the root, its ancestors and itself.
    ``parents[i]`` is node i's parent index among the nodes, -1 for the root."""
    n = len(parents)
    see = torch.zeros(n + 1, n + 1, dtype=torch.bool)
    see[:, 0] = True
    for i, p in enumerate(parents):
        see[i + 1] = see[p + 1] if p >= 0 else see[0]
        see[i + 1, i + 1] = True
    full = torch.ones(n + 1, past + n + 1, dtype=torch.bool)
    full[:, past:] = see
    mask = torch.zeros(full.shape, dtype=dtype)
    mask.masked_fill_(~full, torch.finfo(dtype).min)
    return mask[None, None].to(device)


def tree_positions(parents: list[int], past: int) -> list[int]:
    """Position ids of [root] + nodes: the root at ``past``, a node at past + its depth."""
    pos = [past]
    for p in parents:
        pos.append((pos[p + 1] if p >= 0 else past) + 1)
    return pos


class CachedLM(ForwardCounter):
    """A causal LM, its KV cache, the ids the cache holds (``held``), and counters for every forward."""

    def __init__(self, model):
        self.model = model
        self.device = next(model.parameters()).device
        self.packed = pack_linears(model)   # Linears with a prepacked oneDNN weight (CPU fp32; sd2/engine/packed.py)
        self.start_counting()
        self.verify_times: dict[int, list[float]] = {}     # n-token forwards returning n logits: v(n)
        self.reset()

    def reset(self) -> None:
        self.cache = None
        self.held: list[int] = []

    def feature_width(self, layers: tuple[int, ...] | None = None) -> int:
        """The width of the features a forward returns: d, or d per layer of ``layers``."""
        return self.model.config.hidden_size * (len(layers) if layers else 1)

    def _features(self, hidden_states: tuple, layers: tuple[int, ...] | None) -> torch.Tensor:
        if layers is None:
            return hidden_states[-1][0]
        n = len(hidden_states) - 1                       # decoder layers; [n] is after the final norm
        bad = [k for k in layers if not 0 <= k < n]
        if bad:
            raise ValueError(f"feature layers {list(layers)}: ids {bad} are outside [0, {n - 1}] (the hidden state "
                             f"after k of the target's {n} decoder layers, before its final norm)")
        return torch.cat([hidden_states[k][0] for k in layers], dim=-1)

    def _run(self, ids: list[int], keep: int, parents: list[int] | None, features: bool,
             layers: tuple[int, ...] | None = None):
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        if self.cache is None:   # written in place: DynamicCache copies the whole cache on every forward
            self.cache = growing_cache(self.model.config, reserve=CACHE_RESERVE)
        kw = {}
        if parents is not None:
            past = len(self.held)
            kw["attention_mask"] = tree_mask(parents, past, self.model.dtype, self.device)
            kw["position_ids"] = torch.tensor([tree_positions(parents, past)], device=self.device)
        if features:
            kw["output_hidden_states"] = True
        sync(self.device)
        t0 = time.perf_counter()
        out = self.model(input_ids=x, past_key_values=self.cache, use_cache=True, logits_to_keep=keep, **kw)
        sync(self.device)
        dt = time.perf_counter() - t0
        self.count(len(ids), dt)
        if len(ids) > 1 and keep == len(ids):   # a verify forward (a prefill keeps only its last position)
            self.verify_times.setdefault(len(ids), []).append(dt)
        self.cache = out.past_key_values
        self.held.extend(ids)
        hidden = self._features(out.hidden_states, layers) if features else None
        return out.logits[0, -keep:], hidden

    def forward(self, ids: list[int], keep: int = 1) -> torch.Tensor:
        """Feed ``ids`` after the cached tokens; return the logits of the last ``keep`` positions [keep, V]."""
        return self._run(ids, keep, None, False)[0]

    def verify(self, ids: list[int], parents: list[int] | None = None, features: bool = False,
               layers: tuple[int, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Feed [root] + draft nodes in ONE forward; return (logits [len(ids), V], features
        [len(ids), feature_width(layers)] or None: the last hidden states, or those after each of
        ``layers`` (module docstring)). ``parents`` (for ids[1:], -1 = the root) makes it a tree
        forward; None is a chain (plain causal). Raises ValueError for a layer id outside the target."""
        return self._run(ids, len(ids), parents, features, layers)

    def prefill(self, ids: list[int], features: bool = False,
                layers: tuple[int, ...] | None = None) -> torch.Tensor | None:
        """Feed a prompt prefix keeping no logits; return its features [len(ids), feature_width(layers)]
        if asked (as ``verify``), None for no ids."""
        if not ids:
            return None
        return self._run(ids, 1, None, features, layers)[1]

    def crop(self, length: int) -> None:
        """Roll the cache back to its first ``length`` tokens. transformers 5.x: ``Cache.crop(n)``
        with a negative n removes |n| tokens (a positive n, the 4.x absolute length, is deprecated)."""
        extra = len(self.held) - length
        if extra > 0:
            self.cache.crop(-extra)
            del self.held[length:]

    def keep(self, start: int, positions: list[int]) -> None:
        """Keep cache positions [0, start) and then ``positions`` (ascending, each >= start), moved down
        to start, start+1, ...: the accepted path of a tree. A contiguous run is a plain crop."""
        if positions == list(range(start, start + len(positions))):
            self.crop(start + len(positions))
            return
        idx = torch.tensor(positions, device=self.device)
        m = len(positions)
        for layer in self.cache.layers:   # GrowingLayer.keys/values are views of its buffers: written in place
            layer.keys[:, :, start:start + m] = layer.keys.index_select(2, idx)
            layer.values[:, :, start:start + m] = layer.values.index_select(2, idx)
        self.held[start:start + m] = [self.held[p] for p in positions]
        self.crop(start + m)

    def sync_to(self, seq: list[int]) -> list[int]:
        """Keep the longest cached prefix of ``seq``; return the tokens still to feed (at least one,
        since the next logits come from feeding the last token)."""
        h = len(self.held)
        if h < len(seq) and self.held == seq[:h]:   # the usual case, compared at C speed
            return seq[h:]
        n = 0
        lim = min(h, len(seq) - 1)
        while n < lim and self.held[n] == seq[n]:
            n += 1
        self.crop(n)
        return seq[n:]
