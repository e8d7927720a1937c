"""The distill stage on tiny models: turn structure, loss mask, resume, determinism, top-k, on-policy, vllm requests."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from sd2.data.dataset import load_distilled
from sd2.core.context import StageInputs, standalone_context
from sd2.core.errors import Sd2Error
from sd2.core.models import ModelSource
from sd2.stages import distill
from sd2.stages.distill import Config, consumes, run
from sd2.stages.distill import shards as shards_mod
from tiny import make_model, write_mtbench

EOS_TEXT = "<|im_end|>"


class Killed(BaseException):
    """A simulated kill -9: not an Exception, so nothing in the stage can swallow it."""


@pytest.fixture(scope="module")
def eos_target(tmp_path_factory, tokenizer) -> Path:
    """A tiny target that ends some answers with <|im_end|> within a few tokens and runs on in others,
    so both the stopped and the truncated paths are exercised: its eos row of lm_head is pushed
    along the final norm's weight."""
    from transformers import AutoModelForCausalLM

    folder = make_model(tmp_path_factory.mktemp("eos_target"), "llama", n_layers=2, seed=0, tokenizer=tokenizer)
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        w = model.lm_head.weight
        w[tokenizer.eos_token_id] += 1.2 * w[tokenizer.eos_token_id].norm() * torch.nn.functional.normalize(
            model.model.norm.weight, dim=0)
    model.save_pretrained(folder)
    return folder


def distill_run(tmp: Path, target: Path, prompts, name="out", drafter: Path | None = None, seed=0, **cfg) -> tuple[dict, Path]:
    out = tmp / name
    out.mkdir(parents=True, exist_ok=True)
    config = Config(prompts=prompts, **{"max_new_tokens": 10, "batch_size": 3, **cfg})
    inputs = StageInputs(target=ModelSource(str(target), "fp-target"),
                         model=ModelSource(str(drafter), "fp-drafter") if drafter else None)
    return run(config, inputs, out, standalone_context(tmp, seed=seed)), out


def mask_spans(mask: list[int]) -> list[tuple[int, int]]:
    spans, start = [], None
    for t, m in enumerate(mask + [0]):
        if m and start is None:
            start = t
        elif not m and start is not None:
            spans.append((start, t))
            start = None
    return spans


def test_multiturn_structure_and_loss_mask_match_the_chat_template(tmp_path, eos_target, tokenizer):
    q = write_mtbench(tmp_path / "q.jsonl", n=6)
    source = [json.loads(line) for line in q.read_text().splitlines()]
    metrics, out = distill_run(tmp_path, eos_target, {"source": str(q)})
    ds = load_distilled(out)
    assert len(ds) == metrics["rows"] == 6
    eos = tokenizer.eos_token_id
    stopped = truncated = 0
    for row, src in zip(ds, source):
        assert row["id"] == f"mtbench-{src['question_id']}" and row["category"] == src["category"]
        roles = [m["role"] for m in row["messages"]]
        assert roles == ["user", "assistant", "user", "assistant"]
        assert [m["content"] for m in row["messages"] if m["role"] == "user"] == src["turns"]
        answers = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        assert row["response"] == answers[-1]
        ids, mask = row["input_ids"], row["loss_mask"]
        assert len(ids) == len(mask)
        # The whole sequence is exactly the chat template's rendering of the regenerated conversation.
        assert tokenizer.decode(ids) == tokenizer.apply_chat_template(row["messages"], tokenize=False)
        spans = mask_spans(mask)
        assert len(spans) == len(answers)
        for (a, b), answer in zip(spans, answers):
            # each masked span starts right after the template's generation prompt ...
            assert tokenizer.decode(ids[:a]).endswith("<|im_start|>assistant\n")
            span = ids[a:b]
            # ... and is the generated answer plus its end-of-turn token when the model produced one
            if span[-1] == eos:
                stopped += 1
                assert tokenizer.decode(span) == answer + EOS_TEXT
            else:
                truncated += 1
                assert len(span) == 10 and tokenizer.decode(span) == answer
                assert tokenizer.decode(ids[b:b + 1]) == EOS_TEXT and mask[b] == 0  # template's closing, unmasked
    assert stopped and truncated, "the eos-prone target should stop some answers and run on in others"
    assert metrics["truncated"] == truncated
    assert metrics["tokens"] == sum(ds["loss_mask"][i].count(1) for i in range(len(ds)))
    assert metrics["mean_response_tokens"] == pytest.approx(metrics["tokens"] / 12, abs=0.01)
    info = json.loads((out / "distill.json").read_text())
    assert info["tokenizer"] == str(eos_target) and info["topk"] is None and info["policy"] == "target"
    assert info["vocab_size"] == len(tokenizer)


