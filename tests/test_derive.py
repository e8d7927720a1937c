"""The derive stage: a drafter from a subset of the target's layers, by position or by angular distance."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from sd2.core.context import StageInputs, standalone_context
from sd2.core.errors import RecipeError
from sd2.core.models import ModelSource
from sd2.modeling import first_last_layers
from sd2.pipeline.runner import plan
from sd2.pipeline.schema import validate_recipe
from sd2.stages.derive import Config, run
from tiny import make_model, write_mtbench


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tokenizer):
    """A 6-layer tiny Llama whose layers 1 and 2 are near-identity blocks: their attention and MLP
    write back 1e-3 of their usual output into the residual stream."""
    folder = make_model(tmp_path_factory.mktemp("planted"), "llama", n_layers=6, seed=3, tokenizer=tokenizer)
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        for i in (1, 2):
            model.model.layers[i].self_attn.o_proj.weight.mul_(1e-3)
            model.model.layers[i].mlp.down_proj.weight.mul_(1e-3)
    model.save_pretrained(folder)
    return folder


def derive(tmp_path, target, **cfg):
    out = tmp_path / "derived"
    out.mkdir()
    metrics = run(Config(**cfg), StageInputs(target=ModelSource(str(target), "fp")), out, standalone_context(tmp_path))
    return metrics, json.loads((out / "derive.json").read_text()), out


def test_angular_selection_removes_the_planted_near_identity_block(tmp_path, planted, mtbench_file, tokenizer):
    assert first_last_layers(6, 4) == [0, 1, 4, 5]   # by position the planted block would survive
    metrics, info, out = derive(tmp_path, planted, keep_layers=4, select="angular",
                                calibration={"source": str(mtbench_file)}, calibration_samples=4, seq_len=64)
    assert info["removed"] == [1, 2] and info["kept"] == metrics["kept"] == [0, 3, 4, 5]
    assert info["select"] == "angular" and info["calibration_samples"] == 4
    dist = info["angular_distances"]
    assert dist["1"] < 0.01 < min(v for k, v in dist.items() if k != "1")
    full, drafter = AutoModelForCausalLM.from_pretrained(planted), AutoModelForCausalLM.from_pretrained(out)
    assert drafter.config.num_hidden_layers == 4
    ids = torch.tensor([tokenizer("the quick brown fox")["input_ids"]])
    with torch.no_grad():   # the block did (almost) nothing, so the drafter predicts as the target does
        assert torch.equal(drafter(ids).logits.argmax(-1), full(ids).logits.argmax(-1))


def test_first_last_stays_the_default(tmp_path, planted):
    _, info, _ = derive(tmp_path, planted, keep_layers=4)
    assert info["select"] == "first_last" and info["kept"] == [0, 1, 4, 5]


def test_recipe_angular_calibrates_on_the_distill_prompts_by_default(tmp_path, planted, mtbench_file):
    base = {"name": "r", "target": {"path": str(planted)}}
    recipe = validate_recipe({**base, "drafter": {"derive": "target", "keep_layers": 4, "select": "angular"},
                              "distill": {"prompts": {"source": str(mtbench_file), "limit": 3}}})
    step = plan(recipe)[0]
    assert step.stage == "derive" and step.config.select == "angular"
    assert step.config.calibration.source == str(mtbench_file) and step.config.calibration.limit == 3
    own = validate_recipe({**base, "evaluate": {"prompts": {"source": str(mtbench_file)}},
                           "drafter": {"derive": "target", "keep_layers": 4, "select": "angular",
                                       "calibration": {"source": str(mtbench_file), "limit": 2}}})
    assert plan(own)[0].config.calibration.limit == 2
    with pytest.raises(RecipeError, match="drafter.calibration: select: angular measures layer distances"):
        validate_recipe({**base, "evaluate": {"prompts": {"source": str(mtbench_file)}},
                         "drafter": {"derive": "target", "keep_layers": 4, "select": "angular"}})
    with pytest.raises(RecipeError, match="drafter: select: angular chooses which keep_layers layers to keep"):
        validate_recipe({**base, "evaluate": {"prompts": {"source": str(mtbench_file)}},
                         "drafter": {"derive": "target", "layers": [0, 5], "select": "angular"}})


def test_a_branch_can_start_from_an_earlier_branch(tmp_path, planted, mtbench_file):
    """{from: dense} as a branch's first step: its steps continue from the dense branch's model and
    dataset (the SD² sweep prunes the fine-tuned dense drafter, not the raw one)."""
    prompts = {"source": str(mtbench_file)}
    data = {"name": "r", "target": {"path": str(planted)}, "drafter": {"derive": "target", "keep_layers": 4},
            "distill": {"prompts": prompts},
            "branches": {"dense": [{"finetune": {"max_steps": 1}}],
                         "sparse": [{"from": "dense"}, {"prune": {"method": "magnitude", "sparsity": 0.5}},
                                    {"finetune": {"max_steps": 1}}],
                         "own": [{"distill": {"prompts": prompts, "answers": "generate", "max_new_tokens": 4}}],
                         "after_own": [{"from": "own"}, {"finetune": {"max_steps": 1}}]},
            "evaluate": {"prompts": prompts}}
    recipe = validate_recipe(data)
    steps = {s.id: s for s in plan(recipe)}
    assert steps["sparse.prune"].sources["model"] == "dense.finetune"
    assert steps["sparse.finetune"].sources["dataset"] == "distill"
    assert steps["after_own.finetune"].sources == {"target": "target", "model": "drafter.derive", "dataset": "own.distill"}
    assert steps["evaluate"].sources["drafters"]["sparse"] == "sparse.finetune"
    assert recipe.resolved()["branches"]["sparse"][0] == {"from": "dense"}
    assert validate_recipe(recipe.resolved()).branch_from == {"sparse": "dense", "after_own": "own"}
    bad = {**data, "branches": {"a": [{"from": "b"}], "b": [{"finetune": {}}, {"from": "a"}]}}
    with pytest.raises(RecipeError) as err:
        validate_recipe(bad)
    assert "branches.a[0].from: must name an earlier branch (there is none)" in str(err.value)
    assert "branches.b[1].from: from: only goes first in a branch" in str(err.value)
