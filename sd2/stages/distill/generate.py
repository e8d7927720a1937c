"""The HF generation backend: batched decoding with left padding and a KV cache, in length buckets.

Why a small decoding loop of our own rather than ``model.generate``: on CPU the cost is dominated
by the rows still running, so a row that reached EOS or ``max_new_tokens`` is dropped from the
batch and from the KV cache at once (``Cache.batch_select_indices``, in place), instead of being carried as
padding until the longest answer ends. Prompts are sorted by length before batching, so a batch
pads little. The KV cache is written in place (sd2/kvcache.py): transformers' DynamicCache copies
the whole cache on every step, which measured a third of a batch-32 decode step on CPU. Attention
runs as "sd2_sdpa" (sd2/attention.py): transformers' sdpa copies a grouped-query model's KV cache
per head group whenever there is a padding mask. At temperature 0 decoding is greedy (argmax) and deterministic for a given batch.
"""

from __future__ import annotations

from dataclasses import dataclass

from sd2.engine.proposer import Sampling as Distribution


@dataclass(frozen=True)
class Sampling(Distribution):
    """What distill decodes under: the engine's next-token distribution (temperature 0 = greedy,
    top_p, ...), plus the answer's length limit and its stop ids."""
    max_new_tokens: int = 0
    stop_ids: tuple[int, ...] = ()


@dataclass
class Generated:
    ids: list[int]                 # generated token ids, the stop token included when it was produced
    stopped: bool                  # ended on a stop token (False: cut at max_new_tokens)


