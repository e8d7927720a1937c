"""The head module: EAGLE-1/2 and FSPAD feature-level drafters over a frozen target.

Sources: Li et al., "EAGLE: Speculative Sampling Requires Rethinking Feature Uncertainty" (2024);
Gui et al., "Boosting Lossless Speculative Decoding via Feature Sampling and Partial Alignment
Distillation" (FSPAD, 2024). Both read, at head position t, the embedding of token x_{t+1} and the
target's feature f_t (its last hidden state after the final norm, the vector its lm_head reads),
and predict the target's next feature f_{t+1}, whose lm_head logits predict x_{t+2}.

- eagle: h = fc([e(x_{t+1}); f_t]) -> L Llama decoder layers (layer 0 without input norm) -> h'.
  h' is both the predicted feature and what the target's lm_head reads.
- fspad: h = fc([e; f]); feature sampling h += down(SiLU(gate(e)) * up(RMSNorm(h))) (the token's
  embedding drives the gate); each decoder layer's MLP outputs 2d on the residual [h; h]. Partial
  alignment: the first half feeds the lm_head, the second half is regressed onto f_{t+1} and is the
  feature fed back when drafting.

Attention is our own few lines over ``F.scaled_dot_product_attention`` with an explicit boolean
mask on every call (causal, tree or cached), never ``attention_mask=None``: a transformers 5.17
``LlamaDecoderLayer`` whose config leaves ``_attn_implementation`` unset, called with
``attention_mask=None``, attends NON-causally (a later position changes earlier outputs), which
silently trains a head on the future. tests/test_heads.py checks causality bitwise. Parameter names
follow Llama's (``layers.0.self_attn.q_proj.weight``...), which is what vLLM's EAGLE loader reads.

The target's input embeddings and lm_head are shared and frozen; they are not part of the head's
state dict, except a trimmed K-row lm_head (``lm_head.weight`` + ``d2t``), which is the head's own.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

@dataclass
class HeadConfig:
    """Everything needed to rebuild a head (stored as ``config.json["sd2_head"]``)."""

    type: str                       # eagle | fspad: the head stage's Config.type
    hidden_size: int                # d: the target's hidden size
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int                 # the target's vocabulary V (embeddings, full lm_head)
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    fc_bias: bool = True
    draft_vocab_size: int | None = None   # K for a trimmed head output layer, None: the target's lm_head
    target: str = ""                # the target's reference (folder or hub id)
    target_fingerprint: str = ""
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "HeadConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    @classmethod
    def for_target(cls, head_type: str, target_config, num_layers: int = 1, fc_bias: bool | None = None,
                   target: str = "", target_fingerprint: str = "") -> "HeadConfig":
        """A head sized like one of the target's decoder layers (the EAGLE convention). ``head_type``:
        one of the head stage's ``Config.type`` (sd2/stages/head.py), which checks it."""
        c = target_config.get_text_config() if hasattr(target_config, "get_text_config") else target_config
        d = c.hidden_size
        n_heads = c.num_attention_heads
        rope = getattr(c, "rope_parameters", None) or {}
        theta = float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0)) or 10000.0)
        return cls(type=head_type, hidden_size=d, num_layers=num_layers, num_attention_heads=n_heads,
                   num_key_value_heads=getattr(c, "num_key_value_heads", None) or n_heads,
                   head_dim=getattr(c, "head_dim", None) or d // n_heads,
                   intermediate_size=getattr(c, "intermediate_size", None) or 4 * d,
                   vocab_size=c.vocab_size, rms_norm_eps=float(getattr(c, "rms_norm_eps", 1e-5)),
                   rope_theta=theta,
                   # vLLM's EAGLE-1 loader builds fc without a bias (and skips unknown weights), so an
                   # exportable eagle head has none; FSPAD's reference fc has one.
                   fc_bias=(head_type == "fspad") if fc_bias is None else fc_bias,
                   target=target, target_fingerprint=target_fingerprint)


