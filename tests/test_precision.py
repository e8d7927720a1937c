"""dtype: auto follows the machine (sd2.core.precision): bf16 only where it is computed natively."""

import json
import logging

import pytest

import recording_stages
from sd2.core import precision
from sd2.pipeline.runner import Runner
from test_fingerprint import V2Added
from test_runner import fake_stages, recipe  # noqa: F401 (fixture)


@pytest.fixture(autouse=True)
def real_auto_rule(monkeypatch):
    monkeypatch.delenv(precision.FORCE_ENV, raising=False)


def _native(monkeypatch, ok: bool):
    monkeypatch.setattr(precision, "native_bf16", lambda device="cpu": (ok, "native" if ok else "AVX2 only"))


def test_auto_takes_bf16_only_where_native(monkeypatch):
    _native(monkeypatch, True)
    assert precision.resolve("auto") == precision.Precision("auto", "bfloat16", "native")
    assert precision.resolve_autocast("auto").dtype == "bfloat16"
    _native(monkeypatch, False)
    assert precision.resolve("auto").dtype == "float32" and precision.resolve("auto").reason == "AVX2 only"
    assert precision.resolve_autocast("auto").dtype == "float32"
    assert precision.resolve("float16").dtype == "float16"
    with pytest.raises(ValueError, match="dtype must be one of auto, float32, bfloat16, float16, got 'fp8'"):
        precision.resolve("fp8")


def test_the_rule_reads_the_cpus_bf16_instructions(monkeypatch):
    real = precision.cpu_info()
    assert set(real) >= {"cpu", "capability", "amx_bf16", "avx512_bf16"} and real["cpu"]
    for caps, want in (({"amx_bf16": True}, True), ({"avx512_bf16": True}, True), ({}, False)):
        info = {"cpu": "Some CPU", "capability": "AVX2", "amx_bf16": False, "avx512_bf16": False} | caps
        monkeypatch.setattr(precision, "cpu_info", lambda: info)
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
        ok, why = precision.native_bf16("cpu")
        assert ok is want and "Some CPU" in why
        # oneDNN held to AVX2 (how an AVX2-only CPU is emulated on a newer one) never uses bf16 instructions
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
        assert precision.native_bf16("cpu")[0] is False
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
        assert precision.native_bf16("cpu")[0] is want


def test_explicit_bf16_without_native_support_runs_with_a_warning(monkeypatch, caplog):
    _native(monkeypatch, False)
    precision._WARNED.clear()
    with caplog.at_level(logging.WARNING, logger="sd2"):
        p = precision.resolve("bfloat16")
    assert p.dtype == "bfloat16"
    assert "6.5x to 100x slower than float32" in caplog.text and "Use dtype: auto" in caplog.text
    caplog.clear()
    _native(monkeypatch, True)
    with caplog.at_level(logging.WARNING, logger="sd2"):
        precision.resolve("bfloat16")
    assert caplog.text == ""


def test_the_environment_can_pin_what_auto_means(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from sd2.core.errors import Sd2Error
    from sd2.pipeline.cli import app

    _native(monkeypatch, True)
    monkeypatch.setenv(precision.FORCE_ENV, "float32")
    assert precision.resolve("auto").dtype == "float32" and precision.resolve("bfloat16").dtype == "bfloat16"
    monkeypatch.setenv(precision.FORCE_ENV, "fp32")
    with pytest.raises(Sd2Error, match="SD2_AUTO_DTYPE must be float32 or bfloat16 .*, got 'fp32'; unset it"):
        precision.resolve("auto")
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text("name: r\ntarget: {hub: org/t}\ndrafter: {hub: org/d}\n")
    res = CliRunner().invoke(app, ["validate", str(recipe_file)])  # refused before anything else is looked at
    assert res.exit_code == 1 and "SD2_AUTO_DTYPE must be float32 or bfloat16" in res.output
    assert "Traceback" not in res.output


def test_evaluation_stays_float32_on_a_cpu(monkeypatch):
    """Losslessness is token equality: bf16 verify forwards over gamma + 1 tokens round differently from
    one-token decoding, and flipped greedy near-ties made the tiny pipeline and SmolLM2 'NOT LOSSLESS'
    in bf16 on the AVX512-BF16 EPYC. So evaluate's auto is float32 on any CPU."""
    _native(monkeypatch, True)
    assert precision.resolve("auto", "cpu", exact=True).dtype == "float32"
    assert precision.resolve("auto", "cpu").dtype == "bfloat16"          # distill keeps the fast path
    assert precision.resolve("bfloat16", "cpu", exact=True).dtype == "bfloat16"  # an explicit choice stands


def test_onednn_isa_levels(monkeypatch):
    monkeypatch.setattr(precision, "cpu_info", lambda: {"cpu": "C", "capability": "AVX512", "amx_bf16": False,
                                                         "avx512_bf16": True})
    for isa, want in (("AVX2", False), ("AVX512_CORE", False), ("AVX512_CORE_BF16", True), ("AVX512_CORE_FP16", True),
                      ("DEFAULT", True), ("ALL", True), ("nonsense", True), ("", True)):
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", isa)
        assert precision.native_bf16("cpu")[0] is want, isa


def test_an_explicit_bf16_warning_comes_once(monkeypatch, caplog):
    _native(monkeypatch, False)
    precision._WARNED.clear()
    with caplog.at_level(logging.WARNING, logger="sd2"):
        for _ in range(3):
            precision.resolve("bfloat16")
            precision.resolve_autocast("bf16")
    assert caplog.text.count("without native bf16") == 1


def test_the_manifest_and_log_record_the_chosen_precision(tmp_path, tiny_target, fake_stages, monkeypatch, caplog):
    _native(monkeypatch, False)
    monkeypatch.setattr(recording_stages, "Config", V2Added)
    with caplog.at_level(logging.INFO, logger="sd2"):
        Runner(recipe(tiny_target), tmp_path).run()
    m = json.loads((tmp_path / "r" / "01_distill" / "manifest.json").read_text())
    assert m["precision"] == {"dtype": {"requested": "auto", "dtype": "float32", "reason": "AVX2 only"}}
    assert m["machine"]["cpu"] and "capability" in m["machine"]
    assert "dtype: auto -> float32 (AVX2 only)" in caplog.text
