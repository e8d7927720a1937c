"""What a stage fingerprint hashes of its config (sd2.core.fields.config_identity): an upgrade that only
adds defaulted fields reruns nothing, and ``dtype: auto`` reuses folders made at the precision it resolves to."""

import importlib
import json
from pathlib import Path
from typing import Literal, get_args

import pytest
from pydantic import BaseModel, ConfigDict, Field

import recording_stages
from sd2.core import precision
from sd2.core.fields import DType, added, config_identity, dtype_field
from sd2.pipeline.registry import STAGES
from sd2.pipeline.runner import Runner
from test_runner import fake_stages, recipe  # noqa: F401 (fixture)

SNAPSHOT = Path(__file__).parent / "config_fields.json"


class V1(BaseModel):
    model_config = ConfigDict(extra="forbid")
    value: int = 0
    fail: bool = False
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"   # the default before dtype: auto


class V2Added(V1):
    dtype: DType = dtype_field("weights dtype")
    new_knob: float = added(0.5, since="2026-12-02", description="a field an upgrade adds; 0.5 keeps the old behaviour")


class V2Plain(V1):
    new_knob: float = Field(0.5)  # added without `added`: the negative control


@pytest.fixture(autouse=True)
def real_auto_rule(monkeypatch):
    monkeypatch.delenv(precision.FORCE_ENV, raising=False)  # conftest pins auto to float32; these tests need the rule


@pytest.fixture
def no_native_bf16(monkeypatch):
    monkeypatch.setattr(precision, "native_bf16", lambda device="cpu": (False, "test: no native bf16"))


def _rerun_with(config_cls, monkeypatch, tmp_path, target) -> list[str]:
    monkeypatch.setattr(recording_stages, "Config", config_cls)
    recording_stages.CALLS.clear()
    Runner(recipe(target), tmp_path).run()
    return list(recording_stages.CALLS)


def test_an_upgrade_that_only_adds_defaulted_fields_reruns_nothing(tmp_path, tiny_target, fake_stages, monkeypatch,
                                                                   no_native_bf16):
    monkeypatch.setattr(recording_stages, "Config", V1)
    Runner(recipe(tiny_target), tmp_path).run()
    assert _rerun_with(V2Added, monkeypatch, tmp_path, tiny_target) == []
    # the negative control: the same field without `added` changes every fingerprint of the stages using it
    assert _rerun_with(V2Plain, monkeypatch, tmp_path, tiny_target) == [
        "distill", "dense.finetune", "sparse.prune", "sparse.finetune", "evaluate"]


def test_auto_hashes_the_precision_it_resolves_to(monkeypatch):
    old = V1().model_dump(mode="json")
    monkeypatch.setattr(precision, "native_bf16", lambda device="cpu": (False, "no"))
    assert config_identity(V2Added()) == old == config_identity(V1())
    monkeypatch.setattr(precision, "native_bf16", lambda device="cpu": (True, "yes"))
    assert config_identity(V2Added())["dtype"] == "bfloat16" == config_identity(V2Added(dtype="bfloat16"))["dtype"]
    assert config_identity(V2Added(new_knob=0.7))["new_knob"] == 0.7


def test_finetune_auto_keeps_its_old_token_where_it_still_means_fp32(monkeypatch):
    from sd2.stages import finetune

    monkeypatch.setattr(precision, "native_bf16", lambda device="cpu": (False, "no"))
    assert config_identity(finetune.Config())["precision"] == "auto"  # as hashed before: fp32 on CPU
    assert config_identity(finetune.Config(precision="fp32"))["precision"] == "auto"  # the same computation
    monkeypatch.setattr(precision, "native_bf16", lambda device="cpu": (True, "yes"))
    assert config_identity(finetune.Config())["precision"] == "bf16" == config_identity(finetune.Config(precision="bf16"))["precision"]
    assert config_identity(finetune.Config(precision="fp32"))["precision"] == "auto"


def test_evaluate_auto_is_float32_on_a_cpu_even_with_native_bf16(monkeypatch):
    from sd2.stages import evaluate

    monkeypatch.setattr(precision, "native_bf16", lambda device="cpu": (True, "yes"))
    cfg = evaluate.Config(prompts={"source": "mtbench"})
    assert config_identity(cfg)["dtype"] == "float32" == config_identity(cfg.model_copy(update={"dtype": "float32"}))["dtype"]


def _models(cls, seen=None) -> dict[str, list[str]]:
    seen = {} if seen is None else seen
    key = f"{cls.__module__}.{cls.__qualname__}"
    if key in seen:
        return seen
    seen[key] = sorted(cls.model_fields)
    for info in cls.model_fields.values():
        stack = [info.annotation]
        while stack:
            t = stack.pop()
            if isinstance(t, type) and issubclass(t, BaseModel):
                _models(t, seen)
            stack.extend(get_args(t))
    return seen


def test_every_new_config_field_is_declared_with_added():
    """The shipped stage configs' fields, as listed in tests/config_fields.json. A field outside that
    list must be declared with sd2.core.fields.added (its default keeps the old behaviour), or, when it
    changes what the stage computes for existing recipes, be added to the list on purpose."""
    shipped = json.loads(SNAPSHOT.read_text())
    now = {}
    for spec in STAGES.values():
        _models(spec.config_cls, now)
    undeclared = []
    for cls_name, fields in now.items():
        module, _, qual = cls_name.rpartition(".")
        cls = getattr(importlib.import_module(module), qual)
        for name in set(fields) - set(shipped.get(cls_name, [])):
            extra = cls.model_fields[name].json_schema_extra
            if not (isinstance(extra, dict) and "sd2_since" in extra):
                undeclared.append(f"{cls_name}.{name}")
    assert not undeclared, (f"new config fields change every existing run's fingerprints: {undeclared}; declare them "
                            f"with sd2.core.fields.added(default, since=...) or add them to {SNAPSHOT.name}")


def test_a_renamed_field_keeps_its_old_name_in_fingerprints():
    """The head stage's layer count is `num_layers` (derive's `layers` are indices), hashed as `layers`,
    the name it shipped with, so no head folder reruns for the rename."""
    from sd2.core.fields import config_identity
    from sd2.stages.head import Config

    assert config_identity(Config(type="eagle", num_layers=2)) == {"type": "eagle", "layers": 2}