def test_resume_after_crash_gives_identical_rows(tmp_path, eos_target, monkeypatch):
    q = write_mtbench(tmp_path / "q.jsonl", n=7)
    prompts = {"source": str(q)}
    clean, clean_out = distill_run(tmp_path, eos_target, prompts, name="clean", flush_every=3)

    real_write = shards_mod.write
    generated = []

    def crash_after_first(folder, i, rows, feats, stats):
        generated.append(i)
        real_write(folder, i, rows, feats, stats)
        if i == 0:
            (folder / ".shard-00001.partial").mkdir()  # what a kill -9 mid-write leaves behind
            raise Killed("simulated kill after the first shard")

    monkeypatch.setattr(shards_mod, "write", crash_after_first)
    with pytest.raises(Killed):
        distill_run(tmp_path, eos_target, prompts, name="crashed", flush_every=3)
    out = tmp_path / "crashed"
    assert (out / "shards" / "shard-00000" / "stats.json").is_file()
    assert not (out / "dataset").exists()

    generated.clear()
    resumed, _ = distill_run(tmp_path, eos_target, prompts, name="crashed", flush_every=3)
    assert generated == [1, 2], "the rerun must continue after the last complete shard"
    assert not (out / "shards" / ".shard-00001.partial").exists()
    assert load_distilled(out).to_list() == load_distilled(clean_out).to_list()
    assert {k: resumed[k] for k in ("rows", "tokens", "truncated")} == {k: clean[k] for k in ("rows", "tokens", "truncated")}

    # a changed config must not reuse the old shards
    monkeypatch.setattr(shards_mod, "write", lambda folder, i, *a: (generated.append(i), real_write(folder, i, *a))[1])
    generated.clear()
    distill_run(tmp_path, eos_target, prompts, name="crashed", flush_every=3, max_new_tokens=4)
    assert generated == [0, 1, 2]


def test_greedy_is_deterministic_and_independent_of_batching(tmp_path, eos_target):
    q = write_mtbench(tmp_path / "q.jsonl", n=6)
    _, a = distill_run(tmp_path, eos_target, {"source": str(q)}, name="a", batch_size=1)
    _, b = distill_run(tmp_path, eos_target, {"source": str(q)}, name="b", batch_size=4)
    _, c = distill_run(tmp_path, eos_target, {"source": str(q)}, name="c", batch_size=4)
    rows_a, rows_b = load_distilled(a).to_list(), load_distilled(b).to_list()
    assert rows_b == load_distilled(c).to_list()
    # left padding and dropping finished rows do not change the greedy answers
    assert [r["input_ids"] for r in rows_a] == [r["input_ids"] for r in rows_b]


