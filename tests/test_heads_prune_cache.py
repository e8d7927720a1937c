"""Heads: SparseGPT and Wanda through llm-compressor's per-layer code (sd2/heads/drafter.py), and the
optional cache of the target's features for head training (sd2/heads/feature_cache.py)."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch

from sd2.core.errors import Sd2Error
from sd2.heads import io
from sd2.heads.drafter import calibrate, prune_head, sparsify
from tests.tiny import make_model


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    folder = make_model(tmp_path_factory.mktemp("tgt") / "target", n_layers=2, hidden=64)
    return AutoModelForCausalLM.from_pretrained(folder).eval()


def _calib(target, n: int = 8, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Calibration rows of different lengths: (ids [1, L], the target's features [1, L, d])."""
    from sd2.heads.features import row_features

    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(3, 300, (int(torch.randint(20, 40, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]
    return [(torch.tensor([r]), f[None]) for r, f in zip(rows, row_features(target, rows))]


@pytest.mark.parametrize("kind,method,nm", [("fspad", "sparsegpt", None), ("eagle", "sparsegpt", (2, 4)),
                                            ("fspad", "wanda", (2, 4)), ("eagle", "wanda", None)])
def test_every_head_linear_reaches_the_sparsity(target, kind, method, nm):
    """llm-compressor's SparseGPT/Wanda on every head Linear (fc, feature sampling, layers): 50% per
    layer, and for 2:4 every group of 4 consecutive input weights holds at least 2 zeros."""
    head = io.build(kind, target, num_layers=2, seed=0)
    names = [n for n, _ in head.linears()]
    assert "model.fc" in names and any(n.startswith("model.layers.1.") for n in names)
    assert kind == "eagle" or "model.fs.gate_proj" in names
    before = {n: m.weight.detach().clone() for n, m in head.linears()}
    prune_head(head, method, 0.5, nm, _calib(target))
    for name, mod in head.linears():
        w = mod.weight.detach()
        zeros = (w == 0).float().mean().item()
        assert zeros == pytest.approx(0.5, abs=0.01), (name, zeros)
        if nm is not None:
            groups = (w.reshape(w.shape[0], -1, 4) == 0).sum(-1)
            assert int(groups.min()) >= 2, name
        if method == "sparsegpt":   # the OBS update moves the kept weights; Wanda only zeroes
            kept = w != 0
            assert not torch.equal(w[kept], before[name][kept]), name
        else:
            assert torch.equal(w[w != 0], before[name][w != 0]), name


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_layer_error_below_magnitude(target, nm):
    """SparseGPT's purpose: at the same sparsity, each layer's output on the calibration inputs
    moves less than with magnitude pruning (||X W'^T - X W^T||, every head Linear)."""
    from sd2.stages.prune.magnitude import magnitude_mask

    dense = io.build("fspad", target, num_layers=1, seed=0)
    rows = _calib(target)
    inputs: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_hook(lambda m, a, o, n=n: inputs.setdefault(n, []).append(a[0].detach()))
             for n, m in dense.linears()]
    from sd2.heads.features import head_inputs

    with torch.no_grad():
        for ids, feats in rows:
            dense(*head_inputs(ids, feats))
    for h in hooks:
        h.remove()
    ratios = {}
    for name, mod in dense.linears():
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs[name]])
        w = mod.weight.detach()
        copy_head = copy.deepcopy(dense)
        sgpt = dict(copy_head.linears())[name]
        sparsify([(name, sgpt)], calibrate(copy_head, rows, [(name, sgpt)], "sparsegpt"), "sparsegpt", 0.5, nm)
        mag = w * magnitude_mask(w, 0.5, nm)
        assert (sgpt.weight == 0).sum() >= (mag == 0).sum() - 1, name
        err_s = (x @ (sgpt.weight.detach() - w).T).norm()
        err_m = (x @ (mag - w).T).norm()
        ratios[name] = float(err_s / err_m)
    # every layer lower; feature sampling's gate reads the token embedding alone, nearly isotropic
    # here, where SparseGPT has least to gain (0.86-0.93 of magnitude's error; fc and o_proj 0.4-0.8)
    assert max(ratios.values()) < 1.0 and sum(ratios.values()) / len(ratios) < 0.85, ratios


