from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# dtype: auto resolves to float32 in the tests, on every CPU kind: the same numerics everywhere (a test of
# bf16 or of the auto rule itself sets or removes it). Inherited by the subprocesses that tests start.
os.environ.setdefault("SD2_AUTO_DTYPE", "float32")

from tiny import make_model, make_tokenizer, write_mtbench  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Tests marked ``vllm`` skip, with the reason, where vLLM is not installed (the default light venv)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        return
    if os.environ.get("SD2_REQUIRE_VLLM") and any("vllm" in item.keywords for item in items):
        raise pytest.UsageError("SD2_REQUIRE_VLLM is set but vLLM is not installed: SD2_VLLM=1 bash scripts/setup.sh")
    skip = pytest.mark.skip(reason="vLLM is not installed here: SD2_VLLM=1 bash scripts/setup.sh adds it")
    for item in items:
        if "vllm" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Keep sd2's model cache (GGUF conversions, hashes) out of the user's home during tests."""
    monkeypatch.setenv("SD2_CACHE", str(tmp_path_factory.getbasetemp() / "sd2-cache"))


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models are all per-op overhead: on a 2-core machine, one torch thread ran them ~5x
    faster than two (and subprocess tests set their own). Session-wide, so module fixtures get it too."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_target(tmp_path_factory, tokenizer) -> Path:
    """A 4-layer random Llama (hidden 64) with the tiny tokenizer, as a safetensors folder."""
    return make_model(tmp_path_factory.mktemp("target"), "llama", n_layers=4, seed=0, tokenizer=tokenizer)


@pytest.fixture(scope="session")
def tiny_drafter(tmp_path_factory, tokenizer) -> Path:
    """A 2-layer random Llama sharing the target's tokenizer."""
    return make_model(tmp_path_factory.mktemp("drafter"), "llama", n_layers=2, seed=1, tokenizer=tokenizer)


@pytest.fixture(scope="session")
def mtbench_file(tmp_path_factory) -> Path:
    return write_mtbench(tmp_path_factory.mktemp("data") / "question.jsonl", n=4)


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory, tokenizer, mtbench_file) -> Path:
    """A finished run folder with a real evaluate report (tests/publish_run.py), read-only for tests."""
    from publish_run import build_run

    return build_run(tmp_path_factory.mktemp("runs"), tokenizer, mtbench_file)


@pytest.fixture(scope="session")
def vllm_pair(tmp_path_factory, tokenizer) -> dict:
    """For the vllm tests: a target vLLM's CPU attention takes, its first layer as a drafter, and a
    trained EAGLE-1 head (tests/vllm_tiny.py), built once per session."""
    from vllm_tiny import build_pair

    return build_pair(tmp_path_factory.mktemp("vllm_pair"), tokenizer)