def test_max_prompt_tokens_drops_long_prompts(tmp_path, tiny_target, tokenizer):
    q = tmp_path / "q.txt"
    prompts = ["hi", "a b c d e f g h i j k l m n o p q r s t u v w x y z " * 3, "ok then", "x y"]
    q.write_text("\n".join(prompts) + "\n")
    lengths = [len(tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                                 return_dict=True)["input_ids"]) for t in prompts]
    cap = sorted(lengths)[-2]           # the long one is over the cap, every other one within it
    assert max(lengths) > cap
    metrics, out = distill_run(tmp_path, tiny_target, {"source": str(q)}, max_prompt_tokens=cap)
    rows = load_distilled(out).to_list()
    assert [r["messages"][0]["content"] for r in rows] == [t for t, n in zip(prompts, lengths) if n <= cap]
    assert metrics["dropped_long_prompts"] == 1 and metrics["rows"] == 3
    with pytest.raises(Sd2Error, match="max_prompt_tokens = 1 drops every one of the 4"):
        distill_run(tmp_path, tiny_target, {"source": str(q)}, name="none", max_prompt_tokens=1)


def test_sampling_is_seeded(tmp_path, tiny_target, mtbench_file):
    p = {"source": str(mtbench_file), "max_turns": 1}
    rows = [load_distilled(distill_run(tmp_path, tiny_target, p, name=f"s{i}", seed=s, temperature=1.0, top_p=0.9,
                                       max_new_tokens=6)[1])["response"]
            for i, s in enumerate([0, 0, 1])]
    assert rows[0] == rows[1]
    assert rows[0] != rows[2]


def test_topk_logits_are_aligned_with_the_next_token(tmp_path, eos_target):
    from transformers import AutoModelForCausalLM

    q = write_mtbench(tmp_path / "q.jsonl", n=3)
    _, out = distill_run(tmp_path, eos_target, {"source": str(q)}, topk_logits=4)
    ds = load_distilled(out)
    assert json.loads((out / "distill.json").read_text())["topk"] == 4
    model = AutoModelForCausalLM.from_pretrained(eos_target).eval()
    for row in ds:
        ids, mask, top_ids, top_vals = row["input_ids"], row["loss_mask"], row["topk_ids"], row["topk_logits"]
        assert len(top_ids) == len(top_vals) == len(ids)
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
        for t in range(len(ids)):
            if t + 1 < len(ids) and mask[t + 1]:
                assert len(top_ids[t]) == len(top_vals[t]) == 4
                assert top_ids[t][0] == ids[t + 1]       # greedy: the generated token is the argmax
                ref = logits[t].topk(4)
                assert top_ids[t] == ref.indices.tolist()
                assert torch.allclose(torch.tensor(top_vals[t]), ref.values, atol=2e-2, rtol=1e-2)  # fp16 storage
            else:
                assert top_ids[t] == [] and top_vals[t] == []


def test_on_policy_drafter_writes_and_target_scores(tmp_path, tiny_target, tiny_drafter, mtbench_file):
    from transformers import AutoModelForCausalLM

    assert consumes(Config(prompts={"source": "mtbench"})) == ("target",)
    assert consumes(Config(prompts={"source": "mtbench"}, policy="drafter")) == ("target", "model")
    _, out = distill_run(tmp_path, tiny_target, {"source": str(mtbench_file), "max_turns": 1}, drafter=tiny_drafter,
                         policy="drafter", topk_logits=3)
    row = load_distilled(out)[0]
    ids, mask = row["input_ids"], row["loss_mask"]
    drafter = AutoModelForCausalLM.from_pretrained(tiny_drafter).eval()
    target = AutoModelForCausalLM.from_pretrained(tiny_target).eval()
    with torch.no_grad():
        d_logits = drafter(torch.tensor([ids])).logits[0]
        t_logits = target(torch.tensor([ids])).logits[0]
    answer = [t for t in range(len(ids) - 1) if mask[t + 1]]
    assert [d_logits[t].argmax().item() for t in answer] == [ids[t + 1] for t in answer]  # the drafter wrote it
    assert [row["topk_ids"][t] for t in answer] == [t_logits[t].topk(3).indices.tolist() for t in answer]  # target scored it
    assert json.loads((out / "distill.json").read_text())["policy"] == "drafter"


