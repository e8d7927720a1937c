"""EAGLE-3 heads through the pipeline's stages (docs/eagle3.md): the head stage builds one with its draft
vocabulary from the distilled answers, finetune trains it with the training-time test through the one
loop (learning, resume, the mask after prune, the feature cache), its folder round trip, MACs, the
recipe errors that name their field, and publish's speculators export (tests/test_eagle3.py holds
the module itself)."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset

from sd2.core.context import StageInputs, standalone_context
from sd2.core.errors import RecipeError, Sd2Error
from sd2.core.models import ModelSource
from tests.tiny import greedy_rows, killed_after_checkpoint, learnable_target, make_tokenizer

AUX = [1, 2, 3]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A learnable 4-layer tiny target saved with its tokenizer, and a distilled dataset of its own
    greedy answers (192 prompts of 6 tokens, 30-token answers) written by hand as distill writes it."""
    root = tmp_path_factory.mktemp("e3p")
    tok = make_tokenizer()
    target = learnable_target(root / "target", n_layers=4)
    target.save_pretrained(root / "target")
    tok.save_pretrained(root / "target")
    rows = greedy_rows(target, 192, 0)
    cols = {"id": [f"r{i}" for i in range(len(rows))], "category": ["none"] * len(rows),
            "messages": [[{"role": "user", "content": "x"}]] * len(rows), "response": ["y"] * len(rows),
            "input_ids": rows.input_ids, "loss_mask": rows.loss_mask}
    data = root / "distill"
    Dataset.from_dict(cols).save_to_disk(str(data / "dataset"))
    (data / "distill.json").write_text(json.dumps({"tokenizer": "tiny", "vocab_size": len(tok), "policy": "target"}))
    return {"root": root, "target": ModelSource(str(root / "target"), "tgt-fp"), "model": target, "data": data,
            "rows": rows, "tok": tok}


def _head(pair, out, **kw):
    from sd2.stages import head

    cfg = head.Config(type="eagle3", draft_vocab_size=kw.pop("k", 64), aux_layers=AUX, **kw)
    metrics = head.run(cfg, StageInputs(target=pair["target"], dataset=pair["data"]), out, standalone_context(out.parent))
    return ModelSource(str(out), "head-" + out.name, kind="head"), metrics


def _finetune(pair, model, out, **kw):
    from sd2.stages import finetune

    cfg = finetune.Config(**({"loss": "fkl", "batch_size": 8, "val_rows": 16, "mal_gamma": 2, "ttt_depth": 2,
                              "checkpoint_every": 0} | kw))
    return finetune.run(cfg, StageInputs(target=pair["target"], model=model, dataset=pair["data"]), out,
                        standalone_context(out.parent))


def test_stages_build_and_train_a_head_that_learns(pair, tmp_path):
    """head -> finetune on the target's own answers: the draft vocabulary is the answers' most frequent
    tokens, the folder records how it was trained, and on held-out answers the trained head's first
    draft is the target's token far above chance (1/64 over the draft vocabulary) and the fresh head
    (measured on the 2-core AMD EPYC: 0.021 before, 0.092 after 100 steps); the thresholds leave wide
    margins for other CPUs' numerics."""
    from sd2.heads import drafter as hd
    from sd2.heads import io
    from sd2.vocab import token_counts

    model, built = _head(pair, tmp_path / "head")
    assert built["head"] == "eagle3" and built["draft_vocab_size"] == 64 and built["aux_layers"] == AUX
    fresh = hd.load(model.ref)
    counts = token_counts({"input_ids": pair["rows"].input_ids, "loss_mask": pair["rows"].loss_mask}, 320)
    kept = torch.zeros(320, dtype=torch.bool)
    kept[fresh.d2t()] = True
    specials = torch.tensor(sorted(set(pair["tok"].all_special_ids)))
    kept_counts = counts[kept & ~torch.isin(torch.arange(320), specials)]
    assert kept_counts.min() >= counts[~kept].max() * 0.5       # the most frequent (counted on 90% of the rows)
    assert counts[kept].sum() / counts.sum() == pytest.approx(built["coverage_fit"], abs=0.05)
    assert built["coverage_fit"] > 2 * 64 / 320 and built["coverage_heldout"] > 2 * 64 / 320
    m = _finetune(pair, model, tmp_path / "ft", lr=1e-2, max_steps=100, batch_size=16, ttt_depth=1,
                  feature_noise=0.02)
    first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert m["val_acceptance_1"] > 3 / 64 and m["val_acceptance_1"] > 2 * first["val_acceptance_1"], (first, m)
    assert m["val_mal"] == pytest.approx(1 + m["val_acceptance_1"] * (1 + m["val_acceptance_2"]), abs=0.02)
    assert m["val_ttt_positions"] == 16 * 30          # every held-out answer token is a step-0 label
    cfg = io.read_config(tmp_path / "ft")
    assert cfg.type == "eagle3" and cfg.extra["ttt"] == {"depth": 1, "decay": 0.8, "loss": "fkl"}
    trained = hd.load(str(tmp_path / "ft"))
    assert torch.equal(trained.d2t(), fresh.d2t()) and type(trained).__name__ == "Eagle3Drafter"