def length_buckets(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first, so memory peaks early), as few
    batches as ``batch_size`` allows and of near-equal sizes: 80 prompts at batch_size 64 make two
    batches of 40, not 64 and 16 (a 16-row batch decodes at about half the tokens/s of a 40-row one
    on the 2-core Xeon: benchmarks/results/distill_throughput.md)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    n = -(-len(order) // batch_size) if order else 0
    cuts = [len(order) * k // n for k in range(n + 1)] if n else [0]
    return [order[a:b] for a, b in zip(cuts, cuts[1:])]


PREFILL_ROWS = 8  # the most rows prefilled together (see HFGenerator._prefill)
CHUNK_COST = 32   # a prefill chunk's fixed cost in padded-token equivalents (one more pass over the weights);
                  # chosen, not tuned: it only sets how much padding a chunk may carry before splitting pays
MIN_SHARED_PREFIX = 8  # a batch's common prompt start is computed once when at least this long


def prefill_chunks(lengths: list[int], max_rows: int) -> list[tuple[int, int]]:
    """Contiguous chunks [start, end) of a longest-first batch that minimise the padded tokens plus
    CHUNK_COST per chunk (dynamic programming over the split points, at most ``max_rows`` rows each).
    Fixed chunks of 8 prefilled 2,976 tokens for 1,963 real ones on 32 MT-bench prompts."""
    n = len(lengths)
    best = [0.0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for end in range(1, n + 1):
        for start in range(max(0, end - max_rows), end):
            cost = best[start] + CHUNK_COST + (end - start) * max(lengths[start:end])
            if cost < best[end]:
                best[end], cut[end] = cost, start
    chunks, end = [], n
    while end:
        chunks.append((cut[end], end))
        end = cut[end]
    return chunks[::-1]


def _shared_prefix(prompts: list[list[int]]) -> int:
    """Tokens every prompt starts with, leaving each prompt at least one token of its own (its
    last position's logits come from its own forward)."""
    n = min(len(p) for p in prompts) - 1
    first = prompts[0]
    for p in prompts[1:]:
        k = 0
        while k < n and p[k] == first[k]:
            k += 1
        n = k
    return max(n, 0)


class HFGenerator:
    """Generates answers to token prompts with a transformers causal LM."""

    def __init__(self, model, pad_id: int, sampling: Sampling, batch_size: int):
        from sd2.attention import use_grouped_sdpa

        use_grouped_sdpa(model)   # in place: padded batches otherwise copy the KV cache per head group (sd2/attention.py)
        self.model = model
        self.pad_id = pad_id
        self.sampling = sampling
        self.batch_size = batch_size

    def generate(self, prompts: list[list[int]], seed: int = 0, progress=None) -> list[Generated]:
        import torch

        gen = torch.Generator(device=self.model.device).manual_seed(seed)
        out: list[Generated | None] = [None] * len(prompts)
        for batch in length_buckets([len(p) for p in prompts], self.batch_size):
            for i, g in zip(batch, self._batch([prompts[i] for i in batch], gen)):
                out[i] = g
            if progress is not None:
                progress.update(len(batch))
        return out

    def _batch(self, prompts: list[list[int]], gen) -> list[Generated]:
        import torch

        s = self.sampling
        b = len(prompts)
        device = self.model.device
        stops = torch.tensor(s.stop_ids or (-1,), dtype=torch.long, device=device)
        rows = torch.arange(b, device=device)  # which prompt each live batch row answers
        answers: list[list[int]] = [[] for _ in range(b)]
        stopped = [False] * b
        with torch.inference_mode():
            cache, mask, logits, next_pos = self._prefill(prompts)
            for step in range(s.max_new_tokens):
                tok = self._pick(logits, gen)
                is_stop = torch.isin(tok, stops)
                for r, t, st in zip(rows.tolist(), tok.tolist(), is_stop.tolist()):
                    answers[r].append(t)
                    stopped[r] = st
                if step + 1 == s.max_new_tokens:
                    break
                live = ~is_stop
                if not live.any():
                    break
                if not live.all():              # drop finished rows from the batch and the cache
                    keep = live.nonzero().squeeze(-1)
                    cache.batch_select_indices(keep)
                    rows, tok, mask, next_pos = rows[keep], tok[keep], mask[keep], next_pos[keep]
                mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
                logits = self.model(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                                    past_key_values=cache, use_cache=True).logits[:, -1]
                next_pos = next_pos + 1
        return [Generated(a, st) for a, st in zip(answers, stopped)]

    def _prefill(self, prompts: list[list[int]], chunk_rows: int = 0, share: bool = True):
        """Prefill a length-sorted batch in chunks of at most PREFILL_ROWS rows (``prefill_chunks``), each
        padded only to its own longest prompt, then join the chunks' KV caches (left-padded with zeros, masked out) into
        one decode batch. With one long prompt in a batch of 32, padding every row to it made
        prefill ~3x the real tokens (MT-bench on SmolLM2: 7.8k padded for 2.7k real).

        The tokens every prompt of the batch starts with (a chat template's system prompt: 24 of
        SmolLM2's ~85-token MT-bench prompts) are run once, and their keys and values start every
        row's cache: [shared prefix | left padding | the row's own tokens], masked accordingly, with
        positions counted over the real tokens, so each row sees exactly its own prompt."""
        import torch

        from sd2.kvcache import GrowingLayer, growing_cache

        device = self.model.device
        cfg = self.model.config
        shared, prefix = (_shared_prefix(prompts) if share else 0), None
        if shared >= MIN_SHARED_PREFIX:
            prefix = growing_cache(cfg)
            self.model(input_ids=torch.tensor([prompts[0][:shared]], device=device), past_key_values=prefix,
                       use_cache=True, logits_to_keep=1)
            if not all(isinstance(layer, GrowingLayer) for layer in prefix.layers):
                return self._prefill(prompts, chunk_rows, share=False)   # sliding-window layers: no sharing
        else:
            shared = 0
        parts = []
        if chunk_rows:
            bounds = [(i, min(i + chunk_rows, len(prompts))) for i in range(0, len(prompts), chunk_rows)]
        else:
            bounds = prefill_chunks([len(p) - shared for p in prompts], PREFILL_ROWS)
        for start, end in bounds:
            chunk = [p[shared:] for p in prompts[start:end]]
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            own = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, p in enumerate(chunk):
                ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
                own[r, width - len(p):] = 1
            ids, own = ids.to(device), own.to(device)
            positions = shared + (own.cumsum(-1) - 1).clamp(min=0)
            mask = torch.cat([own.new_ones((len(chunk), shared)), own], dim=1)
            cache = growing_cache(cfg, reserve=self.sampling.max_new_tokens)
            if prefix is not None:
                for layer, src in zip(cache.layers, prefix.layers):
                    layer.lazy_initialization(src.keys, src.values)
                    layer.keys = src.keys.expand(len(chunk), -1, -1, -1)
                    layer.values = src.values.expand(len(chunk), -1, -1, -1)
                    layer._adopt()
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                                use_cache=True, logits_to_keep=1).logits[:, -1]
            parts.append((cache, mask, logits, positions[:, -1] + 1))
        if len(parts) == 1:
            return parts[0]
        if not all(isinstance(layer, GrowingLayer) for cache, *_ in parts for layer in cache.layers):
            return self._prefill(prompts, len(prompts), share=False)  # sliding-window or other layer kinds
        width = max(mask.shape[1] for _, mask, _, _ in parts)
        pad = torch.nn.functional.pad
        joined = parts[0][0]
        for i, layer in enumerate(joined.layers):
            layer.keys = torch.cat([pad(c.layers[i].keys, (0, 0, width - m.shape[1], 0)) for c, m, _, _ in parts])
            layer.values = torch.cat([pad(c.layers[i].values, (0, 0, width - m.shape[1], 0)) for c, m, _, _ in parts])
            layer._adopt()   # into a buffer with room for the answers, so decoding writes in place
        mask = torch.cat([pad(m, (width - m.shape[1], 0)) for _, m, _, _ in parts])
        return joined, mask, torch.cat([p[2] for p in parts]), torch.cat([p[3] for p in parts])

    def _pick(self, logits, gen):
        import torch

        from sd2.engine.sampling import filtered_probs

        if self.sampling.greedy:
            return logits.argmax(-1)
        return torch.multinomial(filtered_probs(logits, self.sampling), 1, generator=gen).squeeze(-1)


def topk_on_responses(model, rows: list[tuple[list[int], list[int]]], k: int, batch_size: int):
    """The model's top-k next-token logits where the next token is a generated one.

    rows: (input_ids, loss_mask) pairs. Returns, per row, (topk_ids, topk_logits): lists as long as
    input_ids whose entry t predicts input_ids[t+1] when loss_mask[t+1] == 1, and [] elsewhere.
    One forward of the decoder per batch; lm_head runs only on the positions kept.
    """
    import torch

    base, head = model.base_model, model.get_output_embeddings()
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        attn = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, (x, _) in enumerate(chunk):      # right padding: positions need no shift
            ids[r, :len(x)] = torch.tensor(x)
            attn[r, :len(x)] = 1
        ids, attn = ids.to(model.device), attn.to(model.device)
        with torch.inference_mode():
            hidden = base(input_ids=ids, attention_mask=attn).last_hidden_state
            for r, (x, m) in enumerate(chunk):
                pos = [t for t in range(len(x) - 1) if m[t + 1]]
                top_ids: list[list[int]] = [[] for _ in x]
                top_vals: list[list[float]] = [[] for _ in x]
                if pos:
                    logits = head(hidden[r, pos]).float()
                    vals, idx = logits.topk(min(k, logits.shape[-1]), dim=-1)
                    vals = vals.half().float()
                    for j, t in enumerate(pos):
                        top_ids[t] = idx[j].tolist()
                        top_vals[t] = vals[j].tolist()
                out.append((top_ids, top_vals))
    return out
