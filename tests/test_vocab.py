"""Vocabulary trimming: the map, the MACs of a trimmed head, save/load, and the stage's K/coverage rules."""

import json

import pytest
import torch
from datasets import Dataset

from sd2 import vocab
from sd2.macs import count_macs
from sd2.core.context import StageInputs, standalone_context
from sd2.core.errors import Sd2Error
from sd2.core.models import ModelSource, load_model, save_model
from sd2.stages import trim_vocab


def distilled(folder, rows):
    """A distilled dataset per docs/CONTRACTS.md: loss_mask marks the target's tokens."""
    data = {"id": [], "category": [], "messages": [], "response": [], "input_ids": [], "loss_mask": []}
    for i, (prompt, response) in enumerate(rows):
        data["id"].append(f"r{i}")
        data["category"].append("none")
        data["messages"].append([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
        data["response"].append("a")
        data["input_ids"].append(prompt + response)
        data["loss_mask"].append([0] * len(prompt) + [1] * len(response))
    Dataset.from_dict(data).save_to_disk(str(folder / "dataset"))
    (folder / "distill.json").write_text(json.dumps({"tokenizer": "tiny", "vocab_size": 320, "topk": None, "policy": "target"}))
    return folder


@pytest.mark.parametrize("tie", [False, True])
def test_trimmed_head_maps_and_reloads(tmp_path, tokenizer, tie):
    from tiny import make_model

    m = load_model(make_model(tmp_path / "m", tokenizer=tokenizer, tie=tie))
    x = torch.tensor([[5, 6, 7, 8]])
    full = m(x).logits
    keep = [0, 2, 5, 9, 40, 100, 200]
    vocab.trim_lm_head(m, keep)
    assert vocab.draft_to_target(m).tolist() == keep
    assert torch.allclose(m(x).logits, full[..., keep], atol=1e-5)
    assert count_macs(m).lm_head == len(keep) * 64  # K rows x hidden
    save_model(m, tokenizer, tmp_path / "t")
    m2 = load_model(tmp_path / "t")
    assert vocab.draft_to_target(m2).tolist() == keep
    assert m2.get_input_embeddings().weight.shape[0] == len(tokenizer)  # the input side stays full
    assert torch.allclose(m2(x).logits, m(x).logits, atol=1e-5)


def test_stage_keeps_top_k_plus_specials(tmp_path, tiny_drafter, tokenizer):
    # token 50 x6, 60 x4, 70 x2, 80 x1 in the responses; prompt tokens (90) must not count
    rows = [([90, 90, 90], [50, 50, 60, 70, 2]), ([90], [50, 50, 60, 60, 80, 2]), ([90], [50, 50, 60, 70, 2])]
    data = distilled(tmp_path / "d", rows)
    out = tmp_path / "out"
    out.mkdir()
    ctx = standalone_context(tmp_path)
    metrics = trim_vocab.run(trim_vocab.Config(k=2, heldout=0.0), StageInputs(model=ModelSource(str(tiny_drafter), "x"),
                             dataset=data), out, ctx)
    kept = json.loads((out / vocab.MAP_FILE).read_text())
    specials = set(tokenizer.all_special_ids)
    assert set(kept) == specials | {50, 60}
    stats = json.loads((out / "vocab_stats.json").read_text())
    assert stats["coverage_fit"] == pytest.approx((6 + 4 + 3) / 16)  # 50, 60 and eos(2) cover 13 of 16
    assert metrics["draft_vocab_size"] == len(kept) and stats["mac_saving"] > 0
    m = load_model(out)
    assert m.get_output_embeddings().weight.shape[0] == len(kept)


def test_k_past_the_seen_tokens_fills_by_lowest_id_and_counts_them(tmp_path, tiny_drafter, tokenizer):
    # 5 distinct response tokens are seen (50, 60, 70, 80 and eos); k=10 takes 5 unseen ones by lowest id
    rows = [([90], [50, 50, 60, 70, 2]), ([90], [50, 60, 80, 2])]
    data = distilled(tmp_path / "d", rows)
    out = tmp_path / "out"
    out.mkdir()
    trim_vocab.run(trim_vocab.Config(k=10, heldout=0.0), StageInputs(model=ModelSource(str(tiny_drafter), "x"),
                   dataset=data), out, standalone_context(tmp_path))
    kept = set(json.loads((out / vocab.MAP_FILE).read_text()))
    seen = {50, 60, 70, 80, 2}
    fill = [t for t in range(100) if t not in seen][:5]
    specials = set(tokenizer.all_special_ids)
    assert kept == seen | set(fill) | specials
    stats = json.loads((out / "vocab_stats.json").read_text())
    assert stats["distinct_target_tokens_seen"] == 5
    assert stats["kept_unseen"] == len(kept - seen) and stats["kept_unseen"] >= 5


def test_stage_by_coverage(tmp_path, tiny_drafter):
    rows = [([9], [50] * 8 + [60] * 2)]
    data = distilled(tmp_path / "d", rows)
    out = tmp_path / "out"
    out.mkdir()
    trim_vocab.run(trim_vocab.Config(coverage=0.8, heldout=0.0), StageInputs(model=ModelSource(str(tiny_drafter), "x"),
                   dataset=data), out, standalone_context(tmp_path))
    kept = json.loads((out / vocab.MAP_FILE).read_text())
    assert 50 in kept and 60 not in kept


def test_k_larger_than_vocab_and_bad_coverage_are_errors(tmp_path, tiny_drafter):
    with pytest.raises(ValueError, match=r"coverage must be in \(0, 1\]"):
        trim_vocab.Config(coverage=1.5)
    with pytest.raises(ValueError, match="exactly one of k or coverage"):
        trim_vocab.Config()
    data = distilled(tmp_path / "d", [([9], [50, 2])])
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(Sd2Error, match="exceeds the drafter's vocabulary of 320"):
        trim_vocab.run(trim_vocab.Config(k=100000), StageInputs(model=ModelSource(str(tiny_drafter), "x"), dataset=data),
                       out, standalone_context(tmp_path))


def test_k_larger_than_vocab_is_a_recipe_error(tiny_target):
    from sd2.core.errors import RecipeError
    from sd2.pipeline.schema import validate_recipe

    data = {"name": "t", "target": {"path": str(tiny_target)}, "drafter": {"derive": "target", "keep_layers": 2},
            "branches": {"trim": [{"trim_vocab": {"k": 5000}}]}}
    with pytest.raises(RecipeError, match=r"branches.trim\[0\].trim_vocab.k: must be at most the drafter's vocabulary size 320 \(got 5000\)"):
        validate_recipe(data)