def test_folder_round_trip_and_a_map_is_never_reused(pair, tmp_path):
    from safetensors.torch import load_file

    from sd2.heads import drafter as hd
    from sd2.heads import io
    from sd2.heads.eagle3 import build, choose_draft_vocab
    from tests.tiny import make_model

    head = build(pair["model"], choose_draft_vocab(pair["rows"].input_ids, None, 320, 50), aux_layers=AUX,
                 target_ref=pair["target"].ref)
    io.save(head, tmp_path / "h", pair["tok"])
    cfg = json.loads((tmp_path / "h" / "config.json").read_text())["sd2_head"]
    assert {k: cfg[k] for k in ("type", "aux_layers", "draft_vocab_size", "num_layers", "feature_sampling")} == \
        {"type": "eagle3", "aux_layers": AUX, "draft_vocab_size": 50, "num_layers": 1, "feature_sampling": False}
    saved = load_file(str(tmp_path / "h" / "model.safetensors"))
    assert saved["d2t"].shape == (50,) and saved["t2d"].dtype == torch.bool and int(saved["t2d"].sum()) == 50
    back = hd.load(str(tmp_path / "h"), pair["model"])
    for k, v in head.state_dict().items():
        assert torch.equal(v, back.module.state_dict()[k]), k
    assert not any("embed" in k for k in saved)
    other = make_model(tmp_path / "o", n_layers=4, tokenizer=make_tokenizer(300))
    with pytest.raises(Sd2Error, match=r"embeddings \[320, 64\].*given target has \[300, 64\]"):
        hd.load(str(tmp_path / "h"), other)          # a map for 320 tokens is not reused on a 300-token target
    deeper = make_model(tmp_path / "d", n_layers=5, tokenizer=pair["tok"])
    with pytest.raises(Sd2Error, match="4-layer target, but the given target has 5 decoder layers"):
        hd.load(str(tmp_path / "h"), deeper)
    with pytest.raises(Sd2Error, match="draft_vocab_size to the K you want"):
        back.trim_vocab([1, 2, 3])


def test_macs_count_fc_the_2h_layer_and_the_k_row_output_layer(pair):
    from sd2.heads.eagle3 import build, choose_draft_vocab
    from sd2.heads.eagle3.drafter import Eagle3Drafter

    head = build(pair["model"], choose_draft_vocab(pair["rows"].input_ids, None, 320, 40), aux_layers=AUX)
    d = Eagle3Drafter(head, pair["model"], pair["tok"])
    c = head.head_config
    h, q, kv, inter = c.hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim, c.intermediate_size
    want = 3 * h * h + 2 * h * (q + 2 * kv) + q * h + 3 * h * inter
    macs = d.macs()
    assert (macs.decoder_dense, macs.lm_head, macs.n_layers) == (want, 40 * h, 1)
    assert [n for n, _ in d.linears()][0] == "fc" and "lm_head" not in dict(d.linears())
    assert d.sparsity()["decoder_sparsity"] == 0.0