def rope(positions: torch.Tensor, head_dim: int, theta: float, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each [..., head_dim], Llama's default rotary embedding (half-rotation layout)."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim))
    ang = positions.to(torch.float32)[..., None] * inv
    emb = torch.cat([ang, ang], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rot * sin


class Attention(nn.Module):
    def __init__(self, c: HeadConfig, in_features: int | None = None):
        """``in_features``: the width q/k/v read (default d; EAGLE-3's first layer reads 2d)."""
        super().__init__()
        self.c = c
        d, h, kv, hd = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
        d_in = in_features or d
        self.q_proj = nn.Linear(d_in, h * hd, bias=False)
        self.k_proj = nn.Linear(d_in, kv * hd, bias=False)
        self.v_proj = nn.Linear(d_in, kv * hd, bias=False)
        self.o_proj = nn.Linear(h * hd, d, bias=False)

    def forward(self, x, cos, sin, mask, cache: list | None):
        """x [B, T, d]; mask bool [B or 1, 1, T, S] (True = attend), S = cached + T keys.
        ``cache`` is a [k, v] pair (each [B, kv, S_old, hd]) extended in place, or None."""
        c = self.c
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, c.num_attention_heads, c.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        q, k = _rotate(q, cos[:, None], sin[:, None]), _rotate(k, cos[:, None], sin[:, None])
        if cache is not None:
            if cache[0] is not None:
                k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
            cache[0], cache[1] = k, v
        rep = c.num_attention_heads // c.num_key_value_heads
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    """SwiGLU; ``out`` lets FSPAD's layer emit 2d."""

    def __init__(self, d: int, inter: int, out: int):
        super().__init__()
        self.gate_proj = nn.Linear(d, inter, bias=False)
        self.up_proj = nn.Linear(d, inter, bias=False)
        self.down_proj = nn.Linear(inter, out, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, c: HeadConfig, index: int):
        super().__init__()
        d = c.hidden_size
        self.index = index
        self.split = c.type == "fspad" and index == c.num_layers - 1   # partial alignment on the last layer
        if index > 0:   # EAGLE: the fused input of layer 0 is not normalised
            self.input_layernorm = nn.RMSNorm(d, eps=c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = nn.RMSNorm(d, eps=c.rms_norm_eps)
        self.mlp = MLP(d, c.intermediate_size, 2 * d if self.split else d)

    def forward(self, h, cos, sin, mask, cache):
        x = self.input_layernorm(h) if self.index > 0 else h
        h = h + self.self_attn(x, cos, sin, mask, cache)
        residual = torch.cat([h, h], dim=-1) if self.split else h
        return residual + self.mlp(self.post_attention_layernorm(h))


class FeatureSampling(nn.Module):
    """FSPAD's feature sampling: h + down(SiLU(gate(e)) * up(RMSNorm(h)))."""

    def __init__(self, c: HeadConfig):
        super().__init__()
        d = c.hidden_size
        self.norm = nn.RMSNorm(d, eps=c.rms_norm_eps)
        self.gate_proj = nn.Linear(d, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(d, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, d, bias=False)

    def forward(self, h, e):
        return h + self.down_proj(F.silu(self.gate_proj(e)) * self.up_proj(self.norm(h)))


class HeadCore(nn.Module):
    """The trainable part: fc (+ feature sampling) and the decoder layer(s)."""

    def __init__(self, c: HeadConfig):
        super().__init__()
        self.fc = nn.Linear(2 * c.hidden_size, c.hidden_size, bias=c.fc_bias)
        self.fs = FeatureSampling(c) if c.type == "fspad" else None
        self.layers = nn.ModuleList([DecoderLayer(c, i) for i in range(c.num_layers)])


class Head(nn.Module):
    """A feature-level drafter bound to its target's (frozen, shared) embeddings and lm_head.

    ``self.model`` holds the trainable weights (so ``model.layers`` is where sd2's decoder-layer
    tools look); ``embed`` and ``target_lm_head`` are the target's own modules, excluded from the
    head's state dict. A trimmed head owns ``lm_head`` (K rows) and the buffer ``d2t`` [K].
    """

    def __init__(self, c: HeadConfig, embed: nn.Embedding, lm_head: nn.Linear):
        super().__init__()
        self.head_config = c
        self.model = HeadCore(c)
        object.__setattr__(self, "embed", embed)              # shared, not a submodule: not saved, not trained
        object.__setattr__(self, "target_lm_head", lm_head)
        for p in list(embed.parameters()) + list(lm_head.parameters()):
            p.requires_grad_(False)
        self.lm_head: nn.Linear | None = None
        self.register_buffer("d2t", None, persistent=True)
        if c.draft_vocab_size is not None:
            self.lm_head = nn.Linear(c.hidden_size, c.draft_vocab_size, bias=False)
            self.d2t = torch.zeros(c.draft_vocab_size, dtype=torch.long)

    # -- the pieces sd2's generic tools use ---------------------------------------------------
    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head if self.lm_head is not None else self.target_lm_head

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def linears(self):
        """(name, nn.Linear) of every trainable linear map: fc, feature sampling, the layers."""
        for name, mod in self.model.named_modules():
            if isinstance(mod, nn.Linear):
                yield f"model.{name}", mod

    def trim(self, keep_ids) -> None:
        """Give the head its own K-row output layer: the target's lm_head rows ``keep_ids``."""
        keep = torch.as_tensor(sorted(set(int(i) for i in keep_ids)), dtype=torch.long)
        w = self.target_lm_head.weight
        self.lm_head = nn.Linear(w.shape[1], keep.numel(), bias=False, dtype=w.dtype, device=w.device)
        with torch.no_grad():
            self.lm_head.weight.copy_(w[keep.to(w.device)])
        self.d2t = keep.to(w.device)
        self.head_config.draft_vocab_size = int(keep.numel())

    # -- compute ------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, features: torch.Tensor, positions: torch.Tensor,
                mask: torch.Tensor | None = None, cache: list | None = None,
                feature_noise: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass over T head positions.

        input_ids [B, T] (token x_{t+1}), features [B, T, d] (f_t), positions [B, T] (rotary).
        mask: bool [B or 1, 1, T, S] (True = attend), S = cached keys + T; None means causal over
        the T new positions after every cached one (built here, explicitly). cache: a list of
        [k, v] pairs, one per layer, extended in place (see ``new_cache``).
        Returns (logit_hidden, next_feature), each [B, T, d]; for eagle they are the same tensor.
        """
        c = self.head_config
        e = self.embed(input_ids).to(features.dtype)
        if feature_noise:
            features = features + (torch.rand_like(features) * 2 - 1) * feature_noise
        h = self.model.fc(torch.cat([e, features], dim=-1))
        if self.model.fs is not None:
            h = self.model.fs(h, e)
        if mask is None:
            past = cache[0][0].shape[2] if cache is not None and cache[0][0] is not None else 0
            t = input_ids.shape[1]
            mask = torch.ones(t, past + t, dtype=torch.bool, device=h.device).tril(past)[None, None]
        cos, sin = rope(positions, c.head_dim, c.rope_theta, h.dtype)
        for i, layer in enumerate(self.model.layers):
            h = layer(h, cos, sin, mask, cache[i] if cache is not None else None)
        if c.type == "fspad":
            return h[..., : c.hidden_size], h[..., c.hidden_size:]
        return h, h

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., d] -> [..., K or V] over the head's output vocabulary (map with ``d2t`` if trimmed)."""
        return self.get_output_embeddings()(hidden)

    def new_cache(self) -> list:
        return [[None, None] for _ in range(self.head_config.num_layers)]


def crop_cache(cache: list, length: int) -> None:
    """Keep the first ``length`` positions of every layer's keys and values, in place."""
    for kv in cache:
        if kv[0] is not None and kv[0].shape[2] > length:
            kv[0], kv[1] = kv[0][:, :, :length], kv[1][:, :, :length]


def cache_len(cache: list) -> int:
    return 0 if not cache or cache[0][0] is None else cache[0][0].shape[2]
