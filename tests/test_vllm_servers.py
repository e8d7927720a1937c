"""distill.backend: vllm-server against real ``vllm serve`` processes (marker vllm; skipped without vLLM).

Two CPU servers of a tiny target (head_dim 32) start on loopback ports once for the module
(sd2.serve.local, the command docs/distill.md gives). In order: a recipe naming another model or
tokenizer is refused before any answer; a run on one server, killed after its first shard and rerun,
resumes and equals an uninterrupted run; then both servers share the prompts, one is killed
(SIGKILL, the server and its engine) after its third answer, and the dataset is complete and equal,
token for token, to the single-server run. Greedy vLLM answers here do not depend on which server or
batch computed them (same build, same CPU, fp32); a near-tie that flips a token would show up as a
mismatch, and the test says which row."""

from __future__ import annotations

import pytest

from sd2.core.context import StageInputs, standalone_context
from sd2.core.errors import Sd2Error
from sd2.core.models import ModelSource
from sd2.data.dataset import load_distilled
from sd2.serve.remote import Refused
from sd2.stages.distill import Config, run
from sd2.stages.distill import servers as servers_mod
from sd2.stages.distill import shards as shards_mod
from tiny import make_tokenizer, write_mtbench
from vllm_tiny import VLLM_ENV, eos_llama32

pytestmark = pytest.mark.vllm

N, FLUSH = 24, 8          # 24 two-turn prompts, 3 shards


class Killed(BaseException):
    """A simulated kill of the sd2 process: not an Exception, so nothing in the stage swallows it."""


@pytest.fixture(scope="module")
def target(tmp_path_factory, tokenizer):
    return eos_llama32(tmp_path_factory.mktemp("vllm_servers") / "target", tokenizer)


@pytest.fixture(scope="module")
def servers(target, tmp_path_factory):
    """Two `vllm serve` CPU servers of ``target``, started together, stopped (whole process groups) at the end."""
    from sd2.serve.local import LocalServer

    logs = tmp_path_factory.mktemp("vllm_logs")
    pair = [LocalServer(str(target), logs / f"server{i}.log", env=VLLM_ENV) for i in range(2)]
    try:
        for s in pair:
            s.start()
        for s in pair:
            s.wait_ready(timeout_s=400)
        yield pair
    finally:
        for s in pair:
            s.stop()


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    return write_mtbench(tmp_path_factory.mktemp("q") / "q.jsonl", n=N, turns=2)


def _distill(tmp, target, prompts, name, urls, **cfg):
    out = tmp / name
    out.mkdir(parents=True, exist_ok=True)
    config = Config(prompts={"source": str(prompts)}, max_new_tokens=16, flush_every=FLUSH, backend="vllm-server",
                    servers=urls, requests_per_server=8, **cfg)
    source = target if isinstance(target, ModelSource) else ModelSource(str(target), "fp-target")
    return run(config, StageInputs(target=source), out, standalone_context(tmp)), out


def _rows(out):
    return [(r["id"], r["input_ids"], r["loss_mask"]) for r in load_distilled(out)]


def _same(rows, reference):
    assert len(rows) == len(reference) == N
    bad = [a[0] for a, b in zip(rows, reference) if a != b]
    assert bad == [], f"rows that differ from the single-server run: {bad}"


def _counting(monkeypatch, after=None):
    """Count answers per server URL; ``after(url, n)`` runs after each."""
    counts: dict[str, int] = {}
    original = servers_mod.complete

    async def counted(client, served, body, stop_ids):
        g = await original(client, served, body, stop_ids)
        counts[served.url] = counts.get(served.url, 0) + 1
        if after is not None:
            after(served.url, counts[served.url])
        return g

    monkeypatch.setattr(servers_mod, "complete", counted)
    return counts


