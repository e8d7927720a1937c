"""Stage finetune on tiny models: the mask held exactly, KD from cached top-k and an online teacher,
validation rows in metrics.jsonl, embeddings frozen/untied, resume after kill -9, clear mismatch errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file

from sd2.core.context import StageInputs, standalone_context
from sd2.core.errors import Sd2Error
from sd2.core.models import ModelSource, load_model, save_model
from sd2.stages import finetune

from tiny import CORPUS, make_model


def write_distilled(folder: Path, tokenizer, n: int = 16, teacher=None, k: int = 6, distill_meta: dict | None = None) -> Path:
    """A distilled dataset per docs/CONTRACTS.md, built by hand: a chat prompt, then a 'response'
    whose tokens carry loss_mask 1; with a teacher model, its top-k logits at the positions that
    predict a response token (entry t predicts input_ids[t + 1])."""
    cols = {c: [] for c in ("id", "category", "messages", "response", "input_ids", "loss_mask")}
    if teacher is not None:
        cols["topk_ids"], cols["topk_logits"] = [], []
    for i in range(n):
        msgs = [{"role": "user", "content": CORPUS[i % len(CORPUS)]}]
        prompt = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, return_dict=True)["input_ids"]
        text = CORPUS[(3 * i + 1) % len(CORPUS)]
        response = tokenizer(text)["input_ids"][: 4 + i % 9] + [tokenizer.eos_token_id]
        ids, mask = prompt + response, [0] * len(prompt) + [1] * len(response)
        for c, v in zip(cols, (f"r{i}", ["writing", "coding"][i % 2], msgs + [{"role": "assistant", "content": text}],
                               text, ids, mask)):
            cols[c].append(v)
        if teacher is not None:
            with torch.no_grad():
                vals, idx = teacher(torch.tensor([ids])).logits[0].topk(k, dim=-1)
            keep = [t + 1 < len(ids) and mask[t + 1] == 1 for t in range(len(ids))]
            cols["topk_ids"].append([idx[t].tolist() if keep[t] else [] for t in range(len(ids))])
            cols["topk_logits"].append([vals[t].tolist() if keep[t] else [] for t in range(len(ids))])
    folder.mkdir(parents=True, exist_ok=True)
    Dataset.from_dict(cols).save_to_disk(str(folder / "dataset"))
    meta = {"tokenizer": "tiny", "vocab_size": len(tokenizer), "topk": k if teacher is not None else None, "policy": "target"}
    (folder / "distill.json").write_text(json.dumps(meta | (distill_meta or {})))
    return folder


def prune_half(src: Path, dst: Path, tokenizer) -> Path:
    """Zero the smaller half (by magnitude) of every 2-D weight in the decoder layers."""
    model = load_model(src)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".layers." in name and p.dim() == 2:
                p[p.abs() <= p.abs().flatten().median()] = 0.0
    save_model(model, tokenizer, dst)
    (dst / "sparsity.json").write_text(json.dumps({"sparsity": 0.5}))
    return dst


def run_stage(tmp: Path, name: str, model: Path, data: Path, target: Path | None = None, **cfg) -> tuple[dict, Path]:
    out = tmp / name
    out.mkdir()
    inputs = StageInputs(model=ModelSource(str(model), "m"), dataset=data,
                         target=ModelSource(str(target), "t") if target else None)
    return finetune.run(finetune.Config(**cfg), inputs, out, standalone_context(tmp)), out


@pytest.fixture(scope="module")
def data(tmp_path_factory, tokenizer, tiny_target):
    return write_distilled(tmp_path_factory.mktemp("distill"), tokenizer, n=16, teacher=load_model(tiny_target))


def test_mask_held_exactly_and_weights_change(tmp_path, tokenizer, tiny_drafter, data):
    sparse = prune_half(tiny_drafter, tmp_path / "sparse", tokenizer)
    before = load_file(str(sparse / "model.safetensors"))
    zeros = sum(int((t == 0).sum()) for k, t in before.items() if ".layers." in k and t.dim() == 2)
    metrics, out = run_stage(tmp_path, "ft", sparse, data, loss="ce", lr=5e-3, weight_decay=0.1, max_steps=4,
                             batch_size=2, grad_accum=2, val_rows=2, checkpoint_every=0)
    after = load_file(str(out / "model.safetensors"))
    assert metrics["mask_exact"] is True and metrics["mask_violations"] == 0
    assert metrics["masked_weights"] == zeros > 0
    for key, w0 in before.items():
        w1 = after[key]
        if ".layers." in key and w0.dim() == 2:
            assert torch.all(w1[w0 == 0] == 0), f"{key}: a pruned weight came back"
            live = w0 != 0
            assert (w1[live] != w0[live]).float().mean() > 0.9, f"{key}: live weights did not train"
    assert not torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    assert json.loads((out / "sparsity.json").read_text()) == {"sparsity": 0.5}  # the mask is unchanged
    assert not (out / "checkpoint").exists()
    assert json.loads((out / "finetune.json").read_text())["metrics"]["mask_exact"] is True


def test_mask_verify_catches_a_revived_weight_and_optimizer_state():
    """The weights are not re-zeroed after each step, so ``verify`` is the guarantee: it must see a
    pruned weight that came back, and optimizer state at a pruned position."""
    from sd2.train.mask import SparsityMask

    p = torch.nn.Parameter(torch.tensor([[0.0, 1.0], [2.0, 0.0]]))
    mask = SparsityMask({"w": p})
    opt = torch.optim.AdamW([p], lr=0.1, weight_decay=0.1)
    for _ in range(3):
        p.grad = torch.ones_like(p)
        mask.mask_grads()
        opt.step()
    assert mask.verify(opt) == {"mask_exact": True, "mask_violations": 0}
    assert bool((p.detach()[~mask.pruned_at["w"]] != torch.tensor([1.0, 2.0])).all())   # live weights moved
    p.grad = torch.ones_like(p)     # a gradient that bypassed mask_grads
    opt.step()
    # both pruned weights revived, and exp_avg and exp_avg_sq are nonzero at both positions
    assert mask.verify(opt) == {"mask_exact": False, "mask_violations": 6}


def test_long_rows_keep_their_answers(tokenizer, data):
    """max_length cuts a long row from the front: every column keeps its last positions, in step,
    so the answer tokens (at the end) and their top-k entries survive."""
    from datasets import load_from_disk

    from sd2.train.batches import load_rows

    full = load_from_disk(str(data / "dataset"))
    rows, _ = load_rows(data, tokenizer, len(tokenizer), max_length=10, need_topk=True)
    for i in range(len(full)):
        ids, mask = full[i]["input_ids"], full[i]["loss_mask"]
        assert len(ids) > 10 and rows.input_ids[i] == ids[-10:] and rows.loss_mask[i] == mask[-10:]
        assert rows.topk_ids[i] == full[i]["topk_ids"][-10:]
        assert sum(rows.loss_mask[i]) == min(sum(mask), 10) > 0   # the answer is still there


def test_dense_model_trains_plainly(tmp_path, tiny_drafter, data):
    metrics, out = run_stage(tmp_path, "ft", tiny_drafter, data, loss="ce", lr=1e-3, max_steps=2, batch_size=4,
                             val_rows=2, checkpoint_every=0)
    assert metrics["mask_held"] is False and metrics["masked_weights"] == 0 and metrics["steps"] == 2


def test_kd_from_topk_logs_validation_and_learns(tmp_path, tiny_drafter, data):
    metrics, _ = run_stage(tmp_path, "ft", tiny_drafter, data, loss="fkl", ce_weight=0.25, temperature=2.0,
                           lr=1e-2, warmup_ratio=0.0, max_steps=8, batch_size=4, val_rows=4, eval_every=4,
                           checkpoint_every=0, log_every=2)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val_mal" in r]
    assert [r["step"] for r in val] == [0, 4, 8]
    assert all(r["val_mal"] >= 1.0 and 0.0 <= r["val_top1"] <= 1.0 and r["val_kd"] is not None for r in val)
    assert val[-1]["val_loss"] < val[0]["val_loss"]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4, 6, 8] and all(r["tokens_per_s"] > 0 for r in train_rows)
    assert metrics["val_mal"] == val[-1]["val_mal"] and metrics["tokens_per_s"] > 0


def test_online_teacher_reads_the_target(tmp_path, tiny_target, tiny_drafter, data):
    cfg = finetune.Config(loss="jsd", teacher="online")
    assert finetune.consumes(cfg) == ("model", "dataset", "target")
    assert finetune.consumes(finetune.Config(loss="fkl")) == ("model", "dataset")
    metrics, _ = run_stage(tmp_path, "ft", tiny_drafter, data, target=tiny_target, loss="jsd", teacher="online",
                           jsd_beta=0.3, lr=1e-2, warmup_ratio=0.0, max_steps=6, batch_size=4, val_rows=4, checkpoint_every=0)
    val = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if "val_kd" in x]
    assert val[-1]["val_kd"] < val[0]["val_kd"]
    with pytest.raises(Sd2Error, match="needs the target"):
        run_stage(tmp_path, "ft2", tiny_drafter, data, loss="jsd", teacher="online", max_steps=1)


def test_freeze_embeddings_with_tied_weights(tmp_path, tokenizer, data):
    tied = make_model(tmp_path / "tied", tokenizer=tokenizer, tie=True, seed=3)
    emb0 = load_model(tied).get_input_embeddings().weight.detach().clone()
    common = dict(loss="ce", lr=1e-2, max_steps=2, batch_size=4, val_rows=2, checkpoint_every=0, freeze_embeddings=True)
    _, out = run_stage(tmp_path, "frozen", tied, data, **common)
    m = load_model(out)
    assert torch.equal(m.get_input_embeddings().weight, emb0) and torch.equal(m.get_output_embeddings().weight, emb0)
    _, out = run_stage(tmp_path, "untied", tied, data, untie_embeddings=True, **common)
    m = load_model(out)
    assert torch.equal(m.get_input_embeddings().weight, emb0)
    assert not torch.equal(m.get_output_embeddings().weight, emb0)  # lm_head trained on its own copy
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False


KILL_SCRIPT = """
import functools, os, signal, sys
sys.path.insert(0, {tests!r})
import conftest  # offline env
import torch
torch.set_num_threads({threads})  # bit-identical needs the parent's thread count (reduction order)
from pathlib import Path
from sd2.core.context import StageInputs, standalone_context
from sd2.core.models import ModelSource
from sd2.stages import finetune
from sd2.train import loop as train

