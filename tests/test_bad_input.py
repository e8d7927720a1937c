"""Bad input of every kind ends in one clear Sd2Error (exit 1, no traceback), found as early as it can be:
unreadable recipes, models the loaders cannot read (GGUF architecture read from the header at validation),
output locations that cannot be created (checked before any model loads), impossible layer pruning."""

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from sd2.core.errors import RecipeError, Sd2Error
from sd2.core.models import ModelRef, load_model, load_tokenizer, resolve
from sd2.pipeline.cli import app
from sd2.pipeline.schema import load_recipe, validate_recipe

from tiny import make_model


def cli(*args):
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in res.output, res.output
    return res


def forbid_model_loads(monkeypatch, before: str) -> None:
    """Make resolving or loading any model fail the test: what is checked must be checked ``before``."""
    import sd2.core.models as models

    def no_models(*a, **k):
        raise AssertionError(f"a model was resolved or loaded before {before}")
    monkeypatch.setattr(models, "resolve", no_models)
    monkeypatch.setattr(models, "load_model", no_models)


def write_gguf_header(path: Path, arch: str, layers: int = 1, source: str | None = None) -> Path:
    """A GGUF file with a header and one tensor, as llama.cpp's converter would write for ``arch``."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(layers)
    if source:
        w.add_string("general.source.huggingface.repository", source)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# -- case 1: a model the loader cannot read ---------------------------------------------------------------

def test_unsupported_gguf_architecture_is_caught_at_validation_and_at_load(tmp_path, tiny_target):
    gg = write_gguf_header(tmp_path / "rwkv.gguf", "rwkv7")
    recipe = {"name": "r", "target": {"gguf": str(gg)}, "drafter": {"path": str(tiny_target)},
              "evaluate": {"prompts": {"source": "mtbench"}}}
    with pytest.raises(RecipeError, match=r"target.gguf: .*rwkv.gguf is a GGUF of architecture 'rwkv7', which "
                                          r"transformers cannot load \(its GGUF loader supports: .*llama"):
        validate_recipe(recipe)
    with pytest.raises(Sd2Error, match="architecture 'rwkv7'"):
        resolve(ModelRef(gguf=str(gg)))  # converting it: the same error, before transformers is asked
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    res = cli("validate", path)
    assert res.exit_code == 1 and "architecture 'rwkv7'" in res.output
    res = cli("eval", "--target", gg, "--drafter", tiny_target, "--out", tmp_path / "ev")
    assert res.exit_code == 1 and "architecture 'rwkv7'" in res.output


def test_a_file_that_is_not_gguf_is_named(tmp_path, tiny_target):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"\x00\x01not a gguf at all" * 8)
    with pytest.raises(RecipeError, match=r"target.gguf: cannot read the GGUF file .*junk.gguf: .*Expected a GGUF model file"):
        validate_recipe({"name": "r", "target": {"gguf": str(junk)}, "drafter": {"path": str(tiny_target)},
                         "evaluate": {"prompts": {"source": "mtbench"}}})


def test_damaged_model_folders_give_sd2_errors(tmp_path, tokenizer):
    import shutil

    good = make_model(tmp_path / "good", n_layers=1, tokenizer=tokenizer)
    torn = shutil.copytree(good, tmp_path / "torn")
    data = (torn / "model.safetensors").read_bytes()
    (torn / "model.safetensors").write_bytes(data[: len(data) // 3])  # a partial copy
    with pytest.raises(Sd2Error, match=r"cannot (load|read) (the )?model '.*torn'"):
        load_model(torn)
    bad_cfg = shutil.copytree(good, tmp_path / "badcfg")
    (bad_cfg / "config.json").write_text(json.dumps({"model_type": "no-such-arch"}))
    with pytest.raises(Sd2Error, match=r"badcfg"):
        load_model(bad_cfg)
    bad_tok = shutil.copytree(good, tmp_path / "badtok")
    (bad_tok / "tokenizer.json").write_text("{not json")
    with pytest.raises(Sd2Error, match=r"cannot read the tokenizer of '.*badtok'.*Expected tokenizer files"):
        load_tokenizer(bad_tok)


# -- case 2: a recipe that is not readable text -------------------------------------------------------------

def test_unreadable_recipes(tmp_path, monkeypatch):
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00\x81binary")
    res = cli("validate", binary)
    assert res.exit_code == 1 and "not a text file: byte 0 is not UTF-8" in res.output
    folder = tmp_path / "folder.yaml"
    folder.mkdir()
    res = cli("validate", folder)
    assert res.exit_code == 1 and "is a folder; give the recipe's .yaml file" in res.output
    locked = tmp_path / "locked.yaml"
    locked.write_text("name: x\n")

    def denied(self):  # tests may run as root, where chmod 000 does not stop a read
        raise PermissionError(13, "Permission denied", str(self))
    monkeypatch.setattr(Path, "read_bytes", denied)
    res = cli("validate", locked)
    assert res.exit_code == 1 and "cannot read the recipe file: Permission denied" in res.output


# -- case 3: an output location that cannot be created ----------------------------------------------------

def test_out_under_a_file_fails_before_any_model_loads(tmp_path, tiny_target, monkeypatch):
    forbid_model_loads(monkeypatch, "the output location was checked")
    blocker = tmp_path / "afile"
    blocker.write_text("x")

    res = cli("eval", "--target", tiny_target, "--drafter", tiny_target, "--out", blocker / "out")
    assert res.exit_code == 1 and "afile is a file, not a folder" in res.output

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "r", "target": {"path": str(tiny_target)},
                                      "drafter": {"path": str(tiny_target)},
                                      "evaluate": {"prompts": {"source": "mtbench"}}}))
    res = cli("run", recipe, "--out", blocker / "art")
    assert res.exit_code == 1 and "afile is a file, not a folder" in res.output

    res = cli("publish", tiny_target, "--repo-id", "me/d", "--dry-run", "--out", blocker / "pub" / "x")
    assert res.exit_code == 1 and "afile is a file, not a folder" in res.output


# -- case 3b: a prompt file that is broken inside ----------------------------------------------------------

def test_broken_prompt_files_fail_the_recipe_before_any_model_loads(tmp_path, tiny_target, monkeypatch):
    """A prompt file whose records are broken used to pass `sd2 validate` and fail only when the
    distill stage read it, after the drafter had been derived. Now every local prompt file a recipe
    names is read through at validation; the error names the field and the line."""
    forbid_model_loads(monkeypatch, "the prompt files were checked")
    good = tmp_path / "good.jsonl"
    good.write_text('{"turns": ["hello"]}\n')
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"turns": ["ok"]}\n{"turns": [oops]}\n')
    role = tmp_path / "role.jsonl"
    role.write_text(json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    recipe = {"name": "r", "target": {"path": str(tiny_target)},
              "drafter": {"derive": "target", "keep_layers": 1},
              "distill": {"prompts": [{"source": str(good)}, {"source": str(bad)}], "max_new_tokens": 4},
              "branches": {"a": [{"distill": {"prompts": {"source": str(role)}}}, {"finetune": {"max_steps": 1}}]},
              "evaluate": {"prompts": {"source": str(empty)}}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    res = cli("validate", path)
    assert res.exit_code == 1, res.output
    out = " ".join(res.output.split())
    assert "distill.prompts[1].source: prompt file" in out and "bad.jsonl: invalid JSON at line 2" in out
    assert "branches.a[0].distill.prompts.source:" in out and "message 0 has unknown role 'robot'" in out
    assert "evaluate.prompts.source:" in out and "empty.jsonl holds no" in out
    assert "good.jsonl" not in out
    res = cli("run", path, "--out", tmp_path / "art")
    assert res.exit_code == 1 and "invalid JSON at line 2" in " ".join(res.output.split())
    assert not (tmp_path / "art").exists()          # nothing was started

    # a chat file none of whose records has a user turn: nothing to prompt with
    nouser = tmp_path / "nouser.jsonl"
    nouser.write_text('{"messages": []}\n{"messages": [{"role": "assistant", "content": "hi"}]}\n')
    recipe["evaluate"]["prompts"] = {"source": str(nouser)}
    path.write_text(yaml.safe_dump(recipe))
    res = cli("validate", path)
    assert res.exit_code == 1 and "evaluate.prompts.source:" in res.output
    assert "none of its 2 conversation(s) has a user turn" in " ".join(res.output.split())
    recipe["evaluate"]["prompts"] = {"source": str(empty)}
    path.write_text(yaml.safe_dump(recipe))

    bad.write_text('{"turns": ["ok"]}\n{"turns": ["fixed"]}\n')
    role.write_text(json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n")
    empty.write_text('{"turns": ["hi"]}\n')
    res = cli("validate", path)
    assert res.exit_code == 0, res.output

    # evaluate.prompts is a source or a mix like distill.prompts: one clean problem, no union internals
    res = cli("validate", path, f"evaluate.prompts.source={tmp_path / 'nope.jsonl'}")
    assert res.exit_code == 1 and "1 problem(s)" in res.output and "function-after" not in res.output
    assert "evaluate.prompts: prompt source" in res.output and "does not exist" in res.output


# -- case 4: an impossible layer-pruning request -----------------------------------------------------------

def _layer_recipe(drafter, prune, target=None):
    return {"name": "r", "target": {"path": str(target or drafter)}, "drafter": drafter if isinstance(drafter, dict) else {"path": str(drafter)},
            "distill": {"prompts": {"source": "mtbench"}},
            "branches": {"layer": [{"prune": {"method": "layer", **prune}}]}}


def test_layer_pruning_is_checked_at_validation(tmp_path, tokenizer, tiny_target):
    one = make_model(tmp_path / "one", n_layers=1, tokenizer=tokenizer)
    with pytest.raises(RecipeError, match=r"branches.layer\[0\].prune.keep_layers: a 1-layer drafter cannot be layer-pruned"):
        validate_recipe(_layer_recipe(one, {"keep_layers": 5}))
    # a derived drafter: its layer count is keep_layers (the 4-layer target keeps 3)
    derived = {"derive": "target", "keep_layers": 3}
    with pytest.raises(RecipeError, match=r"drafter has 3 decoder layers at this step, so keep_layers must be in \[1, 2\]; got 3"):
        validate_recipe(_layer_recipe(derived, {"keep_layers": 3}, tiny_target))
    with pytest.raises(RecipeError, match=r"so n_remove must be in \[1, 2\]; got 5"):
        validate_recipe(_layer_recipe(derived, {"n_remove": 5}, tiny_target))
    validate_recipe(_layer_recipe(derived, {"keep_layers": 2}, tiny_target))  # a possible request passes
    # steps chain: after pruning to 1 layer, a second layer prune is impossible
    r = _layer_recipe(derived, {"keep_layers": 1}, tiny_target)
    r["branches"]["layer"].append({"prune": {"method": "layer", "n_remove": 1}})
    with pytest.raises(RecipeError, match=r"branches.layer\[1\].prune.n_remove: a 1-layer drafter cannot"):
        validate_recipe(r)
    # a branch that starts `from:` another starts at that branch's layer count
    r = _layer_recipe(derived, {"keep_layers": 1}, tiny_target)
    r["branches"]["more"] = [{"from": "layer"}, {"prune": {"method": "layer", "match_sparsity": 0.5}}]
    with pytest.raises(RecipeError, match=r"branches.more\[1\].prune.match_sparsity: a 1-layer drafter cannot"):
        validate_recipe(r)
    # deriving more layers than the target has
    with pytest.raises(RecipeError, match=r"drafter.keep_layers: must be in \[1, 4\]: the target has 4 decoder layers \(got 9\)"):
        validate_recipe(_layer_recipe({"derive": "target", "keep_layers": 9}, {"keep_layers": 2}, tiny_target))


def test_layer_pruning_checked_at_run_time_too():
    from sd2.stages import prune

    cfg = prune.Config(method="layer", keep_layers=5)
    assert prune.layer_request(1, cfg) == (0, prune.layer_request(1, cfg)[1])
    assert "a 1-layer drafter cannot be layer-pruned" in prune.layer_request(1, cfg)[1]
    assert prune.layer_request(8, cfg) == (3, None)
    assert "keep_layers must be in [1, 3]; got 5" in prune.layer_request(4, cfg)[1]


def test_cli_commands_given_files_of_the_wrong_kind(tmp_path):
    binary = tmp_path / "bin.json"
    binary.write_bytes(b"\xff\x00binary")
    res = cli("compare", binary, binary)
    assert res.exit_code == 2 and "bin.json is not valid JSON" in res.output
    res = cli("eval", "--target", binary, "--drafter", binary, "--out", tmp_path / "ev")
    assert res.exit_code == 1 and "model folder not found: " in res.output and "is a file" in res.output
    res = cli("eval", "--target", binary, "--drafter", binary, "--prompts", tmp_path / "none.jsonl", "--out", tmp_path / "ev")
    assert res.exit_code == 1 and "error: --prompts: prompt source" in res.output and "none.jsonl' does not exist" in res.output


def test_sd2_eval_names_every_bad_model_before_loading_any(tmp_path, tiny_target):
    """A missing target and a drafter folder without config.json: both named at once, no model loaded."""
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    res = cli("eval", "--target", tmp_path / "nope-target", "--drafter", f"mine={empty}", "--out", tmp_path / "ev")
    assert res.exit_code == 1
    assert f"--target {tmp_path / 'nope-target'}: model folder not found" in res.output
    assert f"--drafter {empty}: the folder has no config.json" in res.output
    # a prompt file whose records have no user turn is named with them, before any model loads
    nouser = tmp_path / "nouser.jsonl"
    nouser.write_text('{"messages": []}\n')
    res = cli("eval", "--target", tmp_path / "nope-target", "--drafter", "prompt_lookup", "--prompts", nouser,
              "--out", tmp_path / "ev")
    out = " ".join(res.output.split())
    assert res.exit_code == 1 and "--prompts" in out and "has a user turn" in out and "model folder not found" in out