def test_prune_then_finetune_holds_the_mask(pair, tmp_path):
    """SparseGPT 50% through the prune stage (llm-compressor's per-layer code, calibrated on the
    head's own inputs), then finetune: every pruned weight stays exactly zero, the others train."""
    from safetensors.torch import load_file

    from sd2.stages import prune

    model, _ = _head(pair, tmp_path / "head")
    cfg = prune.Config(method="sparsegpt", sparsity=0.5, calibration={"samples": 8, "seq_len": 32})
    out = tmp_path / "pruned"
    prune.run(cfg, StageInputs(model=model, dataset=pair["data"]), out, standalone_context(tmp_path))
    m = _finetune(pair, ModelSource(str(out), "pruned", kind="head"), tmp_path / "ft", lr=1e-2, max_steps=3,
                  val_rows=4)
    assert m["mask_held"] and m["mask_exact"] and m["masked_weights"] > 0
    pruned, tuned = (load_file(str(p / "model.safetensors")) for p in (out, tmp_path / "ft"))
    changed = 0
    for k, w in pruned.items():
        if w.dim() == 2 and k != "lm_head.weight":
            zeros = w == 0
            assert zeros.float().mean() == pytest.approx(0.5, abs=0.02), k
            assert torch.all(tuned[k][zeros] == 0), f"{k}: a pruned weight came back"
            changed += int(not torch.equal(w, tuned[k]))
    assert changed > 0 and not bool((pruned["lm_head.weight"] == 0).any())


def _task(pair, head, **kw):
    from sd2.heads.eagle3.train import Eagle3Task
    from sd2.stages.finetune import Config

    cfg = Config(**({"loss": "fkl", "lr": 3e-3, "max_steps": 6, "batch_size": 4, "checkpoint_every": 3,
                     "feature_noise": 0.1, "mal_gamma": 2, "ttt_depth": 2} | kw))
    rows = pair["rows"]
    return cfg, Eagle3Task(cfg, head, pair["model"], rows.subset(list(range(24))), rows.subset([90, 91]), 0)


def _fresh(pair):
    from sd2.heads.eagle3 import build, choose_draft_vocab

    return build(pair["model"], choose_draft_vocab(pair["rows"].input_ids, pair["rows"].loss_mask, 320, 64),
                 aux_layers=AUX, seed=0)


def test_resume_is_bit_identical_and_the_cache_trains_the_same(pair, tmp_path):
    """Cut after a checkpoint and rerun: the same weights bit for bit; trained from the feature cache of
    aux states: the same weights as computing them on the fly."""
    from sd2.train import loop

    def train(folder, cache_mb=None):
        head = _fresh(pair)
        cfg, task = _task(pair, head, feature_cache_mb=cache_mb)
        loop.train(cfg, task, task.rows_train, 0, folder, standalone_context(tmp_path), cfg.model_dump(mode="json"))
        return head

    a = train(tmp_path / "a")

    with killed_after_checkpoint():
        train(tmp_path / "b")
    b = train(tmp_path / "b")
    c = train(tmp_path / "c", cache_mb=50)
    assert any((tmp_path / "feature_cache").iterdir())
    for k, x in a.state_dict().items():
        assert torch.equal(x, b.state_dict()[k]), f"resume: {k}"
        assert torch.equal(x, c.state_dict()[k]), f"cache: {k}"


@pytest.mark.parametrize("precision,identical", [("bf16", True), ("fp32", False)])
def test_a_bf16_cache_trains_bit_identically_under_bf16(pair, tmp_path, precision, identical):
    """Aux states stored in bf16: under bf16 autocast (no feature_noise) the head trains bit for bit as on
    the fly, since fc's autocast matmul rounds them to bf16 anyway. The control: in fp32, fc reads the
    unrounded states on the fly, and the weights differ."""
    from accelerate.state import AcceleratorState

    from sd2.train import loop

    def train(folder, **kw):
        AcceleratorState._reset_state(True)
        folder.mkdir()
        head = _fresh(pair)
        cfg, task = _task(pair, head, precision=precision, feature_noise=0.0, checkpoint_every=0, **kw)
        loop.train(cfg, task, task.rows_train, 0, folder, standalone_context(folder), cfg.model_dump(mode="json"))
        return head

    try:
        a = train(tmp_path / "a")
        b = train(tmp_path / "b", feature_cache_mb=50, feature_cache_dtype="bf16")
    finally:
        AcceleratorState._reset_state(True)
    (cache,) = (tmp_path / "b" / "feature_cache").iterdir()
    assert json.loads((cache / "index.json").read_text())["stored_dtype"] == "torch.bfloat16"
    same = [torch.equal(x, b.state_dict()[k]) for k, x in a.state_dict().items()]
    assert all(same) if identical else not all(same)