def test_refused_methods_name_the_working_ones(tmp_path, target):
    """Run directly (outside a validated recipe), prune refuses a causal-LM-only method on a head
    before loading anything, naming the methods that work."""
    from sd2.core.context import StageInputs, standalone_context
    from sd2.core.models import ModelSource
    from sd2.stages import prune

    cfg = prune.Config(method="layer", n_remove=1)
    src = ModelSource(str(tmp_path / "no-such-head"), "h", kind="head")
    with pytest.raises(Sd2Error, match="prune.method needs a standalone causal LM.*use method: sparsegpt, wanda or magnitude"):
        prune.run(cfg, StageInputs(model=src, dataset=tmp_path), tmp_path / "out", standalone_context(tmp_path))


# -- the feature cache ------------------------------------------------------------------------------

def _rows(n: int, seed: int):
    """Rows of different lengths (so batches pad) with a response part."""
    from sd2.train.batches import Rows

    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(3, 300, (int(torch.randint(12, 30, (1,), generator=g)),), generator=g).tolist()
           for _ in range(n)]
    return Rows(ids, [[0] * 5 + [1] * (len(r) - 5) for r in ids], None, None, ["none"] * n)


def _train(target, tmp, precision="fp32", **kw):
    from sd2.core.context import standalone_context
    from sd2.heads.train import train_head
    from sd2.stages.finetune import Config

    tmp.mkdir(parents=True, exist_ok=True)
    cfg = Config(loss="fkl", lr=3e-3, max_steps=4, batch_size=4, checkpoint_every=0, mal_gamma=2, feature_noise=0.05,
                 unroll=1, precision=precision, **kw)
    head = io.build("fspad", target, seed=0)
    metrics = train_head(cfg, head, target, _rows(20, 0), _rows(3, 1), 0, tmp / "out", standalone_context(tmp),
                         cfg.model_dump(mode="json"))
    return head, metrics