def test_raw_text_without_chat_template(tmp_path, tokenizer):
    tok = type(tokenizer).from_pretrained(make_model(tmp_path / "m0", tokenizer=tokenizer))
    tok.chat_template = None
    folder = make_model(tmp_path / "raw", n_layers=2, tokenizer=tok)
    (tmp_path / "p.txt").write_text("the quick brown fox\n\nwrite a short story\n")
    _, out = distill_run(tmp_path, folder, {"source": str(tmp_path / "p.txt")})
    ds = load_distilled(out)
    assert ds["id"] == ["p-1", "p-3"]
    for row, prompt in zip(ds, ["the quick brown fox", "write a short story"]):
        ids, mask = row["input_ids"], row["loss_mask"]
        n = len(tok(prompt)["input_ids"])
        assert ids[:n] == tok(prompt)["input_ids"] and mask == [0] * n + [1] * (len(ids) - n)
        assert tok.decode(ids[n:]) == row["response"]


def test_config_errors_are_recipe_errors(tmp_path):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="nope.jsonl' does not exist"):
        Config(prompts={"source": str(tmp_path / "nope.jsonl")})
    with pytest.raises(ValidationError, match="top_p"):
        Config(prompts={"source": "mtbench"}, top_p=0)
    with pytest.raises(ValidationError, match="policy"):
        Config(prompts={"source": "mtbench"}, policy="teacher")
    with pytest.raises(ValidationError, match="extra"):
        Config(prompts={"source": "mtbench"}, max_tokens=3)
    mix = Config(prompts=[{"source": "mtbench", "limit": 2}, {"source": "humaneval", "limit": 1}])
    assert isinstance(mix.prompts, list) and len(mix.prompts) == 2


def test_on_policy_needs_a_drafter(tmp_path, tiny_target, mtbench_file):
    with pytest.raises(Sd2Error, match="no drafter"):
        distill_run(tmp_path, tiny_target, {"source": str(mtbench_file)}, policy="drafter")


def test_vllm_requests_and_missing_vllm(tmp_path, tiny_target, mtbench_file, monkeypatch):
    from sd2.stages.distill.generate import Sampling
    from sd2.stages.distill.vllm_backend import requests, sampling_kwargs, to_generated

    s = Sampling(max_new_tokens=32, temperature=0.0, top_p=1.0, stop_ids=(2,))
    assert requests([[5, 6], [7]]) == [{"prompt_token_ids": [5, 6]}, {"prompt_token_ids": [7]}]
    kw = sampling_kwargs(s, seed=3)
    assert kw["max_tokens"] == 32 and kw["temperature"] == 0.0 and kw["stop_token_ids"] == [2] and kw["seed"] == 3
    assert to_generated([9, 8, 2], "stop", None, (2,)).ids == [9, 8, 2]
    assert to_generated([9, 8], "stop", 2, (2,)).ids == [9, 8, 2]
    g = to_generated([9, 8], "length", None, (2,))
    assert g.ids == [9, 8] and not g.stopped
    import importlib.util

    find_spec = importlib.util.find_spec      # vLLM absent, whether or not this machine has it
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else find_spec(name, *a))
    with pytest.raises(Sd2Error, match=r"distill.backend: vllm \(or set distill.backend: hf\) needs vLLM, which is not "
                                       r"installed here .*SD2_VLLM=1 bash scripts/setup.sh"):
        distill_run(tmp_path, tiny_target, {"source": str(mtbench_file)}, backend="vllm")


def test_stage_module_import_is_cheap():
    import subprocess
    import sys

    code = "import sys, sd2.stages.distill; print(any(m in sys.modules for m in ('torch', 'transformers', 'datasets')))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
    assert distill.Config is Config


