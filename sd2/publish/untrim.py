"""A full-vocabulary equivalent of a trimmed-vocabulary drafter, loadable by plain transformers/vLLM.

A trimmed drafter (docs/CONTRACTS.md "Trimmed-vocabulary drafters") has an lm_head of K rows over
the kept target tokens. transformers' ``assistant_model`` and vLLM's draft models expect logits over
the full vocabulary V, so we publish a V-row lm_head: the K kept rows in their target positions,
and one *filler* row in every dropped position.

Why not zero rows: a Llama lm_head has no bias, so a zero row gives logit 0, and it wins the argmax
whenever every kept logit is negative, which happens. The exact construction: the largest kept
logit, max_k w_k·h, is the support function of the convex hull of the kept rows, so a row u never
exceeds it for any hidden state h if and only if u lies in that hull. We take

    u = (1 - eps) * w_j + eps * mean_k(w_k)

a point inside the hull: u·h <= max_k w_k·h, with equality only when all K kept logits are equal.
So the greedy proposal of the exported model is the trimmed drafter's ``map[argmax]`` for every h
short of that degenerate tie. j is the kept row with the lowest mean logit on a short probe text,
which keeps the filler logit low and so keeps the probability that sampling (temperature > 0)
gives to dropped tokens small; it is not zero, unlike the trimmed drafter's q. Speculative
decoding stays lossless whatever the drafter proposes: only acceptance at temperature > 0 can move.
"""

from __future__ import annotations

EPS = 0.05
PROBE = [
    "Write a short story about a robot who learns to paint.",
    "Explain how speculative decoding works, step by step.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "What is 12 + 30? Think it through and give the answer.",
]


def probe_ids(tokenizer, max_len: int = 256):
    """Token ids of a short built-in probe text, through the chat template when there is one."""
    import torch

    rows = []
    for text in PROBE:
        if getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                return_dict=True)["input_ids"]
        else:
            ids = tokenizer(text)["input_ids"]
        rows.extend(list(ids))
    return torch.tensor([rows[:max_len]], dtype=torch.long)


def untrim(model, tokenizer) -> dict:
    """Replace a trimmed drafter's K-row lm_head by the full-vocabulary equivalent, in place.
    Returns what was done and what it measured on the probe text."""
    import torch
    import torch.nn as nn

    from sd2 import vocab
    from sd2.modeling import untie_lm_head

    ids = vocab.draft_to_target(model)
    full_v = int(model.config.sd2_vocab["full_vocab_size"])
    head = model.get_output_embeddings()
    w = head.weight.detach().float()
    probe = probe_ids(tokenizer).to(w.device)
    with torch.no_grad():
        kept_logits = model(probe).logits[0].float()          # [T, K]
    j = int(kept_logits.mean(0).argmin())
    filler = (1 - EPS) * w[j] + EPS * w.mean(0)
    full = filler.expand(full_v, -1).clone()
    full[ids] = w
    new = nn.Linear(w.shape[1], full_v, bias=False, dtype=head.weight.dtype, device=head.weight.device)
    with torch.no_grad():
        new.weight.copy_(full.to(head.weight.dtype))
    untie_lm_head(model, new)
    if hasattr(model, vocab._ATTR):
        delattr(model, vocab._ATTR)        # so save_model writes no draft_to_target.json
    cfg = model.config
    if hasattr(cfg, vocab.CONFIG_KEY):
        delattr(cfg, vocab.CONFIG_KEY)
    cfg.vocab_size = full_v

    with torch.no_grad():
        logits = model(probe).logits[0].float()               # [T, V]
    agree = (logits.argmax(-1) == ids.to(logits.device)[kept_logits.argmax(-1)]).float().mean().item()
    dropped = torch.ones(full_v, dtype=torch.bool, device=logits.device)
    dropped[ids.to(logits.device)] = False
    dropped_mass = logits.softmax(-1)[:, dropped].sum(-1).mean().item()
    return {"draft_vocab_size": int(ids.numel()), "full_vocab_size": full_v, "filler_from_token": int(ids[j]),
            "epsilon": EPS, "probe_tokens": int(probe.shape[1]), "probe_greedy_agreement": agree,
            "probe_dropped_mass_t1": dropped_mass, "kept_ids": ids.tolist()}
