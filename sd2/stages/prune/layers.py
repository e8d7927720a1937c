"""Layer pruning by angular distance (Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper Layers").

For a block of n consecutive layers starting at l, the distance is
    d(l, n) = mean over real tokens of arccos(cos(x_l, x_{l+n})) / pi,
where x_l is the hidden state entering layer l (x_L leaves the last layer, before the final norm).
The block with the smallest d changes the residual stream least and is removed. The survivors are
renumbered (sd2.modeling.keep_layers), so the KV cache indexes them correctly.

Hidden states are taken with hooks on the decoder blocks rather than ``output_hidden_states``,
whose last entry is after the final norm in Llama-style models and so is not comparable.
These functions work on any model sd2.modeling.decoder_layers knows; derive can use them to pick
a target's layers by data instead of by position.
"""

from __future__ import annotations

import math


def _batches(samples: list[list[int]], pad_id: int, batch_size: int):
    """Right-padded (input_ids, attention_mask) batches, longest first to waste little padding."""
    import torch

    order = sorted(range(len(samples)), key=lambda i: -len(samples[i]))
    for start in range(0, len(order), batch_size):
        chunk = [samples[i] for i in order[start:start + batch_size]]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, s in enumerate(chunk):
            ids[row, :len(s)] = torch.tensor(s)
            mask[row, :len(s)] = 1
        yield ids, mask


def angular_distances(model, samples: list[list[int]], n: int, ctx=None, batch_size: int = 4) -> list[float]:
    """d(l, n) for l = 0 .. L-n, averaged over the real (non-padding) tokens of ``samples``."""
    import torch

    from sd2.modeling import decoder_layers

    _, _, layers = decoder_layers(model)
    n_layers = len(layers)
    if not 1 <= n < n_layers:
        raise ValueError(f"can remove 1 to {n_layers - 1} of the {n_layers} layers, not {n}")
    states: list = [None] * (n_layers + 1)

    def grab_input(i):
        def hook(_mod, args, kwargs):
            states[i] = args[0] if args else kwargs["hidden_states"]
        return hook

    def grab_output(_mod, _args, output):
        states[n_layers] = output[0] if isinstance(output, tuple) else output

    handles = [layer.register_forward_pre_hook(grab_input(i), with_kwargs=True) for i, layer in enumerate(layers)]
    handles.append(layers[-1].register_forward_hook(grab_output))
    sums = torch.zeros(n_layers - n + 1, dtype=torch.float64)
    tokens = 0
    pad_id = model.config.pad_token_id if isinstance(model.config.pad_token_id, int) else 0
    batches = list(_batches(samples, pad_id, batch_size))
    it = ctx.progress(batches, desc="angular distances", unit="batch") if ctx is not None else batches
    try:
        with torch.no_grad():
            for ids, mask in it:
                model.base_model(input_ids=ids, attention_mask=mask, use_cache=False)
                real = mask.bool()
                for start in range(n_layers - n + 1):
                    a, b = states[start].double(), states[start + n].double()
                    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1).clamp(-1.0, 1.0)
                    sums[start] += (torch.arccos(cos) / math.pi)[real].sum()
                tokens += int(real.sum())
    finally:
        for h in handles:
            h.remove()
    return (sums / max(tokens, 1)).tolist()


def prune_layers(model, samples: list[list[int]], n_remove: int, ctx=None) -> dict:
    """Remove the ``n_remove``-layer block with the smallest angular distance, in place.
    Returns what sparsity.json records: removed layers, kept layers and every block's distance."""
    from sd2.modeling import decoder_layers, keep_layers
    from sd2.core.errors import Sd2Error

    n_layers = len(decoder_layers(model)[2])
    if not 1 <= n_remove < n_layers:
        raise Sd2Error(f"prune layer: the model has {n_layers} decoder layers, so n_remove must be in "
                       f"[1, {n_layers - 1}] (keep_layers in [1, {n_layers - 1}]); got n_remove={n_remove}")
    dist = angular_distances(model, samples, n_remove, ctx)
    start = min(range(len(dist)), key=lambda i: dist[i])
    removed = list(range(start, start + n_remove))
    kept = [i for i in range(n_layers) if i not in removed]
    keep_layers(model, kept)
    if ctx is not None:
        ctx.log.info("layer pruning: removed layers %s (angular distance %.4f; range %.4f-%.4f)",
                     removed, dist[start], min(dist), max(dist))
    return {"removed_layers": removed, "kept_layers": kept, "source_layers": n_layers,
            "angular_distances": {str(i): round(d, 6) for i, d in enumerate(dist)}}