def test_dataset_answers_keep_the_recorded_turns_with_the_mask_on_them_alone(tmp_path, eos_target, tokenizer, caplog):
    """answers: dataset (the SD² ablation baseline): each row holds the source's own assistant turns,
    the sequence is the chat template's rendering, and loss_mask is 1 exactly on the answers' tokens
    (their end-of-turn token included); an answer over max_new_tokens is cut there, like a generated
    one; a record without an answer to its first turn is dropped and counted, and a conversation is
    cut before its first unanswered turn."""
    records = [
        {"id": "a", "conversations": [{"from": "human", "value": "what is the capital of france?"},
                                      {"from": "gpt", "value": "paris is the capital of france"},
                                      {"from": "human", "value": "and 7 * 6?"},
                                      {"from": "gpt", "value": "42"}]},
        {"id": "b", "conversations": [{"from": "system", "value": "be brief"},
                                      {"from": "human", "value": "hello world"},
                                      {"from": "gpt", "value": "the quick brown fox jumps over the lazy dog " * 3}]},
        {"id": "c", "conversations": [{"from": "human", "value": "no answer recorded"}]},
        {"id": "d", "conversations": [{"from": "human", "value": "write a story"},
                                      {"from": "gpt", "value": "a robot learns to paint"},
                                      {"from": "human", "value": "unanswered follow-up"}]},
        {"id": "e", "conversations": [{"from": "gpt", "value": "an answer to no question"}]},
    ]
    path = tmp_path / "chats.json"
    path.write_text(json.dumps(records))
    with caplog.at_level(logging.INFO):
        metrics, out = distill_run(tmp_path, eos_target, {"source": str(path)}, answers="dataset", max_new_tokens=16)
    assert "dropped 1 conversation(s) without a user turn" in caplog.text     # counted, not silent
    ds = load_distilled(out)
    assert metrics["no_recorded_answer"] == 1 and metrics["rows"] == len(ds) == 3
    rows = {r["id"]: r for r in ds}
    assert set(rows) == {"chats-a", "chats-b", "chats-d"}
    eos = tokenizer.eos_token_id
    expected = {"chats-a": ["paris is the capital of france", "42"],
                "chats-b": [None],     # cut at 16 tokens
                "chats-d": ["a robot learns to paint"]}
    truncated = 0
    for rid, row in rows.items():
        ids, mask = row["input_ids"], row["loss_mask"]
        assert tokenizer.decode(ids) == tokenizer.apply_chat_template(row["messages"], tokenize=False)
        answers = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        spans = mask_spans(mask)
        assert len(spans) == len(answers) == len(expected[rid])
        for (a, b), answer, want in zip(spans, answers, expected[rid]):
            assert tokenizer.decode(ids[:a]).endswith("<|im_start|>assistant\n")
            span = ids[a:b]
            if want is None:
                truncated += 1
                assert len(span) == 16 and eos not in span
                assert (records[1]["conversations"][2]["value"]).startswith(answer)
                assert tokenizer.decode(span) == answer
            else:
                assert answer == want
                assert span[-1] == eos and tokenizer.decode(span) == want + EOS_TEXT
        assert sum(mask) == sum(b - a for a, b in spans)
    assert rows["chats-b"]["messages"][0] == {"role": "system", "content": "be brief"}
    assert [m["content"] for m in rows["chats-d"]["messages"] if m["role"] == "user"] == ["write a story"]
    assert metrics["truncated"] == truncated == 1
    assert metrics["tokens"] == sum(sum(r["loss_mask"]) for r in ds)
    assert json.loads((out / "distill.json").read_text())["answers"] == "dataset"


def test_dataset_answers_errors(tmp_path, eos_target, mtbench_file):
    with pytest.raises(Sd2Error, match="no selected conversation has a recorded assistant answer"):
        distill_run(tmp_path, eos_target, {"source": str(mtbench_file)}, answers="dataset")
    with pytest.raises(ValueError, match="policy 'drafter' does not apply"):
        Config(prompts={"source": str(mtbench_file)}, answers="dataset", policy="drafter")


