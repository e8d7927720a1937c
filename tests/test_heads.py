"""Feature-level heads (EAGLE, FSPAD) on a tiny target: shapes, causality, frozen shared weights,
drafting through the proposer protocol (greedy equality, incl. after rejections), learning."""

from __future__ import annotations

import pytest
import torch

from sd2.engine.proposer import Context, Sampling
from sd2.heads import io
from sd2.heads.features import chain_rounds, target_features
from sd2.heads.proposer import HeadProposer
from tests.tiny import make_model


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    folder = make_model(tmp_path_factory.mktemp("tgt") / "target", n_layers=2, hidden=64)
    model = AutoModelForCausalLM.from_pretrained(folder)
    # A tiny target a small head can learn within a test: embeddings on the scale of the normed
    # features and damped attention/MLP writes (its next token still depends on the context).
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(5.0)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(0.3)
            layer.mlp.down_proj.weight.mul_(0.3)
    return model.eval()


@pytest.mark.parametrize("kind", ["eagle", "fspad"])
def test_forward_shapes_and_state_dict(target, kind):
    head = io.build(kind, target, num_layers=2)
    ids = torch.randint(0, 300, (3, 7))
    feats = torch.randn(3, 7, 64)
    pos = torch.arange(7).expand(3, 7)
    hl, hf = head(ids, feats, pos)
    assert hl.shape == hf.shape == (3, 7, 64)
    from sd2.heads.train import head_mask

    assert not head_mask(head)      # a fresh head has no exact zeros for finetune to hold as a mask
    assert head.logits(hl).shape == (3, 7, target.config.vocab_size)
    keys = set(head.state_dict())
    # the target's embeddings and lm_head are shared, not the head's
    assert not any("embed" in k or "lm_head" in k for k in keys)
    assert "model.layers.0.self_attn.q_proj.weight" in keys
    assert "model.layers.0.input_layernorm.weight" not in keys     # EAGLE: layer 0 has no input norm
    assert "model.layers.1.input_layernorm.weight" in keys
    if kind == "fspad":
        assert head.model.layers[1].mlp.down_proj.weight.shape == (128, 128)   # 2d out (intermediate 128)
        assert "model.fs.gate_proj.weight" in keys
        assert not torch.equal(hl, hf)
    else:
        assert hl is hf


@pytest.mark.parametrize("kind", ["eagle", "fspad"])
def test_causal_in_training_and_drafting(target, kind):
    """Editing a later position's input leaves every earlier output bitwise unchanged (the
    non-causal LlamaDecoderLayer trap of transformers 5.x, module docstring of sd2/heads/model.py)."""
    torch.manual_seed(0)
    head = io.build(kind, target)
    head.train()
    ids = torch.randint(0, 300, (2, 9))
    feats = torch.randn(2, 9, 64)
    pos = torch.arange(9).expand(2, 9)
    a, _ = head(ids, feats, pos)
    ids2, feats2 = ids.clone(), feats.clone()
    ids2[:, 6] = (ids2[:, 6] + 1) % 300
    feats2[:, 6:] += 1.0
    b, _ = head(ids2, feats2, pos)
    assert torch.equal(a[:, :6], b[:, :6])
    assert not torch.equal(a[:, 6:], b[:, 6:])
    # drafting: a cached prefix, then one position at a time
    head.eval()
    with torch.no_grad():
        full, _ = head(ids[:1], feats[:1], pos[:1])
        cache = head.new_cache()
        pre, _ = head(ids[:1, :5], feats[:1, :5], pos[:1, :5], cache=cache)
        steps = [head(ids[:1, t:t + 1], feats[:1, t:t + 1], pos[:1, t:t + 1], cache=cache)[0] for t in range(5, 9)]
    assert torch.allclose(torch.cat([pre] + steps, dim=1), full, atol=1e-5)
    with torch.no_grad():
        cache2 = head.new_cache()
        pre2, _ = head(ids2[:1, :5], feats2[:1, :5], pos[:1, :5], cache=cache2)
    assert torch.equal(pre, pre2)