def test_feature_cache_refuses_over_the_cap_with_the_size_it_needs(pair, tmp_path):
    from accelerate import Accelerator

    cfg, task = _task(pair, _fresh(pair), feature_cache_mb=0.01, loss="ce")
    # 26 rows x 36 tokens x 3 aux states of 64 floats (ce: no final state) = 0.7 MB
    with pytest.raises(Sd2Error, match=r"feature_cache_mb = 0.01: the target's eagle3 aux \[1, 2, 3\] of these 26 "
                                       r"conversations \(936 tokens x 192 x 4 bytes\) need 0.7 MB; raise feature_cache_mb "
                                       r"to at least 1"):
        task.prepare(Accelerator(cpu=True), tmp_path, standalone_context(tmp_path))


def test_options_an_eagle3_head_does_not_have_are_refused(pair):
    from sd2.heads.eagle3.drafter import Eagle3Drafter
    from sd2.heads import io
    from sd2.stages import head

    d = Eagle3Drafter(_fresh(pair), pair["model"], pair["tok"])
    ctx = standalone_context()
    for kw, msg in [({"unroll": 2}, r"finetune.unroll = 2: .*ttt_depth \(= 1 \+ unroll = 3\)"),
                    ({"feature_weight": 0.5}, "finetune.feature_weight: an eagle3 head trains on the token loss alone")]:
        with pytest.raises(Sd2Error, match=msg):
            d.training_task(_task(pair, d.module)[0].model_copy(update=kw), None, None, 0, None, ctx)
    fspad = io.build("fspad", pair["model"])
    from sd2.heads.drafter import HeadDrafter
    with pytest.raises(Sd2Error, match=r"finetune.ttt_depth sets an eagle3 head's .*finetune.unroll"):
        HeadDrafter(fspad, pair["model"], pair["tok"]).training_task(_task(pair, d.module)[0], None, None, 0, None, ctx)
    with pytest.raises(ValueError, match="needs draft_vocab_size"):
        head.Config(type="eagle3")
    with pytest.raises(ValueError, match="aux_layers, draft_vocab_size: options of an eagle3 head, not of fspad"):
        head.Config(type="fspad", aux_layers=[1, 2, 3], draft_vocab_size=8)


def test_bad_eagle3_recipes_name_the_field(pair, tmp_path):
    """sd2 validate, before any model loads (the target's config.json gives 4 layers, 320 tokens), and
    the head stage with the same message where the layer count is known only once the target loads."""
    from sd2.heads.eagle3.drafter import build
    from sd2.pipeline.schema import validate_recipe
    from sd2.stages import head

    def problems(branches, drafter=None):
        recipe = {"name": "r", "target": {"path": pair["target"].ref}, "drafter": drafter or {"derive": "target",
                  "keep_layers": 2}, "distill": {"prompts": {"source": "mtbench", "limit": 2}}, "branches": branches}
        try:
            validate_recipe(recipe)
        except RecipeError as e:
            return {i.path: i.message for i in e.issues}
        return {}

    ok = [{"head": {"type": "eagle3", "draft_vocab_size": 64, "aux_layers": AUX}}, {"finetune": {"ttt_depth": 3}}]
    assert problems({"e3": ok}) == {}
    bad = problems({"a": [{"head": {"type": "eagle3", "draft_vocab_size": 64}}],          # default (2, 2, 1) collides
                    "b": [{"head": {"type": "eagle3", "draft_vocab_size": 64, "aux_layers": [1, 2, 4]}}],
                    "c": [{"head": {"type": "eagle3", "draft_vocab_size": 500, "aux_layers": AUX}}],
                    "e3": ok, "t": [{"from": "e3"}, {"trim_vocab": {"k": 10}}],
                    "l": [{"from": "e3"}, {"prune": {"method": "layer", "n_remove": 1}}]})
    assert "collide or are out of order" in bad.pop("branches.a[0].head.aux_layers")
    assert "[1, 2, 4] fall outside the target's 4 decoder layers" in bad.pop("branches.b[0].head.aux_layers")
    assert "at most the target's vocabulary size 320" in bad.pop("branches.c[0].head.draft_vocab_size")
    assert "set the head's draft_vocab_size" in bad.pop("branches.t[1].trim_vocab")
    assert "needs a standalone causal LM" in bad.pop("branches.l[1].prune.method")
    assert bad == {}
    assert "built in a branch after distill" in problems({}, {"head": "eagle3", "draft_vocab_size": 8})["drafter.head"]
    cfg = head.Config(type="eagle3", draft_vocab_size=8, aux_layers=[1, 2, 4])
    with pytest.raises(Sd2Error, match=r"head.aux_layers: aux_layers \[1, 2, 4\] fall outside the target's 4"):
        build(cfg, pair["target"], pair["data"], standalone_context())