def test_shared_prompt_prefix_is_computed_once_and_changes_no_answer(tmp_path, eos_target, tokenizer, monkeypatch):
    """Prompts that all start with one system prompt: the generator runs the shared tokens once and
    starts every row's cache from them (chunks of 2 rows, joined). Answers equal one-prompt-at-a-time
    transformers generate, token for token, and the no-sharing path."""
    from transformers import AutoModelForCausalLM

    from sd2.stages.distill import generate as gen_mod

    model = AutoModelForCausalLM.from_pretrained(eos_target).eval()
    system = tokenizer("the quick brown fox jumps over the lazy dog, a small sparse drafter",
                       add_special_tokens=False)["input_ids"]
    tails = ["what is the capital of france?", "compute 12 + 30", "hello", "write a short story about a robot",
             "def add(a, b):"]
    prompts = [system + tokenizer(t, add_special_tokens=False)["input_ids"] for t in tails]
    assert gen_mod._shared_prefix(prompts) == len(system) >= gen_mod.MIN_SHARED_PREFIX
    monkeypatch.setattr(gen_mod, "PREFILL_ROWS", 2)
    shared_seen = []
    real = gen_mod._shared_prefix
    monkeypatch.setattr(gen_mod, "_shared_prefix", lambda p: shared_seen.append(real(p)) or shared_seen[-1])
    sampling = gen_mod.Sampling(max_new_tokens=12, stop_ids=(tokenizer.eos_token_id,))
    out = gen_mod.HFGenerator(model, tokenizer.pad_token_id, sampling, batch_size=5).generate(prompts)
    assert shared_seen == [len(system)]
    unshared = gen_mod.HFGenerator(model, tokenizer.pad_token_id, sampling, batch_size=5)
    monkeypatch.setattr(gen_mod, "MIN_SHARED_PREFIX", 10**6)
    assert [o.ids for o in unshared.generate(prompts)] == [o.ids for o in out]
    with torch.no_grad():
        for p, o in zip(prompts, out):
            ref = model.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
            assert o.ids == ref[0, len(p):].tolist()


def test_prefill_chunks_split_where_padding_costs_more_than_a_chunk():
    from sd2.stages.distill.generate import CHUNK_COST, prefill_chunks

    # one long prompt is prefilled alone; the short ones split where 10 tokens of padding on 4 rows
    # (40 padded tokens) cost more than another chunk (32)
    assert prefill_chunks([400, 40, 40, 39, 38, 30, 30, 30, 30], 8) == [(0, 1), (1, 5), (5, 9)]
    equal = prefill_chunks([50] * 20, 8)   # no padding: as few chunks as max_rows allows
    assert len(equal) == 3 and all(e - s <= 8 for s, e in equal)
    for lengths in ([400, 40, 40, 39, 38, 30, 30], [9, 8, 7, 6, 5, 4, 3, 2, 1], [100, 99, 60, 20, 19, 5]):
        chunks = prefill_chunks(lengths, 3)
        assert chunks[0][0] == 0 and chunks[-1][1] == len(lengths)
        assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:])) and all(0 < e - s <= 3 for s, e in chunks)
        cost = sum(CHUNK_COST + (e - s) * max(lengths[s:e]) for s, e in chunks)
        fixed = sum(CHUNK_COST + (min(s + 3, len(lengths)) - s) * max(lengths[s:s + 3]) for s in range(0, len(lengths), 3))
        assert cost <= fixed


def test_length_buckets_are_few_near_equal_and_longest_first():
    from sd2.stages.distill.generate import length_buckets

    lengths = [(i * 37) % 101 for i in range(80)]
    batches = length_buckets(lengths, 64)
    assert [len(b) for b in batches] == [40, 40]          # not 64 + 16: a small tail batch decodes slowly
    assert sorted(i for b in batches for i in b) == list(range(80))
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(lengths, reverse=True)
    assert [len(b) for b in length_buckets(lengths[:64], 64)] == [64]
    assert [len(b) for b in length_buckets(lengths[:65], 32)] == [21, 22, 22]
    assert length_buckets([], 8) == []