def kill(step):
    if step == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)

train.train = functools.partial(train.train, on_step=kill)
cfg = finetune.Config(**{cfg!r})
finetune.run(cfg, StageInputs(model=ModelSource({model!r}, "m"), dataset=Path({data!r})), Path({out!r}),
             standalone_context(None))
"""


def test_resume_after_kill_9_reaches_the_same_weights(tmp_path, tokenizer, tiny_drafter, data):
    sparse = prune_half(tiny_drafter, tmp_path / "sparse", tokenizer)
    cfg = dict(loss="fkl", ce_weight=0.5, lr=5e-3, max_steps=7, batch_size=2, grad_accum=2, val_rows=2,
               checkpoint_every=2, eval_every=3)
    _, straight = run_stage(tmp_path, "straight", sparse, data, **cfg)

    out = tmp_path / "resumed"
    out.mkdir()
    script = KILL_SCRIPT.format(tests=str(Path(__file__).parent), threads=torch.get_num_threads(), kill_at=5, cfg=cfg, model=str(sparse),
                                data=str(data), out=str(out))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    assert proc.returncode == -9, proc.stderr[-2000:]
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["step"] == 4 and not (out / "model.safetensors").exists()

    metrics = finetune.run(finetune.Config(**cfg), StageInputs(model=ModelSource(str(sparse), "m"), dataset=data),
                           out, standalone_context(tmp_path))
    assert metrics["steps"] == 7 and metrics["mask_exact"] is True
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after resume"
    assert not torch.equal(a["model.layers.0.mlp.up_proj.weight"],
                           load_file(str(sparse / "model.safetensors"))["model.layers.0.mlp.up_proj.weight"])


def test_changed_config_refuses_a_stale_checkpoint(tmp_path, tiny_drafter, data):
    out = tmp_path / "ft"
    out.mkdir()
    (out / "checkpoint").mkdir()
    (out / "checkpoint" / "state.json").write_text(json.dumps({"step": 1, "config": {"lr": 1.0}}))
    with pytest.raises(Sd2Error, match="different config"):
        finetune.run(finetune.Config(max_steps=2, batch_size=4, val_rows=2),
                     StageInputs(model=ModelSource(str(tiny_drafter), "m"), dataset=data), out, standalone_context(tmp_path))


class _Payload:
    """Unpickling this runs code: it creates ``marker``. A checkpoint loader that unpickles is exploitable."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def test_checkpoint_is_safetensors_and_json_and_a_planted_pickle_never_runs(tmp_path, tiny_drafter, data, monkeypatch):
    import functools

    from sd2.train import loop as training

    cfg = dict(loss="ce", lr=5e-3, max_steps=4, batch_size=2, val_rows=2, checkpoint_every=2)

    def crash(step):
        if step == 3:
            raise KeyboardInterrupt  # an interrupted run, after the checkpoint of step 2
    monkeypatch.setattr(training, "train", functools.partial(training.train, on_step=crash))
    with pytest.raises(KeyboardInterrupt):
        run_stage(tmp_path, "ft", tiny_drafter, data, **cfg)
    monkeypatch.undo()
    ckpt = tmp_path / "ft" / "checkpoint"
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "model.safetensors", "optimizer.json", "optimizer.safetensors", "rng-0.json", "rng-0.safetensors",
        "scheduler.json", "scheduler.safetensors", "state.json"]
    # Plant pickle payloads under every name the old format used; resuming must not open them.
    marker = tmp_path / "pwned"
    for name in ("rng-0.pt", "model.pt", "optimizer.pt", "scheduler.pt"):
        torch.save(_Payload(marker), ckpt / name)
    metrics = finetune.run(finetune.Config(**cfg), StageInputs(model=ModelSource(str(tiny_drafter), "m"), dataset=data),
                           tmp_path / "ft", standalone_context(tmp_path))
    assert metrics["steps"] == 4 and not marker.exists()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sum(1 for r in rows if r.get("step") == 0 and "val_loss" in r) == 1  # resumed (no second step-0 validation)

    # A checkpoint in the old pickle format only: refused with a clear error, the payload never runs.
    old = tmp_path / "old"
    (old / "checkpoint").mkdir(parents=True)
    config_json = finetune.Config(**cfg).model_dump(mode="json") | {"seed": 0, "world_size": 1}
    (old / "checkpoint" / "state.json").write_text(json.dumps({"step": 2, "config": config_json}))
    for name in ("rng-0.pt", "model.pt", "optimizer.pt", "scheduler.pt"):
        torch.save(_Payload(marker), old / "checkpoint" / name)
    with pytest.raises(Sd2Error, match=r"pickle files \(model.pt, optimizer.pt, rng-0.pt, scheduler.pt\), which sd2 never loads"):
        finetune.run(finetune.Config(**cfg), StageInputs(model=ModelSource(str(tiny_drafter), "m"), dataset=data),
                     old, standalone_context(None))
    assert not marker.exists()