@pytest.fixture
def fresh_accelerate():
    """accelerate keeps one AcceleratorState per process and refuses another mixed precision in it."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cached_features_train_bit_identically(tmp_path, target, precision, fresh_accelerate):
    """Same seed, same steps: the head trained from the feature cache equals, bit for bit, the head
    trained on features computed on the fly; a second training reads the cache without rebuilding."""
    online, m_online = _train(target, tmp_path / "a", precision)
    assert not (tmp_path / "a" / "feature_cache").exists()
    cached, m_cached = _train(target, tmp_path / "b", precision, feature_cache_mb=5)
    for (k, x), (_, y) in zip(online.state_dict().items(), cached.state_dict().items()):
        assert torch.equal(x, y), k
    assert m_online["val_mal"] == m_cached["val_mal"] and m_online["precision"] == precision
    assert 0 < m_cached["train_cpu_seconds"] and 0 < m_online["train_cpu_seconds"]
    folders = list((tmp_path / "b" / "feature_cache").iterdir())
    assert len(folders) == 1 and not folders[0].name.endswith(".partial")
    index = json.loads((folders[0] / "index.json").read_text())
    assert index["rows"] == 23 and index["hidden_size"] == 64
    stamp = {p.name: p.stat().st_mtime_ns for p in folders[0].iterdir()}
    again, _ = _train(target, tmp_path / "b", precision, feature_cache_mb=5)
    assert {p.name: p.stat().st_mtime_ns for p in folders[0].iterdir()} == stamp      # read, not rebuilt
    assert all(torch.equal(x, y) for x, y in zip(cached.state_dict().values(), again.state_dict().values()))


def test_cache_over_the_cap_is_refused_before_computing(tmp_path, target):
    with pytest.raises(Sd2Error) as e:
        _train(target, tmp_path, feature_cache_mb=0.01)
    msg = str(e.value)
    assert "finetune.feature_cache_mb = 0.01" in msg and "MB" in msg and "raise feature_cache_mb to at least 1" in msg
    assert not (tmp_path / "feature_cache").exists()


def test_interrupted_cache_build_is_never_read_and_resumes(tmp_path, target, monkeypatch):
    """A build killed after its first shard leaves only <key>.partial (never read as a cache); the
    next build keeps the finished shard, computes the rest, and holds the on-the-fly features."""
    import contextlib

    from sd2.core.context import standalone_context
    from sd2.heads import feature_cache as fc
    from sd2.heads.features import row_features

    rows = _rows(12, 3).input_ids
    monkeypatch.setattr(fc, "SHARD_MB", 64 * 4 * 40 / 2**20)     # about 40 tokens a shard
    calls = []

    def failing(target, rs):
        calls.append(len(rs))
        if len(calls) == 3:      # probe, shard 0, then die in shard 1
            raise KeyboardInterrupt
        return row_features(target, rs)

    monkeypatch.setattr(fc, "row_features", failing)
    ctx = standalone_context(tmp_path)
    args = (tmp_path / "cache", target, "t", rows, "fp32", "cpu", 10, contextlib.nullcontext, ctx)
    with pytest.raises(KeyboardInterrupt):
        fc.load_or_build(*args)
    (partial,) = (tmp_path / "cache").iterdir()
    assert partial.name.endswith(".partial") and not (partial / "index.json").exists()
    assert [p.name for p in partial.glob("shard-*")] == ["shard-00000.safetensors"]
    monkeypatch.setattr(fc, "row_features", row_features)
    n_shards = len(fc._shards([len(r) for r in rows], 64 * 4))
    assert n_shards >= 3
    out = fc.load_or_build(*args)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [partial.name[: -len(".partial")]]
    want = row_features(target, rows)
    assert len(out) == len(rows) and all(torch.equal(a, b) for a, b in zip(out, want))


def test_cache_is_read_on_demand_and_bf16_storage_halves_it(tmp_path, target):
    """The cache hands back rows read from its memory-mapped shards when asked, equal to the on-the-fly
    features; stored in bf16 it takes half the bytes under another key, and its rows come back in the
    forward's dtype, rounded to bf16. A cap between the two sizes refuses fp32 storage, naming bf16."""
    import contextlib

    from sd2.core.context import standalone_context
    from sd2.heads import feature_cache as fc
    from sd2.heads.features import row_features

    rows = _rows(10, 4).input_ids
    want = row_features(target, rows)
    ctx = standalone_context(tmp_path)
    args = (tmp_path / "cache", target, "t", rows, "fp32", "cpu")
    full = fc.load_or_build(*args, 10, contextlib.nullcontext, ctx)
    assert isinstance(full, fc.CachedRows) and full._open == {}               # nothing read yet
    assert len(full) == 10 and all(torch.equal(a, b) for a, b in zip(full, want))
    tail = full[4:]
    assert len(tail) == 6 and torch.equal(tail[0], want[4]) and torch.equal(tail[-1], want[9])
    full[0].add_(1.0)                                                           # a copy, not the mapped shard
    assert torch.equal(full[0], want[0])
    with pytest.raises(IndexError, match=r"row 6 of 6 in feature cache"):
        tail[6]
    again = pickle.loads(pickle.dumps(tail))                                    # after reads: shards open
    assert tail._open and again._open == {} and len(again) == 6 and torch.equal(again[5], want[9])
    half = fc.load_or_build(*args, 10, contextlib.nullcontext, ctx, stored="bf16")
    assert len(list((tmp_path / "cache").iterdir())) == 2                      # its own key
    for a, b in zip(half, want):
        assert a.dtype == torch.float32 and torch.equal(a, b.to(torch.bfloat16).float())
    assert not all(torch.equal(a, b) for a, b in zip(half, want))            # the rounding is real
    idx = {json.loads((d / "index.json").read_text())["stored_dtype"]: json.loads((d / "index.json").read_text())["mb"]
           for d in (tmp_path / "cache").iterdir()}
    assert idx["torch.bfloat16"] * 2 == pytest.approx(idx["torch.float32"], abs=2e-3)      # mb has 3 decimals
    cap = idx["torch.float32"] * 0.75
    with pytest.raises(Sd2Error, match=r"x 4 bytes\) need .* MB; raise feature_cache_mb to at least \d+ or store them "
                                       r"in bf16 \(finetune.feature_cache_dtype: bf16, half the size\)"):
        fc.load_or_build(tmp_path / "other", *args[1:], cap, contextlib.nullcontext, ctx)
    assert len(fc.load_or_build(tmp_path / "other", *args[1:], cap, contextlib.nullcontext, ctx, stored="bf16")) == 10