def test_publish_writes_the_speculators_layout(pair, tmp_path):
    """An eagle3 head publishes in the speculators layout vLLM loads (verifier: the target as a card
    reader finds it); one with feature sampling goes out as sd2's own folder, the card saying why."""
    from safetensors.torch import load_file

    from sd2.heads import io
    from sd2.heads.eagle3 import build, choose_draft_vocab
    from sd2.publish import publish

    for fs in (False, True):
        head = build(pair["model"], choose_draft_vocab(pair["rows"].input_ids, None, 320, 64), aux_layers=AUX,
                     feature_sampling=fs, target_ref=pair["target"].ref)
        folder = tmp_path / f"run{fs}" / "03_e3.finetune"
        io.save(head, folder, pair["tok"])
        out = tmp_path / f"pub{fs}"
        publish(folder, "someone/e3-head", dry_run=True, out=out, say=lambda line: None)
        cfg, card = json.loads((out / "config.json").read_text()), (out / "README.md").read_text()
        assert pair["target"].ref not in (out / "config.json").read_text()
        if not fs:
            assert cfg["speculators_model_type"] == "eagle3" and cfg["eagle_aux_hidden_state_layer_ids"] == AUX
            assert set(load_file(str(out / "model.safetensors"))) >= {"fc.weight", "d2t", "t2d", "lm_head.weight"}
            assert '"method": "eagle3"' in card
        else:
            assert cfg["sd2_head"]["type"] == "eagle3" and "architectures" not in cfg
            assert "feature sampling, a block vLLM's EAGLE-3 model does not have" in card


def _write_chats(tmp_path) -> dict:
    """tmp_path/chats.json: 12 ShareGPT conversations with recorded answers; returns a 3-step finetune config."""
    words = "the quick brown fox jumps over the lazy dog while a robot learns to paint".split()
    chats = [{"id": str(i), "conversations": [{"from": "human", "value": " ".join(words[i % 5:i % 5 + 4])},
                                              {"from": "gpt", "value": " ".join(words[i % 7:] + words[:i % 7])}]}
             for i in range(12)]
    (tmp_path / "chats.json").write_text(json.dumps(chats))
    return {"max_steps": 3, "lr": 1e-3, "batch_size": 2, "val_rows": 2, "loss": "fkl", "ttt_depth": 2, "mal_gamma": 2,
            "feature_cache_mb": 5}