def test_mismatches_give_clear_errors(tmp_path, tokenizer, tiny_drafter):
    wrong_size = write_distilled(tmp_path / "d1", tokenizer, n=4, distill_meta={"tokenizer": "gpt2", "vocab_size": 50257})
    with pytest.raises(Sd2Error, match=r"tokenizer mismatch.*'gpt2' \(50257 tokens\).*\(320 tokens\)"):
        run_stage(tmp_path, "a", tiny_drafter, wrong_size, max_steps=1)

    # distill.json names a tokenizer folder of the same size whose vocabulary differs
    from tiny import make_tokenizer
    other = make_tokenizer()
    other.add_tokens(["<extra>"])
    vocab = dict(other.get_vocab())
    other_dir = tmp_path / "other_tok"
    make_model(other_dir, tokenizer=other)
    named = write_distilled(tmp_path / "d2", tokenizer, n=4, distill_meta={"tokenizer": str(other_dir), "vocab_size": 320})
    assert len(vocab) != len(tokenizer)
    with pytest.raises(Sd2Error, match="tokenizer mismatch"):
        run_stage(tmp_path, "b", tiny_drafter, named, max_steps=1)

    # token ids beyond the drafter's vocabulary
    big = write_distilled(tmp_path / "d3", tokenizer, n=4)
    ds = Dataset.load_from_disk(str(big / "dataset")).to_dict()
    ds["input_ids"][0][-1] = 5000
    Dataset.from_dict(ds).save_to_disk(str(tmp_path / "d4" / "dataset"))
    (tmp_path / "d4" / "distill.json").write_text((big / "distill.json").read_text())
    with pytest.raises(Sd2Error, match=r"token id 5000.*320 tokens"):
        run_stage(tmp_path, "c", tiny_drafter, tmp_path / "d4", max_steps=1)

    with pytest.raises(Sd2Error, match="no cached top-k|needs cached top-k"):
        run_stage(tmp_path, "d", tiny_drafter, big, loss="tvd", max_steps=1)
    with pytest.raises(Sd2Error, match="fewer than one global batch"):
        run_stage(tmp_path, "e", tiny_drafter, big, batch_size=8, val_rows=1, max_steps=1)
    with pytest.raises(Sd2Error, match="distill.json"):
        run_stage(tmp_path, "f", tiny_drafter, tmp_path / "d4" / "dataset", max_steps=1)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="ce_weight"):
        finetune.Config(loss="ce", ce_weight=0.5)
    with pytest.raises(ValueError, match="jsd_beta"):
        finetune.Config(loss="jsd", jsd_beta=1.0)
    with pytest.raises(ValueError, match="extra"):
        finetune.Config(lr_schedule="linear")


def test_adamw_is_fused_on_cpu_and_keeps_pruned_state_exactly_zero():
    # foreach AdamW's sqrt over half-zero exp_avg_sq was the mask's hidden cost (train.make_adamw)
    from sd2.train.mask import SparsityMask
    from sd2.train.loop import make_adamw

    lin = torch.nn.Linear(16, 16, bias=False)
    with torch.no_grad():
        lin.weight[:, ::2] = 0.0
    opt = make_adamw(list(lin.parameters()), lr=1e-2, weight_decay=0.1)
    assert opt.defaults["fused"] is True
    mask = SparsityMask({"w": lin.weight})
    for _ in range(5):
        lin(torch.randn(4, 16)).pow(2).sum().backward()
        mask.mask_grads()
        opt.step()
        opt.zero_grad()
    assert (lin.weight[:, ::2] == 0).all() and (lin.weight[:, 1::2] != 0).all()
    state = opt.state[lin.weight]
    assert (state["exp_avg"][:, ::2] == 0).all() and (state["exp_avg_sq"][:, ::2] == 0).all()
    assert mask.verify(opt)["mask_exact"] is True