def _greedy(target, prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(target(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt):]


def _drive(target, proposer, prompt: list[int], n: int, gamma: int):
    """A minimal greedy round loop (tests only; the product's loop is sd2/engine's): propose,
    verify in one target forward, accept the matching prefix plus one target token."""
    seq = list(prompt)
    rounds = []
    proposer.reset()
    with torch.no_grad():
        while len(seq) - len(prompt) < n:
            feats = target_features(target, torch.tensor([seq[:-1]]))[0]
            draft = proposer.propose(Context(list(seq), len(prompt), feats), gamma, Sampling(), None)
            assert draft.is_chain and draft.q is None
            logits = target(torch.tensor([seq + draft.tokens])).logits[0, len(seq) - 1:]
            pred = logits.argmax(-1).tolist()
            acc = 0
            while acc < len(draft) and draft.tokens[acc] == pred[acc]:
                acc += 1
            seq.extend(draft.tokens[:acc] + [pred[acc]])
            rounds.append((len(draft), acc))
    return seq[len(prompt):len(prompt) + n], rounds


@pytest.mark.parametrize("kind", ["eagle", "fspad"])
def test_greedy_equality_through_proposer(target, kind):
    torch.manual_seed(1)
    head = io.build(kind, target).eval()
    prompt = [5, 17, 42, 8, 99, 3]
    want = _greedy(target, prompt, 24)
    got, rounds = _drive(target, HeadProposer(head), prompt, 24, gamma=3)
    assert got == want
    assert any(acc < d for d, acc in rounds)      # rejections happened: real features re-run after them


def test_proposer_matches_chain_simulation_and_reruns_real_features(target):
    """The proposer's drafts equal a from-scratch head pass with real features + own predictions,
    so stale predicted features never leak into a later round."""
    torch.manual_seed(2)
    head = io.build("fspad", target).eval()
    prop = HeadProposer(head)
    seq = [5, 17, 42, 8, 99, 3, 7, 11]
    with torch.no_grad():
        feats = target_features(target, torch.tensor([seq]))[0]
        d1 = prop.propose(Context(seq[:6], 2, feats[:5]), 3, Sampling(), None)
        d2 = prop.propose(Context(seq, 2, feats[:7]), 3, Sampling(), None)   # after "accepting" other tokens
        fresh = HeadProposer(head).propose(Context(seq, 2, feats[:7]), 3, Sampling(), None)
    assert len(d1) == 3 and d2.tokens == fresh.tokens


def test_sampling_draft_q_rows(target):
    head = io.build("eagle", target).eval()
    prop = HeadProposer(head)
    seq = [5, 17, 42, 8, 99]
    feats = target_features(target, torch.tensor([seq]))[0][:4]
    g = torch.Generator().manual_seed(0)
    d = prop.propose(Context(seq, 2, feats), 4, Sampling(temperature=1.0, top_k=5), g)
    assert d.q.shape == (len(d), target.config.vocab_size)
    assert torch.allclose(d.q.sum(-1), torch.ones(len(d)))
    assert all(int((row > 0).sum()) <= 5 for row in d.q)
    assert all(d.q[i, t] > 0 for i, t in enumerate(d.tokens))


def test_trimmed_head_maps_ids(target):
    head = io.build("fspad", target).eval()
    keep = list(range(0, 300, 3))
    head.trim(keep)
    assert head.lm_head.weight.shape == (100, 64)
    prompt = [5, 17, 42, 8, 99, 3]
    got, _ = _drive(target, HeadProposer(head), prompt, 12, gamma=2)
    assert got == _greedy(target, prompt, 12)
    seq = prompt
    feats = target_features(target, torch.tensor([seq]))[0][:5]
    d = HeadProposer(head).propose(Context(seq, 2, feats), 3, Sampling(), None)
    assert all(t in keep for t in d.tokens)


def _rows(target, n_rows: int, seed: int, prompt_len: int = 6, answer: int = 30):
    """The tiny target's own greedy answers to random prompts, as finetune Rows."""
    from sd2.stages.finetune.batches import Rows

    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(3, 300, (n_rows, prompt_len), generator=g)
    with torch.no_grad():
        for _ in range(answer):
            seq = torch.cat([seq, target(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    ids = seq.tolist()
    mask = [[0] * prompt_len + [1] * answer for _ in ids]
    return Rows(ids, mask, None, None, ["none"] * n_rows)


def _random_rows(n_rows: int, seed: int, length: int = 36):
    from sd2.stages.finetune.batches import Rows

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 300, (n_rows, length), generator=g).tolist()
    return Rows(ids, [[0] * 6 + [1] * (length - 6) for _ in ids], None, None, ["none"] * n_rows)


def _top1(head, target, rows) -> float:
    """Share of positions where the head's greedy token, given the target's real features, is the
    target's own greedy next token."""
    with torch.no_grad():
        ids = torch.tensor(rows.input_ids)
        feats = target_features(target, ids)
        hl, _ = head(ids[:, 1:], feats[:, :-1], torch.arange(ids.shape[1] - 1).expand(len(ids), -1))
        pred = head.logits(hl).argmax(-1)                  # head position t predicts x_{t+2}
        want = target.lm_head(feats).argmax(-1)[:, 1:]     # the target's greedy token after x_{t+1}
    return float((pred[:, 5:] == want[:, 5:]).float().mean())


@pytest.fixture(scope="module")
def trained(target, tmp_path_factory):
    """An FSPAD head trained for 200 steps on the tiny target's features over random contexts
    (soft CE + feature regression), validated on the target's own greedy answers."""
    from sd2.core.context import standalone_context
    from sd2.heads.train import train_head
    from sd2.stages.finetune import Config

    tmp = tmp_path_factory.mktemp("train")
    rows, val = _random_rows(256, 0), _rows(target, 12, 1)
    head = io.build("fspad", target, seed=0)
    before = _top1(head, target, _random_rows(32, 9))
    snap = {k: v.clone() for k, v in target.state_dict().items()}
    cfg = Config(loss="fkl", lr=1e-2, max_steps=200, batch_size=16, checkpoint_every=0, mal_gamma=3,
                 feature_noise=0.02)
    metrics = train_head(cfg, head, target, rows, val, 0, tmp, standalone_context(tmp), cfg.model_dump(mode="json"))
    return head, metrics, before, snap


def test_head_learns_the_targets_next_token(target, trained):
    """A real learning test: on held-out contexts the head's greedy token is the target's far above
    chance (1/320) and far above the untrained head; validation's chain MAL rose above 1."""
    head, metrics, before, _ = trained
    after = _top1(head, target, _random_rows(32, 9))
    assert after > 0.15 and after > 5 * before, (before, after)
    assert metrics["steps"] == 200 and metrics["val_mal"] > 1.1


def test_frozen_target_bitwise_unchanged_by_training(target, trained):
    """The target's shared embeddings and lm_head (and everything else) are bitwise unchanged by
    200 training steps of a head that reads them."""
    snap = trained[3]
    now = target.state_dict()
    assert set(snap) == set(now)
    for n in snap:
        assert torch.equal(snap[n], now[n]), n


def test_trained_head_greedy_equality_and_exact_chain_mal(target, trained):
    head = trained[0].eval()
    prompt = _rows(target, 1, 7, answer=0).input_ids[0]
    want = _greedy(target, prompt, 24)
    got, rounds = _drive(target, HeadProposer(head), prompt, 24, gamma=3)
    assert got == want
    assert sum(a for _, a in rounds) >= 3 and any(a < d for d, a in rounds)   # accepts and rejects
    seq = prompt + got
    feats = target_features(target, torch.tensor([seq]))[0]
    sim = chain_rounds(head, seq, feats, [(len(prompt), len(seq))], 3)[0]
    # the driver drafts gamma to the end; compare every round that drafted a full gamma
    full = [(r.drafted, r.accepted) for r in sim if r.drafted == 3]
    assert full == rounds[: len(full)]


import json  # noqa: E402


def _head_recipe(path, target, prompts, branches, evaluate=None):
    import yaml

    recipe = {"name": "heads", "seed": 0, "target": {"path": str(target)}, "drafter": {"head": "fspad"},
              "distill": {"prompts": {"source": str(prompts)}, "max_new_tokens": 16, "batch_size": 4},
              "branches": branches}
    if evaluate:
        recipe["evaluate"] = evaluate
    path.write_text("# sd2 run " + str(path) + "\n" + yaml.safe_dump(recipe, sort_keys=False))
    return path


def test_head_branches_through_the_pipeline(tmp_path, tiny_target):
    """drafter: {head: fspad} -> wanda 50% -> finetune with the mask held exactly; trim_vocab K rows."""
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from sd2.pipeline.cli import app
    from tests.tiny import write_mtbench

    prompts = write_mtbench(tmp_path / "q.jsonl", n=8, turns=1)
    ft = {"epochs": 2, "lr": 1e-3, "batch_size": 2, "val_rows": 1, "loss": "fkl", "feature_noise": 0.05}
    recipe = _head_recipe(tmp_path / "h.yaml", tiny_target, prompts, {
        "sparse": [{"prune": {"method": "wanda", "sparsity": 0.5, "calibration": {"samples": 4}}}, {"finetune": ft}],
        "trim": [{"trim_vocab": {"k": 40, "heldout": 0.0}}, {"finetune": dict(ft, unroll=1)}],
        "eagle": [{"head": {"type": "eagle"}}, {"finetune": ft}],
    }, evaluate={"prompts": {"source": str(prompts), "limit": 2}, "gamma": 2, "max_new_tokens": 8,
                 "temperature": [0.0, 1.0], "repeats": 1, "warmup": 0})
    res = CliRunner().invoke(app, ["run", str(recipe), "--out", str(tmp_path / "art")])
    assert res.exit_code == 0, res.output
    run = tmp_path / "art" / "heads"
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == [
        "00_drafter.head", "01_distill", "02_sparse.prune", "03_sparse.finetune", "04_trim.trim_vocab",
        "05_trim.finetune", "06_eagle.head", "07_eagle.finetune", "08_evaluate"]
    assert io.read_config(run / "07_eagle.finetune").type == "eagle"
    report = json.loads((run / "08_evaluate" / "report.json").read_text())
    assert {d["kind"] for d in report["drafters"].values()} == {"head"}
    for r in report["results"]:
        assert r["lossless"] in (True, None) and 1.0 <= r["mal"] <= 3.0
        if r["temperature"] == 0:
            assert r["lossless"] is True
            assert r["greedy_mal_teacher_forced"] == pytest.approx(r["mal"], abs=1e-6), r["drafter"]
    assert report["drafters"]["trim"]["macs"]["lm_head"] < report["drafters"]["sparse"]["macs"]["lm_head"]
    assert report["drafters"]["sparse"]["sparsity"] == pytest.approx(0.5, abs=0.02)
    cfg = io.read_config(run / "00_drafter.head")
    assert cfg.type == "fspad" and cfg.target == str(tiny_target.resolve())
    pruned, tuned = (load_file(str(run / f / "model.safetensors")) for f in ("02_sparse.prune", "03_sparse.finetune"))
    changed = 0
    for k, w in pruned.items():
        if w.dim() == 2:
            zeros = w == 0
            assert zeros.float().mean() == pytest.approx(0.5, abs=0.02), k
            assert torch.all(tuned[k][zeros] == 0), f"{k}: a pruned weight came back"
            changed += int(not torch.equal(w, tuned[k]))
    assert changed > 0
    trimmed = load_file(str(run / "05_trim.finetune" / "model.safetensors"))
    assert trimmed["lm_head.weight"].shape[0] == trimmed["d2t"].shape[0] <= 40 + 3
    assert not any("embed" in k for k in trimmed)


def test_head_finetune_resume_is_bit_identical(tmp_path, target):
    """Interrupted after a checkpoint and resumed, training ends with the same weights bit for bit."""
    from sd2.heads.train import train_head
    from sd2.core.context import standalone_context
    from sd2.stages.finetune import Config

    rows, val = _rows(target, 24, 0), _rows(target, 2, 1)
    cfg = Config(loss="fkl", lr=3e-3, max_steps=6, batch_size=4, checkpoint_every=3, feature_noise=0.1, mal_gamma=2)
    cj = cfg.model_dump(mode="json")

    def fresh():
        return io.build("eagle", target, seed=0)

    a = fresh()
    train_head(cfg, a, target, rows, val, 0, tmp_path / "a", standalone_context(tmp_path), cj)

    class Stop(Exception):
        pass

    b = fresh()
    calls = {"n": 0}
    import sd2.heads.train as T

    real_save = T.checkpoint.save

    def save_then_stop(*args, **kw):
        real_save(*args, **kw)
        raise Stop

    T.checkpoint.save = save_then_stop
    try:
        with pytest.raises(Stop):
            train_head(cfg, b, target, rows, val, 0, tmp_path / "b", standalone_context(tmp_path), cj)
    finally:
        T.checkpoint.save = real_save
    c = fresh()
    train_head(cfg, c, target, rows, val, 0, tmp_path / "b", standalone_context(tmp_path), cj)
    del calls
    for (k, x), (_, y) in zip(a.state_dict().items(), c.state_dict().items()):
        assert torch.equal(x, y), k


def test_export_eagle_for_vllm_round_trip(tmp_path, target, tokenizer):
    """The exported folder's tensor names and shapes are exactly vLLM's EAGLE-1 loader contract
    (sd2/heads/export.py), the config is a Llama config; FSPAD and trimmed heads are refused with
    the sd2 command that runs them."""
    from safetensors.torch import load_file

    from sd2.core.errors import Sd2Error
    from sd2.heads.export import vllm_eagle_tensors, write_vllm_eagle

    head = io.build("eagle", target, num_layers=2, target_ref="tgt")
    io.save(head, tmp_path / "h", tokenizer)
    (tmp_path / "out").mkdir()
    cfg = write_vllm_eagle(tmp_path / "h", tmp_path / "out")
    got = {k: tuple(v.shape) for k, v in load_file(str(tmp_path / "out" / "model.safetensors")).items()}
    d = 64
    assert got["fc.weight"] == (d, 2 * d) and "fc.bias" not in got
    assert "layers.0.input_layernorm.weight" not in got and got["layers.1.input_layernorm.weight"] == (d,)
    assert got["layers.0.self_attn.k_proj.weight"] == (2 * 16, d)      # 2 KV heads of 16
    assert got == vllm_eagle_tensors(head.head_config)
    assert not any(k.startswith(("model.", "embed_tokens", "lm_head", "norm")) for k in got)
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["num_hidden_layers"] == 2
    exported = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert torch.equal(exported["layers.1.mlp.down_proj.weight"], head.model.layers[1].mlp.down_proj.weight)
    fs = io.build("fspad", target, target_ref="tgt")
    io.save(fs, tmp_path / "f", tokenizer)
    with pytest.raises(Sd2Error, match="nothing in vLLM runs it.*sd2 eval --target tgt --drafter fspad="):
        write_vllm_eagle(tmp_path / "f", tmp_path / "out")
    head.trim(range(10))
    io.save(head, tmp_path / "t", tokenizer)
    with pytest.raises(Sd2Error, match="trimmed output layer"):
        write_vllm_eagle(tmp_path / "t", tmp_path / "out")
