"""distill.backend: vllm on this CPU (marker vllm; skipped without vLLM): a tiny target's greedy answers
through vLLM make a dataset of the same format as sd2's own batched generator's (columns, prompts,
multi-turn structure, loss mask rule), and the share of identical answers is reported, not assumed:
vLLM's CPU kernels and torch round differently, so a near-tie can flip a greedy token."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import textwrap
import time

import pytest

from sd2.core.context import StageInputs, standalone_context
from sd2.core.models import ModelSource
from sd2.data.dataset import load_distilled
from sd2.stages.distill import Config, run
from tiny import write_mtbench
from vllm_tiny import VLLM_ENV, eos_llama32

pytestmark = pytest.mark.vllm


def _distill(tmp, target, prompts, backend, **cfg):
    out = tmp / backend
    out.mkdir()
    config = Config(prompts={"source": str(prompts)}, max_new_tokens=16, batch_size=4, backend=backend, **cfg)
    metrics = run(config, StageInputs(target=ModelSource(str(target), "fp-target")), out, standalone_context(tmp))
    return metrics, load_distilled(out)


def test_vllm_distill_matches_the_hf_generators_format(tmp_path, tokenizer, monkeypatch):
    for k, v in VLLM_ENV.items():
        monkeypatch.setenv(k, v)
    # what vLLM's CPU backend needs is sd2's to set (sd2.serve.env.cpu_environment), not the user's
    for k in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_ENABLE_V1_MULTIPROCESSING"):
        monkeypatch.delenv(k, raising=False)
    target = eos_llama32(tmp_path / "target", tokenizer)   # answers that stop on <|im_end|> at times
    prompts = write_mtbench(tmp_path / "q.jsonl", n=8, turns=2)
    hf_metrics, hf = _distill(tmp_path, target, prompts, "hf")
    import torch

    threads, env_before = torch.get_num_threads(), dict(os.environ)
    vl_metrics, vl = _distill(tmp_path, target, prompts, "vllm")
    # vLLM ran in a child process that has ended, and left this one as it was: no variable set, no
    # thread count changed (a head trained after an in-process vLLM ran 15% slower on the real pair)
    assert multiprocessing.active_children() == []
    assert dict(os.environ) == env_before and torch.get_num_threads() == threads

    assert vl.column_names == hf.column_names and len(vl) == len(hf) == 8
    assert vl_metrics["rows"] == hf_metrics["rows"] and vl_metrics["tokens"] > 0
    same_answers = total = 0
    for a, b in zip(hf, vl):
        assert a["id"] == b["id"] and [m["role"] for m in a["messages"]] == [m["role"] for m in b["messages"]]
        assert a["messages"][0] == b["messages"][0]                      # the first user turn, as given
        assert len(b["input_ids"]) == len(b["loss_mask"])
        first = b["loss_mask"].index(1)                                  # the prompt, tokenized alike
        assert first == a["loss_mask"].index(1) and b["input_ids"][:first] == a["input_ids"][:first]
        for ma, mb in zip(a["messages"], b["messages"]):
            if ma["role"] == "assistant":
                total += 1
                same_answers += ma["content"] == mb["content"]
        if a["messages"] == b["messages"]:
            assert a["input_ids"] == b["input_ids"] and a["loss_mask"] == b["loss_mask"]
    share = same_answers / total
    print(json.dumps({"identical_greedy_answers": same_answers, "answers": total, "share": share,
                      "hf_tokens": hf_metrics["tokens"], "vllm_tokens": vl_metrics["tokens"]}))
    # a real generator of the same model: most answers identical (not all need be, see the docstring)
    assert share >= 0.5, share


def _vllm_env(monkeypatch):
    for k, v in VLLM_ENV.items():
        monkeypatch.setenv(k, v)


def test_a_vllm_start_failure_in_the_child_is_the_stages_error_and_leaves_no_process(
        tmp_path, tiny_target, monkeypatch):
    """The child's refusal (here: head_dim 16, which vLLM's CPU attention lacks) reaches the stage as
    sd2's one-line error, and the child is gone."""
    from sd2.core.errors import Sd2Error

    _vllm_env(monkeypatch)
    prompts = write_mtbench(tmp_path / "q.jsonl", n=2, turns=1)
    with pytest.raises(Sd2Error, match=r"head_dim 16 .* is not one vLLM's CPU attention supports"):
        _distill(tmp_path, tiny_target, prompts, "vllm")
    assert multiprocessing.active_children() == []
    assert not (tmp_path / "vllm" / "dataset").exists()


