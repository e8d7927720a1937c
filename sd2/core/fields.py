"""Shared field builders for stage configs, and what a stage's fingerprint hashes of its config.

The fingerprint rule (``config_identity``):
- Every field is hashed with its value, defaults included, as since sd2 0.1.0.
- A field added to a stage's config later is declared with :func:`added`: it is hashed only when it
  differs from its default, and that default must reproduce the behaviour from before the field
  existed. An upgrade that only adds defaulted fields therefore reruns nothing. tests/test_fingerprint.py
  holds the list of every config's fields as shipped, and fails on a new field not declared this way.
- A renamed field (:func:`renamed`) is hashed under its old name.
- A field that says where or how a stage runs, never what it computes (:func:`runtime`: the vLLM
  servers distill sends its requests to, how many at a time), is never hashed: the same answers
  from other servers are the same data.
- A precision field (:func:`dtype_field`, :func:`precision_field`) is hashed as the precision it
  resolves to on the run's device (``auto`` -> ``float32`` on a CPU without native bf16), so a
  folder made when the default was ``float32`` is reused wherever ``auto`` means the same.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from sd2.core import precision

SINCE = "sd2_since"
PRECISION = "sd2_precision"
WAS = "sd2_was"
RUNTIME = "sd2_runtime"

DType = Literal[precision.DTYPES]          # a model dtype: auto | float32 | bfloat16 | float16
Autocast = Literal[precision.PRECISIONS]   # finetune's autocast precision: auto | fp32 | bf16


def added(default: Any, *, since: str, **kw) -> Any:
    """A config field added after its stage first shipped (``since``: the date it was added; sd2's
    version also enters every fingerprint, so it is not bumped for this). Its default keeps the
    earlier behaviour, and it enters fingerprints only when set to something else. A given
    ``json_schema_extra`` (e.g. a drafter-kind ``requires``) is kept beside the mark."""
    return Field(default, json_schema_extra={**kw.pop("json_schema_extra", {}), SINCE: since}, **kw)


def runtime(default: Any, *, since: str, **kw) -> Any:
    """A field that says where or how a stage runs (server addresses, requests in flight), not what it
    computes: it never enters a fingerprint, whatever its value. Declared like :func:`added` (``since``)."""
    return Field(default, json_schema_extra={SINCE: since, RUNTIME: True}, **kw)


def runtime_fields(config_cls: type[BaseModel]) -> set[str]:
    """The names of a config class's :func:`runtime` fields."""
    return {name for name, info in config_cls.model_fields.items()
            if isinstance(info.json_schema_extra, dict) and info.json_schema_extra.get(RUNTIME)}


def renamed(was: str, default: Any, **kw) -> Any:
    """A field renamed after it shipped (``was``: its old name): fingerprints hash it under the old
    name, so the rename reruns nothing."""
    return Field(default, json_schema_extra={WAS: was}, **kw)


def dtype_field(description: str, *, exact: bool = False) -> Any:
    """``dtype: auto | float32 | bfloat16 | float16`` (default auto: bf16 only where computed natively;
    with ``exact``, float32 on every CPU: see sd2.core.precision.resolve)."""
    if exact:
        return Field("auto", description=description + " (auto: float32 on a CPU, where losslessness is checked "
                     "token for token; bfloat16 on a GPU that supports it)", json_schema_extra={PRECISION: "exact"})
    return Field("auto", description=description + " (auto: bfloat16 where the device computes it natively, "
                 "AMX or AVX512-BF16 on a CPU, else float32)", json_schema_extra={PRECISION: "dtype"})


def precision_field(description: str) -> Any:
    """finetune's ``precision: auto | fp32 | bf16`` (autocast), resolved by the same rule."""
    return Field("auto", description=description + " (auto: bf16 autocast where the device computes bf16 "
                 "natively, AMX or AVX512-BF16 on a CPU, else fp32)", json_schema_extra={PRECISION: "autocast"})


def config_identity(config: BaseModel, device: str = "cpu") -> dict:
    """What a stage's fingerprint hashes of its config: its JSON dump, less the later-added fields at
    their defaults and the runtime fields, with precision fields resolved for ``device`` (nested configs alike)."""
    out = {}
    for name, info in type(config).model_fields.items():
        value = getattr(config, name)
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        if extra.get(RUNTIME) or (SINCE in extra and value == info.default):
            continue
        name, field = extra.get(WAS, name), name
        kind = extra.get(PRECISION)
        if kind in ("dtype", "exact"):
            out[name] = precision.resolve(value, device, exact=kind == "exact", quiet=True).dtype
        elif kind == "autocast":
            # finetune's "auto" was hashed as the word before 2026-12, when it meant fp32 on every CPU
            # (bf16 on a CUDA device with bf16): whatever resolves to that, auto or explicit, keeps the token
            token = precision.autocast_token(value, device)
            out[name] = "auto" if token == precision.legacy_autocast(device) else token
        elif isinstance(value, BaseModel):
            out[name] = config_identity(value, device)
        else:
            out[name] = config.model_dump(mode="json", include={field})[field]
    return out


def precisions(config: BaseModel, device: str = "cpu", *, quiet: bool = True) -> dict[str, dict]:
    """The precision fields of a stage config as resolved for ``device``: ``{field: {requested, dtype,
    reason}}``, for the log and the manifest."""
    out = {}
    for name, info in type(config).model_fields.items():
        kind = (info.json_schema_extra or {}).get(PRECISION) if isinstance(info.json_schema_extra, dict) else None
        if kind == "autocast":
            out[name] = precision.resolve_autocast(getattr(config, name), device, quiet=quiet).to_dict()
        elif kind:
            out[name] = precision.resolve(getattr(config, name), device, exact=kind == "exact", quiet=quiet).to_dict()
    return out
