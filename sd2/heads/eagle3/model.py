"""The EAGLE-3 head: a one-layer drafter over a fusion of the target's low, middle and high hidden states.

Source: Li et al., "EAGLE-3: Scaling up Inference Acceleration of Large Language Models via
Training-Time Test" (arXiv 2503.01840); the layout and norms follow vLLM's
``vllm/model_executor/models/llama_eagle3.py`` (``Eagle3LlamaForCausalLM``) and speculators'
``Eagle3DraftModel`` (the versions checked: docs/eagle3.md).

At head position t the head reads the token x_{t+1} and a hidden vector g_t, and predicts x_{t+2}:
- from the target, g_t = fc([a_{k1}(t); a_{k2}(t); a_{k3}(t)]) where a_k(t) is the target's hidden
  state after k decoder layers at position t (before the final norm; ``aux_layers`` = (k1, k2, k3),
  default (2, N//2, N-3) for a target of N layers); ``fc: 3 H_target -> H`` without a bias;
- from itself (later draft steps), g_t is the head's own previous output ``prenorm`` (below).
Layer 0: ``x = [input_layernorm(embed(x_{t+1})); hidden_norm(g)]`` (2H wide; q/k/v read 2H),
``h = r + attn(x)`` with r = g (``norm_before_residual: false``, EAGLE-3's and speculators' default) or
hidden_norm(g) (true), then ``h = h + mlp(post_attention_layernorm(h))``. Further layers are plain
Llama layers. ``prenorm`` = the last layer's output (what is fed back), ``norm(prenorm)`` is what
``lm_head`` [K, H] reads: logits over the head's own draft vocabulary of K tokens; draft id i is
target id ``i + d2t[i]``, and ``t2d`` [V] marks the kept target ids.

Optional FSPAD feature sampling (``feature_sampling``; Gui et al. 2024, as sd2.heads.model does it
for ``fspad``): g <- g + down(SiLU(gate(e)) * up(RMSNorm(g))) on every step's hidden input, target's
or own, with the token's embedding e driving the gate. vLLM has no such block: such a head runs in
sd2 only (export refuses it).

Attention is sd2.heads.model's explicit-mask SDPA (causal masks are always built explicitly: a
transformers ``LlamaDecoderLayer`` called with ``attention_mask=None`` attends non-causally).
Parameter names are those vLLM's loader reads: ``fc.weight``, ``layers.0.{hidden_norm,
input_layernorm, post_attention_layernorm}.weight``, ``layers.0.self_attn.{q,k,v,o}_proj.weight``,
``layers.0.mlp.{gate,up,down}_proj.weight``, ``norm.weight``, ``lm_head.weight``, ``d2t``, ``t2d``.
The target's input embeddings are shared and frozen, not part of the state dict.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from sd2.heads.eagle3.draft_vocab import DraftVocabMap
from sd2.heads.model import MLP, Attention, DecoderLayer, FeatureSampling, rope

N_AUX = 3   # vLLM's fc reads exactly three target hidden states (3 x target_hidden_size)


def default_aux_layers(num_layers: int) -> tuple[int, int, int]:
    """EAGLE-3's default (2, N//2, N-3) for a target of N decoder layers (not validated here)."""
    return (2, num_layers // 2, num_layers - 3)


def resolve_aux_layers(aux_layers, num_layers: int) -> tuple[int, ...]:
    """The validated auxiliary layer ids for a target of ``num_layers`` decoder layers.

    ``aux_layers`` None means EAGLE-3's default (2, N//2, N-3). Id k is the target's hidden state
    after k decoder layers (the input of layer k), so 1 <= k <= N-1 (k = 0 would be the embeddings,
    which vLLM's Llama collects as ``hidden_states + residual`` with no residual yet). Exactly three
    strictly increasing ids: vLLM's fc reads three, concatenated in layer order whatever order the
    config lists them in. Raises ValueError naming ``aux_layers`` and a fix (a target with N < 7
    layers makes the default collide)."""
    ids = default_aux_layers(num_layers) if aux_layers is None else tuple(int(k) for k in aux_layers)
    given = "the default (2, N//2, N-3) = " if aux_layers is None else ""
    fix = (f"give aux_layers as {N_AUX} strictly increasing ids in [1, {num_layers - 1}]"
           + (f", e.g. {list(range(max(1, num_layers - N_AUX), num_layers))}" if num_layers > N_AUX else
              f"; a target needs at least {N_AUX + 1} decoder layers for EAGLE-3"))
    if len(ids) != N_AUX:
        raise ValueError(f"aux_layers {list(ids)}: EAGLE-3 fuses exactly {N_AUX} target layers (vLLM's fc reads "
                         f"{N_AUX} x target_hidden_size); {fix}")
    if any(k < 1 or k >= num_layers for k in ids):
        raise ValueError(f"aux_layers {given}{list(ids)} fall outside the target's {num_layers} decoder layers "
                         f"(id k = the hidden state after k layers, 1 <= k <= {num_layers - 1}); {fix}")
    if any(b <= a for a, b in zip(ids, ids[1:])):
        raise ValueError(f"aux_layers {given}{list(ids)} collide or are out of order for a target of {num_layers} "
                         f"decoder layers; {fix}")
    return ids


@dataclass
class Eagle3Config:
    """Everything needed to rebuild an EAGLE-3 head."""

    hidden_size: int                # H: the head's width, = the target's (it reads the target's embeddings)
    target_hidden_size: int         # the width of each fused target hidden state
    target_num_layers: int          # N
    aux_layers: tuple[int, ...]
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int                 # V: the target's vocabulary (embeddings, t2d)
    draft_vocab_size: int           # K: rows of the head's lm_head
    num_layers: int = 1
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 8192
    norm_before_residual: bool = False
    feature_sampling: bool = False
    target: str = ""
    target_fingerprint: str = ""
    type: str = "eagle3"            # read by the shared DecoderLayer (only "fspad" changes it)
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.aux_layers = resolve_aux_layers(self.aux_layers, self.target_num_layers)
        if not 1 <= self.draft_vocab_size <= self.vocab_size:
            raise ValueError(f"draft_vocab_size {self.draft_vocab_size} must be in [1, {self.vocab_size}] (the "
                             "target's vocabulary size)")
        if self.num_layers < 1:
            raise ValueError(f"num_layers {self.num_layers} must be >= 1")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["aux_layers"] = list(self.aux_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Eagle3Config":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    @classmethod
    def for_target(cls, target_config, draft_vocab_size: int, aux_layers=None, num_layers: int = 1,
                   feature_sampling: bool = False, norm_before_residual: bool = False, target: str = "",
                   target_fingerprint: str = "") -> "Eagle3Config":
        """A head whose layer is sized like one of the target's decoder layers (the EAGLE convention)."""
        c = target_config.get_text_config() if hasattr(target_config, "get_text_config") else target_config
        n_heads = c.num_attention_heads
        rope_params = getattr(c, "rope_parameters", None) or {}
        theta = float(rope_params.get("rope_theta", getattr(c, "rope_theta", 10000.0)) or 10000.0)
        return cls(hidden_size=c.hidden_size, target_hidden_size=c.hidden_size, target_num_layers=c.num_hidden_layers,
                   aux_layers=aux_layers, num_attention_heads=n_heads,
                   num_key_value_heads=getattr(c, "num_key_value_heads", None) or n_heads,
                   head_dim=getattr(c, "head_dim", None) or c.hidden_size // n_heads,
                   intermediate_size=getattr(c, "intermediate_size", None) or 4 * c.hidden_size,
                   vocab_size=c.vocab_size, draft_vocab_size=draft_vocab_size, num_layers=num_layers,
                   rms_norm_eps=float(getattr(c, "rms_norm_eps", 1e-5)), rope_theta=theta,
                   max_position_embeddings=int(getattr(c, "max_position_embeddings", 8192) or 8192),
                   norm_before_residual=norm_before_residual, feature_sampling=feature_sampling,
                   target=target, target_fingerprint=target_fingerprint)


class FirstLayer(nn.Module):
    """EAGLE-3's layer 0: attention over [input_layernorm(e); hidden_norm(g)] (2H wide)."""

    def __init__(self, c: Eagle3Config):
        super().__init__()
        d = c.hidden_size
        self.norm_before_residual = c.norm_before_residual
        self.hidden_norm = nn.RMSNorm(d, eps=c.rms_norm_eps)
        self.input_layernorm = nn.RMSNorm(d, eps=c.rms_norm_eps)
        self.self_attn = Attention(c, in_features=2 * d)
        self.post_attention_layernorm = nn.RMSNorm(d, eps=c.rms_norm_eps)
        self.mlp = MLP(d, c.intermediate_size, d)

    def forward(self, e, g, cos, sin, mask, cache):
        gn = self.hidden_norm(g)
        residual = gn if self.norm_before_residual else g
        h = residual + self.self_attn(torch.cat([self.input_layernorm(e), gn], dim=-1), cos, sin, mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Eagle3Head(nn.Module):
    """The EAGLE-3 head bound to its target's (frozen, shared) input embeddings.

    ``embed`` is the target's module, excluded from the state dict. The draft vocabulary lives in the
    buffers ``d2t`` [K] (offsets) and ``t2d`` [V] (bool); set it with ``set_draft_vocab``.
    """

    def __init__(self, c: Eagle3Config, embed: nn.Embedding):
        super().__init__()
        if tuple(embed.weight.shape) != (c.vocab_size, c.hidden_size):
            raise ValueError(f"the target's embeddings are {list(embed.weight.shape)}, the head expects "
                             f"[{c.vocab_size}, {c.hidden_size}] (vocab_size, hidden_size): pair the head with its target")
        self.head_config = c
        self.fc = nn.Linear(len(c.aux_layers) * c.target_hidden_size, c.hidden_size, bias=False)
        self.fs = FeatureSampling(c) if c.feature_sampling else None
        self.layers = nn.ModuleList([FirstLayer(c)] + [DecoderLayer(c, i) for i in range(1, c.num_layers)])
        self.norm = nn.RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(c.draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.zeros(c.vocab_size, dtype=torch.bool))
        object.__setattr__(self, "embed", embed)     # shared, not a submodule: not saved, not trained
        for p in embed.parameters():
            p.requires_grad_(False)

    # -- the draft vocabulary ---------------------------------------------------------------------
    def set_draft_vocab(self, vmap: DraftVocabMap) -> None:
        """Install ``vmap`` as d2t/t2d. Raises ValueError when it was made for another target
        vocabulary or holds another number of tokens than the head's lm_head rows."""
        c = self.head_config
        vmap.check_target(c.vocab_size)
        if vmap.k != c.draft_vocab_size:
            raise ValueError(f"the draft vocabulary map holds {vmap.k} tokens, the head's lm_head has "
                             f"draft_vocab_size = {c.draft_vocab_size} rows")
        self.d2t = vmap.d2t().to(self.d2t.device)
        self.t2d = vmap.t2d().to(self.t2d.device)

    def draft_vocab(self) -> DraftVocabMap:
        """The installed map (checked: d2t and t2d agree)."""
        return DraftVocabMap.from_buffers(self.d2t, self.t2d)

    def draft_to_target(self) -> torch.Tensor:
        """[K] long: the target id of every draft id (``arange(K) + d2t``)."""
        return torch.arange(self.d2t.numel(), device=self.d2t.device) + self.d2t

    # -- compute ----------------------------------------------------------------------------------
    def fuse(self, aux: torch.Tensor) -> torch.Tensor:
        """[..., 3 H_target] (the target's aux hidden states, concatenated in layer order) -> [..., H]."""
        want = self.fc.in_features
        if aux.shape[-1] != want:
            raise ValueError(f"the fused target hidden states are {aux.shape[-1]} wide, the head's fc reads {want} "
                             f"({len(self.head_config.aux_layers)} layers x {self.head_config.target_hidden_size})")
        return self.fc(aux.to(self.fc.weight.dtype))

    def forward(self, input_ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
                mask: torch.Tensor | None = None, cache: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass over T head positions.

        input_ids [B, T] (token x_{t+1}), hidden [B, T, H] (``fuse(aux)`` of the target, or the
        head's own ``prenorm`` of the step before), positions [B, T] (rotary). mask: bool
        [B or 1, 1, T, S] (True = attend), S = cached + T keys; None means causal over the T new
        positions after every cached one (built here, explicitly). cache: one [k, v] pair per layer,
        extended in place (``new_cache``). Returns (prenorm, normed), each [B, T, H]: ``prenorm`` is
        fed back as the next step's hidden, ``logits(normed)`` are over the draft vocabulary.
        """
        c = self.head_config
        e = self.embed(input_ids).to(hidden.dtype)
        if self.fs is not None:
            hidden = self.fs(hidden, e)
        if mask is None:
            past = cache[0][0].shape[2] if cache is not None and cache[0][0] is not None else 0
            t = input_ids.shape[1]
            mask = torch.ones(t, past + t, dtype=torch.bool, device=hidden.device).tril(past)[None, None]
        cos, sin = rope(positions, c.head_dim, c.rope_theta, hidden.dtype)
        h = self.layers[0](e, hidden, cos, sin, mask, cache[0] if cache is not None else None)
        for i, layer in enumerate(self.layers[1:], start=1):
            h = layer(h, cos, sin, mask, cache[i] if cache is not None else None)
        return h, self.norm(h)

    def logits(self, normed: torch.Tensor) -> torch.Tensor:
        """[..., H] -> [..., K] draft-vocabulary logits (target id = draft id + d2t[draft id])."""
        return self.lm_head(normed)

    def new_cache(self) -> list:
        return [[None, None] for _ in self.layers]

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def linears(self):
        """(name, nn.Linear) of every trainable linear map: fc, feature sampling, the layers, lm_head."""
        for name, mod in self.named_modules():
            if isinstance(mod, nn.Linear):
                yield name, mod


def build(target_model, draft_vocab: DraftVocabMap, aux_layers=None, num_layers: int = 1, seed: int = 0,
          feature_sampling: bool = False, norm_before_residual: bool = False, target_ref: str = "",
          target_fingerprint: str = "") -> Eagle3Head:
    """A fresh EAGLE-3 head for ``target_model`` (an HF Llama-family causal LM).

    Init, as speculators does: ``lm_head`` = the target's lm_head rows of the draft vocabulary and
    ``norm`` = the target's final norm (the head starts by reading its output the way the target
    does); every other weight torch's default. Raises ValueError for bad aux_layers or a map made
    for another vocabulary."""
    from sd2.modeling import decoder_layers

    cfg = Eagle3Config.for_target(target_model.config, draft_vocab.k, aux_layers, num_layers, feature_sampling,
                                  norm_before_residual, target_ref, target_fingerprint)
    torch.manual_seed(seed)
    head = Eagle3Head(cfg, target_model.get_input_embeddings())
    head.set_draft_vocab(draft_vocab)
    with torch.no_grad():
        if cfg.target_hidden_size == cfg.hidden_size:   # the highest fused layer starts near the identity
            d = cfg.hidden_size
            head.fc.weight.mul_(0.1)
            head.fc.weight[:, -d:].add_(torch.eye(d))
        w = target_model.get_output_embeddings().weight
        head.lm_head.weight.copy_(w[draft_vocab.keep.to(w.device)])
        parent, _, _ = decoder_layers(target_model)
        final_norm = getattr(parent, "norm", None)
        if final_norm is not None and getattr(final_norm, "weight", None) is not None:
            head.norm.weight.copy_(final_norm.weight)
    return head


@contextlib.contextmanager
def capturing_aux(target, aux_layers):
    """Within the block, ``caught[k]`` ([B, L, H], a dict yielded) is the target's hidden state after k
    decoder layers (the output of layer k-1, before the final norm) in its latest forward, for each k
    of ``aux_layers`` (ids not validated here); the forward hooks are removed on leaving."""
    from sd2.modeling import decoder_layers

    _, _, layers = decoder_layers(target)
    caught: dict[int, torch.Tensor] = {}

    def hook(k):
        def grab(_mod, _args, out):
            caught[k] = out[0] if isinstance(out, tuple) else out
        return grab

    handles = [layers[k - 1].register_forward_hook(hook(k)) for k in aux_layers]
    try:
        yield caught
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def target_aux(target, input_ids: torch.Tensor, aux_layers, attention_mask: torch.Tensor | None = None):
    """One target forward: (aux [B, L, 3 H_target], logits [B, L, V]).

    ``aux`` concatenates, in layer order, the target's hidden state after k decoder layers (the
    output of layer k-1, before the final norm) for each k of ``aux_layers``; ``logits`` are the
    target's next-token logits at every position (the teacher). Raises ValueError for bad ids."""
    from sd2.modeling import decoder_layers

    ids = resolve_aux_layers(aux_layers, len(decoder_layers(target)[2]))
    with capturing_aux(target, ids) as caught:
        logits = target(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    return torch.cat([caught[k] for k in ids], dim=-1), logits