def test_another_model_or_tokenizer_is_refused(tmp_path, target, servers, prompts, tokenizer, monkeypatch):
    counts = _counting(monkeypatch)
    other_weights = eos_llama32(tmp_path / "other", tokenizer, seed=1)           # same tokenizer, another model
    with pytest.raises(Refused, match="not the recipe's model") as e:
        _distill(tmp_path, other_weights, prompts, "name", [s.url for s in servers])
    assert servers[0].url in str(e.value)
    # the recipe's model under the served name (as a Hub id at another revision would be), another tokenizer
    other_tok = eos_llama32(tmp_path / "other_tok", make_tokenizer(300))
    with pytest.raises(Refused, match="tokenizes a probe text differently") as e:
        _distill(tmp_path, ModelSource(str(other_tok), "fp-other", label=str(target)), prompts, "tok", [servers[1].url])
    assert servers[1].url in str(e.value)
    assert counts == {} and not list(tmp_path.glob("*/shards/shard-*"))


@pytest.fixture(scope="module")
def reference(target, servers, prompts, tmp_path_factory):
    """The dataset of an uninterrupted run on the first server alone. Beside the in-process hf generator's:
    the same prompt tokens and layout, answers that stop on <|im_end|> and answers cut at the limit, and
    most answers identical (vLLM's CPU kernels round otherwise than torch, so not necessarily all)."""
    tmp = tmp_path_factory.mktemp("whole")
    metrics, out = _distill(tmp, target, prompts, "whole", [servers[0].url])
    rows = _rows(out)
    hf_out = tmp / "hf"
    hf_out.mkdir()
    run(Config(prompts={"source": str(prompts)}, max_new_tokens=16, flush_every=FLUSH),
        StageInputs(target=ModelSource(str(target), "fp-target")), hf_out, standalone_context(tmp))
    hf = _rows(hf_out)
    assert 0 < metrics["truncated"] < 2 * N
    for (i, ids, mask), (hi, hids, hmask) in zip(rows, hf):
        first = mask.index(1)
        assert i == hi and len(ids) == len(mask) and ids[:first] == hids[:first] == hids[:hmask.index(1)]
    same = sum(a == b for a, b in zip(rows, hf))
    print(f"identical to the hf backend: {same} of {N} conversations")
    assert same >= N // 2
    return rows


def test_a_killed_run_resumes_and_equals_an_uninterrupted_one(tmp_path, target, servers, prompts, reference,
                                                               monkeypatch):
    url = servers[0].url
    write = shards_mod.write

    def write_then_die(folder, i, *a, **kw):
        write(folder, i, *a, **kw)
        raise Killed
    monkeypatch.setattr(shards_mod, "write", write_then_die)
    with pytest.raises(Killed):
        _distill(tmp_path, target, prompts, "killed", [url])
    monkeypatch.setattr(shards_mod, "write", write)
    counts = _counting(monkeypatch)
    _distill(tmp_path, target, prompts, "killed", [url])
    assert counts == {url: 2 * (N - FLUSH)}       # the first shard's answers were kept, not asked again
    _same(_rows(tmp_path / "killed"), reference)


def test_a_server_killed_mid_run_costs_no_answer(tmp_path, target, servers, prompts, reference, monkeypatch, caplog):
    a, b = servers

    def kill_b(url, n):
        if url == b.url and n == 3:
            b.kill()
    counts = _counting(monkeypatch, kill_b)
    with caplog.at_level("WARNING"):
        _, out = _distill(tmp_path, target, prompts, "failover", [a.url, b.url])
    # B's answers already on their way when it died count too; the rest of its share went to A
    assert 3 <= counts[b.url] < 8 and counts[a.url] + counts[b.url] == 2 * N
    assert any(b.url in r.message and "failed" in r.message for r in caplog.records)
    _same(_rows(out), reference)
    with pytest.raises(Sd2Error, match=f"no vLLM server answers: {b.url}"):
        _distill(tmp_path, target, prompts, "dead", [b.url])