def test_a_vllm_child_killed_mid_run_is_an_error_naming_its_exit_code(tmp_path, tokenizer, monkeypatch):
    from sd2.core.errors import Sd2Error
    from sd2.stages.distill.generate import Sampling
    from sd2.stages.distill.vllm_backend import VllmGenerator
    from vllm_tiny import llama32

    _vllm_env(monkeypatch)
    target = llama32(tmp_path / "t", tokenizer)
    gen = VllmGenerator(str(target), Sampling(0.0, max_new_tokens=4, stop_ids=(tokenizer.eos_token_id,)), 1,
                        "float32", 0)
    try:
        first = gen.generate([[1, 2, 3], [4, 5]])
        assert [len(g.ids) for g in first] == [4, 4]          # max_new_tokens, no stop token in 4 steps here
        os.kill(gen._proc.pid, 9)
        with pytest.raises(Sd2Error, match=r"^distill.backend: vllm: the vLLM process exited \(code -9\) while "
                                           r"generating 1 answer\(s\).*VLLM_CPU_KVCACHE_SPACE, or distill.flush_every"):
            gen.generate([[1, 2, 3]])
    finally:
        gen.close()
    assert multiprocessing.active_children() == []


def test_a_vllm_engine_in_processes_of_its_own_ends_with_the_child(tmp_path, tokenizer, monkeypatch):
    """VLLM_ENABLE_V1_MULTIPROCESSING=1 (a user's setting; vLLM's default on a GPU): the engine runs in
    processes under the child. Unless the child shuts it down, multiprocessing joins them at the child's
    exit without a timeout: close() waited out its grace and the engine (2.8 GB) outlived everything."""
    from sd2.stages.distill.generate import Sampling
    from sd2.stages.distill.vllm_backend import VllmGenerator
    from vllm_tiny import llama32

    _vllm_env(monkeypatch)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    target = llama32(tmp_path / "t", tokenizer)
    gen = VllmGenerator(str(target), Sampling(0.0, max_new_tokens=4), 1, "float32", 0)
    try:
        assert len(gen.generate([[1, 2, 3]])[0].ids) == 4
        engine = _descendants(gen._proc.pid)
        assert engine, "the engine should run in processes of the child's own here"
        t0 = time.monotonic()
        gen.close()
        took = time.monotonic() - t0
    finally:
        gen.close()
    assert took < 45, f"close() took {took:.0f} s: the child did not end by itself"
    deadline = time.monotonic() + 30
    while any(map(_alive, engine)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not any(map(_alive, engine)), "vLLM's engine processes outlived the child"


def _descendants(pid: int) -> list[int]:
    """The processes below ``pid``, from /proc."""
    parents = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parents[int(d)] = int(f.read().split(")")[-1].split()[1])
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
    found, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        found += kids
        frontier += kids
    return found


def test_a_killed_distill_leaves_no_vllm_process_behind(tmp_path, tokenizer):
    """kill -9 of the process running the stage: its pipe closes, and the vLLM child exits by itself
    (a resumed run must not find the memory held by an orphan)."""
    from vllm_tiny import llama32

    target = llama32(tmp_path / "t", tokenizer)
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys
        from sd2.stages.distill.generate import Sampling
        from sd2.stages.distill.vllm_backend import VllmGenerator
        if __name__ == "__main__":
            gen = VllmGenerator({str(target)!r}, Sampling(0.0, max_new_tokens=4), 1, "float32", 0)
            gen.generate([[1, 2, 3]])
            print("CHILD", gen._proc.pid, flush=True)
            os.kill(os.getpid(), 9)
    """))
    env = {**os.environ, **VLLM_ENV, "PYTHONPATH": os.pathsep.join([os.getcwd(), *sys.path])}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == -9, proc.stderr[-3000:]
    child = int(next(ln.split()[1] for ln in proc.stdout.splitlines() if ln.startswith("CHILD")))
    deadline = time.monotonic() + 60
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _alive(child), f"the vLLM child {child} outlived its killed parent"


def _alive(pid: int) -> bool:
    """A live process (a zombie, reaped by nobody yet, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
