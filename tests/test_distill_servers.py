"""distill.backend: vllm-server without vLLM: fake OpenAI-compatible servers (tests/fake_vllm.py) answer
with sd2's own generator at batch size 1, so every dataset here must equal ``backend: hf`` at
``batch_size: 1`` token for token: sharing across servers, a server dying mid-run, every server dying
(the finished shards kept, a rerun on other servers resuming them), and the refusals before any answer.
tests/test_vllm_servers.py runs the same with real ``vllm serve`` processes."""

from __future__ import annotations

import faulthandler
import logging

import pytest

from sd2.core.context import StageInputs, standalone_context
from sd2.core.errors import Sd2Error
from sd2.core.fields import config_identity
from sd2.core.models import ModelSource
from sd2.data.dataset import load_distilled
from sd2.serve.remote import Refused
from sd2.stages.distill import Config, run
from sd2.stages.distill import servers as servers_mod
from fake_vllm import FakeVllm
from test_distill import eos_target  # noqa: F401 (fixture)
from tiny import make_model, make_tokenizer, write_mtbench

N, FLUSH = 8, 4           # 8 two-turn prompts in shards of 4: 16 answers, 8 per shard


@pytest.fixture(autouse=True)
def watchdog():
    """A hang is a failure: a broken failover (a failed request never requeued) waits forever (found by a
    newcomer check's sabotage), so each test gets 180 s, then the process dumps its stacks and exits 1."""
    faulthandler.dump_traceback_later(180, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    return write_mtbench(tmp_path_factory.mktemp("q") / "q.jsonl", n=N, turns=2)


def _distill(tmp, target, prompts, name, **cfg):
    out = tmp / name
    out.mkdir(parents=True, exist_ok=True)
    config = Config(prompts={"source": str(prompts)}, max_new_tokens=8, flush_every=FLUSH, **cfg)
    metrics = run(config, StageInputs(target=ModelSource(str(target), "fp-target")), out, standalone_context(tmp))
    return metrics, out


def _rows(out):
    return [(r["id"], r["input_ids"], r["loss_mask"], r["messages"]) for r in load_distilled(out)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, eos_target, prompts):
    """The in-process generator's dataset (hf, one prompt at a time: what the fakes compute)."""
    tmp = tmp_path_factory.mktemp("ref")
    metrics, out = _distill(tmp, eos_target, prompts, "hf", batch_size=1)
    rows = _rows(out)
    assert metrics["truncated"] > 0 and metrics["truncated"] < 2 * N    # both stopped and cut answers
    return rows


def _servers(*fakes, **cfg):
    return {"backend": "vllm-server", "servers": [f.url for f in fakes], "requests_per_server": 3, **cfg}


def test_two_servers_share_the_prompts_and_equal_the_in_process_generator(tmp_path, eos_target, prompts, reference):
    a, b = FakeVllm(eos_target), FakeVllm(eos_target)
    metrics, out = _distill(tmp_path, eos_target, prompts, "two", **_servers(a, b))
    assert _rows(out) == reference
    assert a.answered + b.answered == 2 * N and a.answered > 0 and b.answered > 0
    body = a.bodies[0]      # token ids in, token ids out, the in-process settings, vLLM's other samplers off
    assert isinstance(body["prompt"], list) and all(isinstance(t, int) for t in body["prompt"])
    assert body["return_token_ids"] is True and body["temperature"] == 0.0 and body["max_tokens"] == 8
    assert body["stop_token_ids"] == [2] and body["top_k"] == 0 and body["min_p"] == 0.0
    assert body["repetition_penalty"] == 1.0 and body["skip_special_tokens"] is False and body["model"] == str(eos_target)
    assert metrics["rows"] == N


def test_a_dead_server_costs_no_answer(tmp_path, eos_target, prompts, reference, caplog):
    a, b = FakeVllm(eos_target), FakeVllm(eos_target, die_after=3)
    with caplog.at_level(logging.WARNING):
        _distill(tmp_path, eos_target, prompts, "failover", **_servers(a, b))
    assert _rows(tmp_path / "failover") == reference
    assert b.answered == 3 and a.answered >= 2 * N - 3
    assert any(b.url in r.message and "go to " + a.url in r.message for r in caplog.records)


@pytest.mark.parametrize("errors", [2, 3])
def test_a_server_that_errs_keeps_its_place_while_health_answers_until_its_third_failure(tmp_path, eos_target,
                                                                                        prompts, reference, errors,
                                                                                        caplog):
    a, b = FakeVllm(eos_target), FakeVllm(eos_target, errors=errors)
    with caplog.at_level(logging.WARNING):
        _distill(tmp_path, eos_target, prompts, "out", **_servers(a, b))
    assert _rows(tmp_path / "out") == reference
    dropped = any(b.url in r.message and "failed (HTTP 500" in r.message for r in caplog.records)
    assert dropped == (errors == 3) and (b.answered > 0) == (errors == 2)


def test_every_server_dead_keeps_the_finished_shards_and_a_rerun_elsewhere_resumes(tmp_path, eos_target, prompts,
                                                                                   reference):
    a, b = FakeVllm(eos_target, die_after=6), FakeVllm(eos_target, die_after=6)   # 12 of 16 answers
    with pytest.raises(Sd2Error, match="every vLLM server failed") as e:
        _distill(tmp_path, eos_target, prompts, "out", **_servers(a, b))
    assert a.url in str(e.value) and b.url in str(e.value) and "rerun the same command" in str(e.value)
    shards = tmp_path / "out" / "shards"
    assert sorted(p.name for p in shards.glob("shard-*")) == ["shard-00000"]
    c = FakeVllm(eos_target)            # other servers (the dead ones still listed): the same data, resumed
    _distill(tmp_path, eos_target, prompts, "out", **_servers(a, b, c))
    assert c.answered == 2 * FLUSH      # only the second shard's 4 prompts x 2 turns
    assert _rows(tmp_path / "out") == reference


def test_servers_do_not_enter_the_fingerprint():
    cfg = dict(prompts={"source": "mtbench"}, backend="vllm-server")
    one = Config(**cfg, servers=["http://127.0.0.1:8001"], requests_per_server=8)
    two = Config(**cfg, servers=["http://10.0.0.2:9000/v1/", "http://10.0.0.3:9000"], request_timeout_s=5)
    assert config_identity(one) == config_identity(two)
    assert "servers" not in config_identity(one) and config_identity(one)["backend"] == "vllm-server"
    assert two.servers == ["http://10.0.0.2:9000", "http://10.0.0.3:9000"]
    assert config_identity(one) != config_identity(Config(**cfg, servers=["http://a:1"], max_new_tokens=9))


@pytest.fixture(scope="module")
def other_tokenizer_model(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("other_tok"), "llama", n_layers=1, tokenizer=make_tokenizer(300))


@pytest.fixture(scope="module")
def bigger_vocab(tmp_path_factory, tokenizer):
    tok = make_tokenizer()
    tok.add_tokens(["<extra_one>"])
    folder = tmp_path_factory.mktemp("bigger_vocab")
    tok.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("case", ["name", "tokenizer", "vocab"])
def test_another_model_or_tokenizer_is_refused_before_any_answer(tmp_path, eos_target, prompts, case,
                                                                other_tokenizer_model, bigger_vocab):
    good = FakeVllm(eos_target)
    if case == "name":
        smol = "HuggingFaceTB/SmolLM2-135M-Instruct"
        bad, why = FakeVllm(eos_target, served_name=smol, root=smol), "--served-model-name"
    elif case == "tokenizer":
        bad, why = FakeVllm(other_tokenizer_model, served_name=str(eos_target)), "tokenizes a probe text differently"
    else:
        bad, why = FakeVllm(eos_target, tokenizer_folder=bigger_vocab), "the vocabularies differ"
    with pytest.raises(Refused, match=why) as e:
        _distill(tmp_path, eos_target, prompts, "out", **_servers(good, bad))
    assert bad.url in str(e.value)
    assert good.bodies == [] and bad.bodies == []
    assert not list((tmp_path / "out").glob("shards/shard-*"))


def test_a_prompt_longer_than_the_servers_limit_is_refused_before_it_is_sent(tmp_path, eos_target, prompts):
    short = FakeVllm(eos_target, max_model_len=40)
    with pytest.raises(Sd2Error, match=f"{short.url} takes 40 tokens per request .* --max-model-len"):
        _distill(tmp_path, eos_target, prompts, "out", **_servers(short))
    assert short.bodies == []


def test_a_server_down_at_the_start_is_left_out(tmp_path, eos_target, prompts, reference, caplog):
    gone = FakeVllm(eos_target)
    gone.kill()
    a = FakeVllm(eos_target)
    with caplog.at_level(logging.WARNING):
        _distill(tmp_path, eos_target, prompts, "out", **_servers(gone, a))
    assert _rows(tmp_path / "out") == reference and a.answered == 2 * N
    assert any(gone.url in r.message and "does not answer" in r.message for r in caplog.records)
    with pytest.raises(Sd2Error, match=f"no vLLM server answers: {gone.url}"):
        _distill(tmp_path, eos_target, prompts, "none", **_servers(gone))


def test_a_request_the_server_refuses_stops_the_run_with_its_message(monkeypatch):
    """HTTP 4xx is the request's fault, not the server's: no failover, the server's words in the error."""
    import asyncio

    import httpx

    from sd2.serve.remote import Served
    from sd2.stages.distill.generate import Sampling

    def reply(request):
        return httpx.Response(400, json={"error": {"message": "prompt too long"}})

    async def one():
        async with httpx.AsyncClient(transport=httpx.MockTransport(reply)) as client:
            body = servers_mod.completion_body("m", [5, 6], Sampling(max_new_tokens=4, stop_ids=(2,)), 0)
            await servers_mod.complete(client, Served("http://s:1", "m", 512), body, (2,))

    with pytest.raises(Sd2Error, match=r"http://s:1 refused a request of 2 prompt tokens \+ 4 new \(HTTP 400\).*too long"):
        asyncio.run(one())