def test_sd2_run_builds_trains_prunes_and_saves_an_eagle3_branch(tmp_path, tiny_target):
    """`sd2 run` on a tiny recipe: distill (the source's recorded answers, nothing generated), an
    eagle3 branch (head -> finetune from the feature cache) and a pruned one from it; a second run
    skips every stage (the fingerprints hold)."""
    import yaml
    from typer.testing import CliRunner

    from sd2.heads import io
    from sd2.pipeline.cli import app

    ft = _write_chats(tmp_path)
    recipe = {"name": "e3", "seed": 0, "target": {"path": str(tiny_target)}, "drafter": {"derive": "target", "keep_layers": 2},
              "distill": {"prompts": {"source": str(tmp_path / "chats.json")}, "answers": "dataset", "max_new_tokens": 16},
              "branches": {"e3": [{"head": {"type": "eagle3", "draft_vocab_size": 32, "aux_layers": AUX}}, {"finetune": ft}],
                           "e3s": [{"from": "e3"}, {"prune": {"method": "wanda", "sparsity": 0.5,
                                                              "calibration": {"samples": 4}}}, {"finetune": ft}]}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    argv = ["run", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "art")]
    res = CliRunner().invoke(app, argv)
    assert res.exit_code == 0, res.output
    run = tmp_path / "art" / "e3"
    assert sorted(p.name for p in run.iterdir() if p.is_dir() and p.name[0].isdigit()) == [
        "00_drafter.derive", "01_distill", "02_e3.head", "03_e3.finetune", "04_e3s.prune", "05_e3s.finetune"]
    head = json.loads((run / "02_e3.head" / "manifest.json").read_text())
    assert set(head["inputs"]) == {"target", "dataset"} and head["metrics"]["draft_vocab_size"] == 32
    for folder in ("03_e3.finetune", "05_e3s.finetune"):
        cfg = io.read_config(run / folder)
        assert cfg.type == "eagle3" and cfg.draft_vocab_size == 32 and cfg.extra["ttt"]["depth"] == 2
        metrics = json.loads((run / folder / "finetune.json").read_text())["metrics"]
        assert metrics["steps"] == 3 and "val_acceptance_1" in metrics
    assert json.loads((run / "05_e3s.finetune" / "finetune.json").read_text())["metrics"]["mask_exact"] is True
    assert any((run / "feature_cache").iterdir())
    again = CliRunner().invoke(app, argv)
    assert again.exit_code == 0 and again.output.count("skip") >= 6, again.output


def test_sd2_run_without_a_drafter_when_every_branch_builds_its_head(tmp_path, tiny_target):
    """A heads-only recipe without `drafter:` runs end to end: no drafter stage, evaluate times the
    branch alone (no raw) and greedy stays lossless, recipe.yaml leaves the drafter out, and a second
    run skips every stage."""
    import yaml
    from typer.testing import CliRunner

    from sd2.pipeline.cli import app
    from sd2.pipeline.schema import validate_recipe

    ft = _write_chats(tmp_path)
    chats = str(tmp_path / "chats.json")
    recipe = {"name": "e3", "seed": 0, "target": {"path": str(tiny_target)},
              "distill": {"prompts": {"source": chats}, "answers": "dataset", "max_new_tokens": 16},
              "branches": {"e3": [{"head": {"type": "eagle3", "draft_vocab_size": 32, "aux_layers": AUX}},
                                  {"finetune": ft}]},
              "evaluate": {"prompts": {"source": chats, "limit": 2}, "gamma": 2, "max_new_tokens": 8, "repeats": 1,
                           "warmup": 0}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    argv = ["run", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "art")]
    res = CliRunner().invoke(app, argv)
    assert res.exit_code == 0, res.output
    run = tmp_path / "art" / "e3"
    assert sorted(p.name for p in run.iterdir() if p.is_dir() and p.name[0].isdigit()) == [
        "00_distill", "01_e3.head", "02_e3.finetune", "03_evaluate"]
    assert set(json.loads((run / "00_distill" / "manifest.json").read_text())["inputs"]) == {"target"}
    report = json.loads((run / "03_evaluate" / "report.json").read_text())
    assert list(report["drafters"]) == ["e3"] and report["drafters"]["e3"]["kind"] == "head"
    assert report["results"] and all(r["lossless"] is True for r in report["results"])
    written = yaml.safe_load((run / "recipe.yaml").read_text())
    assert "drafter" not in written and validate_recipe(written).branches.keys() == {"e3"}
    again = CliRunner().invoke(app, argv)
    assert again.exit_code == 0 and again.output.count("skip") >= 4, again.output
