"""Drafter kinds: what prune, trim_vocab, finetune and evaluate work through, whatever the drafter is.

Two kinds today:
- ``lm``: a standalone causal LM (a save_pretrained folder; sd2/drafters/lm.py);
- ``head``: a feature-level head over the target (EAGLE, FSPAD; sd2/heads/drafter.py).

The planner knows which kind each branch step receives (the drafter's ``head:``, a ``- head:``
step, or a local head folder, read once at validation; ``kind_of``), and every stage option that
needs a capability says so (``requires``), so a head-only option on a causal LM, or a causal-LM-only
method on a head, is a recipe error naming the field before any model loads. The stages then call
``load`` and use the ``Drafter`` protocol below; none asks which kind it holds.

A new drafter kind: a module with ``load(source, target=None, device="cpu", dtype=None) -> Drafter``
and ``recognizes(folder) -> bool``, and a ``Kind`` entry in ``KINDS``. A new head type (EAGLE-3, ...)
is not a new kind: it is a head (sd2/heads/, docs/heads.md).

This module imports neither torch nor a kind's module at import time (``sd2 validate`` reads it); a
kind's module is imported to ask it about a local folder (``kind_of``) or to load a drafter.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from sd2.core.errors import Sd2Error, did_you_mean


@dataclass(frozen=True)
class Kind:
    name: str
    module: str             # implements load() and recognizes()
    label: str              # how messages name it
    causal_lm: bool         # a whole causal LM: a stack of decoder layers to remove, a model llm-compressor's oneshot drives
    feature_level: bool     # reads the target's features (trained on them; drafts with them)


KINDS: dict[str, Kind] = {k.name: k for k in [
    Kind("lm", "sd2.drafters.lm", "a standalone causal LM", causal_lm=True, feature_level=False),
    Kind("head", "sd2.heads.drafter", "a feature-level head", causal_lm=False, feature_level=True),
]}
DEFAULT = "lm"
CAPABILITIES = {"causal_lm": "a standalone causal LM", "feature_level": "a feature-level head (a branch step - head: {type: eagle3 | eagle | fspad}, "
                                                          "or drafter: {head: eagle | fspad})"}


class Drafter(Protocol):
    """A drafter loaded for a stage. ``module`` holds the weights that prune and finetune change; ``V``
    (``vocab_size``) is the target-side vocabulary that ``d2t`` maps into. A kind that reads the target
    (``feature_level``) also gives evaluate its ``proposer``, ``settings`` and ``teacher_forced_mal``."""

    kind: str
    module: Any
    tokenizer: Any
    vocab_size: int

    def d2t(self): ...                                  # the draft-to-target ids [K] of a trimmed output layer, or None
    def linears(self) -> list: ...                      # (name, linear module) of every prunable linear map, in order
    def macs(self): ...                                 # per-token MACs (sd2.macs.MacCount)
    def sparsity(self) -> dict: ...                     # {"decoder_sparsity": zeros share over linears(), "layers": {..}}
    def trim_vocab(self, keep: list[int]) -> None: ...  # keep the output rows of target ids ``keep``; sets d2t

    def prune_calibrated(self, config, samples: list[list[int]], ctx, out_dir: Path) -> dict:
        """SparseGPT / Wanda (a raw llm-compressor recipe: causal LMs) on ``samples`` (token ids of
        distilled conversations), in place; returns what sparsity.json records of the run."""

    def wants_topk(self, config) -> bool: ...          # the loss under finetune ``config`` reads cached top-k logits
    def training_task(self, config, rows_train, rows_val, pad_id: int, target, ctx): ...  # sd2.train.loop.Task
    def save(self, out_dir: Path, extra_files: dict | None = None) -> None: ...  # the folder ``load`` reads back


def kind_module(kind: str):
    if kind not in KINDS:
        raise Sd2Error(f"unknown drafter kind {kind!r}{did_you_mean(kind, KINDS)}; known: {', '.join(KINDS)}")
    return importlib.import_module(KINDS[kind].module)


def load(source, target=None, device: str = "cpu", dtype=None) -> Drafter:
    """The drafter at ``source`` (a ModelSource; its ``kind`` says which), bound to ``target`` (a
    ModelSource or a loaded model) where the kind reads one."""
    return kind_module(getattr(source, "kind", DEFAULT)).load(source, target, device=device, dtype=dtype)


def kind_of(folder) -> str:
    """The kind of an existing local folder (a ModelSource, path or str): the first kind that
    recognizes it, else a causal LM. For folders a user names (a recipe's ``drafter: {path:}``,
    ``sd2 eval --drafter``), read once where the run is planned; a Hub id is a causal LM."""
    ref = Path(str(getattr(folder, "ref", folder)))
    if ref.is_dir():
        for kind in KINDS.values():
            if kind.name != DEFAULT and kind_module(kind.name).recognizes(ref):
                return kind.name
    return DEFAULT


def requires(config) -> dict[str, str]:
    """{field: capability} of the options ``config`` sets that only some kinds have: fields marked
    ``json_schema_extra={"requires": <capability>}`` set to a non-default value, plus the config's own
    ``requires()`` (for a requirement that depends on a value, like prune's method: layer)."""
    out = {}
    for name, field in type(config).model_fields.items():
        need = (field.json_schema_extra or {}).get("requires") if isinstance(field.json_schema_extra, dict) else None
        if need and getattr(config, name) != field.get_default(call_default_factory=True):
            out[name] = need
    own = getattr(config, "requires", None)
    if callable(own):
        out.update(own())
    return out


def problems(stage: str, config, kind: str) -> list[tuple[str, str]]:
    """(field, message) for each option of ``config`` that the drafter kind ``kind`` does not have."""
    k = KINDS[kind]
    return [(name, f"{stage}.{name} needs {CAPABILITIES[need]}, but this step's model is {k.label} ({kind}); "
                   f"{_instead(stage, kind) or 'remove it'}")
            for name, need in requires(config).items() if not getattr(k, need)]


def check(stage: str, config, kind: str) -> None:
    """``problems`` as an Sd2Error (a stage run directly, outside a validated recipe)."""
    found = problems(stage, config, kind)
    if found:
        raise Sd2Error("; ".join(msg for _, msg in found))


def _instead(stage: str, kind: str) -> str:
    if stage == "prune" and not KINDS[kind].causal_lm:
        return "use method: sparsegpt, wanda or magnitude"
    return ""