def test_feature_cache_dtype_needs_the_cache():
    from pydantic import ValidationError

    from sd2.stages.finetune import Config

    with pytest.raises(ValidationError, match="feature_cache_dtype = bf16 .* needs feature_cache_mb") as e:
        Config(feature_cache_dtype="bf16")
    assert [err["loc"] for err in e.value.errors()] == [("feature_cache_dtype",)]      # at the field, not the section
    assert Config(feature_cache_dtype="bf16", feature_cache_mb=10).feature_cache_dtype == "bf16"


def test_feature_cache_is_refused_for_a_causal_lm():
    from sd2 import drafters
    from sd2.stages.finetune import Config

    with pytest.raises(Sd2Error, match="finetune.feature_cache_mb needs a feature-level head"):
        drafters.check("finetune", Config(feature_cache_mb=100), "lm")
    drafters.check("finetune", Config(feature_cache_mb=100), "head")


# -- through sd2 run ----------------------------------------------------------------------------------

def test_sparsegpt_head_branch_through_the_pipeline(tmp_path, tiny_target):
    """drafter: {head: eagle} -> prune sparsegpt 50% -> finetune (mask held, features cached), and a
    2:4 SparseGPT branch; both finetunes share one feature cache in the run folder."""
    import yaml
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from sd2.pipeline.cli import app
    from tests.tiny import write_mtbench

    prompts = write_mtbench(tmp_path / "q.jsonl", n=8, turns=1)
    ft = {"max_steps": 3, "lr": 1e-3, "batch_size": 2, "val_rows": 1, "loss": "fkl", "feature_cache_mb": 8}
    cal = {"samples": 4}
    recipe = {"name": "hp", "seed": 0, "target": {"path": str(tiny_target)}, "drafter": {"head": "eagle"},
              "distill": {"prompts": {"source": str(prompts)}, "max_new_tokens": 12, "batch_size": 4},
              "branches": {"sgpt": [{"prune": {"method": "sparsegpt", "sparsity": 0.5, "calibration": cal}},
                                    {"finetune": ft}],
                           "nm": [{"prune": {"method": "sparsegpt", "mask_structure": "2:4", "calibration": cal}},
                                  {"finetune": ft}]}}
    path = tmp_path / "hp.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    res = CliRunner().invoke(app, ["run", str(path), "--out", str(tmp_path / "art")])
    assert res.exit_code == 0, res.output
    run = tmp_path / "art" / "hp"
    sp = json.loads((run / "02_sgpt.prune" / "sparsity.json").read_text())
    assert sp["method"] == "sparsegpt" and "llm-compressor" in sp["calibration"]["code"]
    assert sp["decoder_sparsity"] == pytest.approx(0.5, abs=0.01)
    for branch, first, tuned_dir in (("sgpt", "02_sgpt.prune", run / "03_sgpt.finetune"),
                                     ("nm", "04_nm.prune", run / "05_nm.finetune")):
        pruned = load_file(str(run / first / "model.safetensors"))
        tuned = load_file(str(tuned_dir / "model.safetensors"))
        assert json.loads((tuned_dir / "finetune.json").read_text())["metrics"]["mask_exact"] is True
        changed = 0
        for k, w in pruned.items():
            if w.dim() == 2:
                zeros = w == 0
                assert zeros.float().mean() == pytest.approx(0.5, abs=0.01), (branch, k)
                if branch == "nm":
                    assert int((w.reshape(w.shape[0], -1, 4) == 0).sum(-1).min()) >= 2, k
                assert torch.all(tuned[k][zeros] == 0), f"{branch} {k}: a pruned weight came back"
                changed += int(not torch.equal(w, tuned[k]))
        assert changed > 0
    caches = [p for p in (run / "feature_cache").iterdir()]
    assert len(caches) == 1 and (caches[0] / "index.json").is_file()
