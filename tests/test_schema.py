"""Recipe validation: every problem at once, each naming the field path, the bad value and what is allowed."""

import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from sd2.pipeline.cli import app
from sd2.core.errors import RecipeError
from sd2.core.models import ModelRef
from sd2.pipeline.schema import apply_overrides, load_recipe, validate_recipe

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


def base(target: Path) -> dict:
    return {"name": "t", "target": {"path": str(target)}, "drafter": {"derive": "target", "keep_layers": 2},
            "distill": {"prompts": {"source": "mtbench", "limit": 2}, "max_new_tokens": 8},
            "branches": {"dense": [{"finetune": {"epochs": 1}}]},
            "evaluate": {"prompts": {"source": "mtbench", "limit": 2}}}


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_validates(path):
    text = path.read_text()
    assert text.startswith("#") and "sd2 run" in text.splitlines()[0], "a recipe opens with the command that runs it"
    upstream = (yaml.safe_load(text).get("drafter") or {}).get("path")
    if upstream and not Path(upstream).is_dir():
        # a recipe that continues another recipe's output (smollm2-eagle3-fresh) validates in full once that
        # recipe has run; before, its one problem is the missing folder, named with the fix
        with pytest.raises(RecipeError) as e:
            load_recipe(path)
        assert [i.path for i in e.value.issues] == ["drafter.path"], str(e.value)
        assert f"folder not found: {upstream}" in str(e.value) and "run that recipe first" in str(e.value)
        return
    load_recipe(path)


def test_a_missing_drafter_folder_is_one_error_with_the_fix_not_kind_errors(tmp_path, tiny_target, monkeypatch):
    """A drafter.path that is not there (another recipe's output, not yet run) is one error naming the
    folder, where a relative path is read from, and the fix; its kind is unknown, so a branch's head-only
    options draw no "needs a feature-level head" errors."""
    data = base(tiny_target)
    data["drafter"] = {"path": "artifacts/upstream/16_head.finetune"}
    data["branches"] = {"more": [{"finetune": {"epochs": 1, "ttt_depth": 3, "feature_cache_mb": 100}}]}
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RecipeError) as e:
        validate_recipe(data)
    assert [i.path for i in e.value.issues] == ["drafter.path"], str(e.value)
    msg = e.value.issues[0].message
    assert msg.startswith("folder not found: artifacts/upstream/16_head.finetune (a relative path is read from the "
                          f"current folder, {tmp_path})") and msg.endswith("run that recipe first")


def test_recipes_folder_is_not_empty():
    assert RECIPES, "recipes/ must ship runnable recipes"


def test_broken_recipe_names_every_error(tmp_path, tiny_target):
    data = base(tiny_target)
    data["seeed"] = 1                                   # misspelt top-level field
    data["target"]["revison"] = "main"                  # unknown key inside a model ref
    data["branches"]["sparse"] = [{"prune": {"method": "sparsegpt", "sparsity": 1.5}}]  # out of range
    data["branches"]["dense"].append({"finetun": {}})   # misspelt stage
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(data))
    with pytest.raises(RecipeError) as err:
        load_recipe(p)
    msg = str(err.value)
    assert "seeed: unknown key (did you mean 'seed'?)" in msg
    assert "target.revison: unknown key (did you mean 'revision'?)" in msg
    assert "branches.sparse[0].prune.sparsity" in msg and "1.5" in msg
    assert "branches.dense[1].finetun: unknown stage (did you mean 'finetune'?)" in msg
    assert len(err.value.issues) == 4


def test_validate_cli_exits_1_without_traceback(tmp_path, tiny_target):
    data = base(tiny_target)
    data["seeed"] = 1
    data["evaluate"]["gama"] = 4
    data["branches"]["sparse"] = [{"prune": {"method": "sparsegpt", "sparsity": 1.5}}]
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(data))
    res = CliRunner().invoke(app, ["validate", str(p)])
    assert res.exit_code == 1
    assert "Traceback" not in res.output
    for needle in ("seeed", "evaluate.gama", "did you mean 'gamma'", "branches.sparse[0].prune.sparsity"):
        assert needle in res.output


def test_valid_recipe_and_cli_ok(tmp_path, tiny_target):
    p = tmp_path / "ok.yaml"
    p.write_text(yaml.safe_dump(base(tiny_target)))
    res = CliRunner().invoke(app, ["validate", str(p)])
    assert res.exit_code == 0, res.output
    assert "drafter.derive, distill, dense.finetune, evaluate" in res.output


def test_missing_paths_are_reported(tmp_path):
    data = {"name": "t", "target": {"path": str(tmp_path / "nope")}, "drafter": {"gguf": str(tmp_path / "x.gguf")},
            "evaluate": {}}
    with pytest.raises(RecipeError) as err:
        validate_recipe(data)
    msg = str(err.value)
    assert "target.path: folder not found" in msg and "drafter.gguf: gguf file not found" in msg
    assert "relative path" not in msg                                  # absolute paths: nothing to explain


def test_a_missing_gguf_says_where_it_was_looked_for(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    issues = {}
    for ref in ({"gguf": "models/m.gguf"}, {"gguf": "m.gguf", "package": "json"}):
        with pytest.raises(RecipeError) as err:
            validate_recipe({"name": "t", "target": ref, "evaluate": {}})
        issues[ref["gguf"]] = {i.path: i.message for i in err.value.issues}["target.gguf"]
    assert issues["models/m.gguf"] == (f"gguf file not found: models/m.gguf (a relative path is read from the current "
                                       f"folder, {tmp_path}); give its path, or package: with the installed Python "
                                       f"package that holds it")
    assert issues["m.gguf"].startswith("gguf file not found: ") and issues["m.gguf"].endswith(
        "/json/m.gguf (in package 'json')")


def test_model_ref_kinds_and_shorthand(tmp_path):
    assert ModelRef.model_validate("org/model").kind == "hub"
    assert ModelRef.model_validate(str(tmp_path)).kind == "path"
    assert ModelRef.model_validate({"gguf": "a.gguf", "package": "p"}).kind == "gguf"
    for bad in ({"hub": "a/b", "path": "."}, {"hub": "a/b", "keep_layers": 2}, {},
                {"derive": "target", "layers": [0, 3]}):   # a source of weights only names where they are
        with pytest.raises(Exception):
            ModelRef.model_validate(bad)


def test_a_built_drafter_is_its_stages_config(tiny_target):
    """drafter: {derive: target, ...} and {head: ..., num_layers: N} are the derive and head stages'
    own configs, checked by them (errors under drafter.*), planned as drafter.derive / drafter.head."""
    from sd2.pipeline.runner import plan

    data = base(tiny_target) | {"drafter": {"derive": "target", "layers": [0, 1]}}
    r = validate_recipe(data)
    assert r.recipe.drafter is None and r.drafter_build[0] == "derive" and r.drafter_build[1].layers == [0, 1]
    assert r.resolved()["drafter"] == {"derive": "target", "layers": [0, 1], "select": "first_last",
                                       "calibration_samples": 64, "seq_len": 256}
    head = validate_recipe(base(tiny_target) | {"drafter": {"head": "eagle", "num_layers": 2}})
    assert [(s.id, s.kind) for s in plan(head)][:1] == [("drafter.head", "head")]
    assert head.drafter_build[1].num_layers == 2 and head.resolved()["drafter"] == {"head": "eagle", "num_layers": 2}
    for bad, where in [({"derive": "target", "layers": [1, 0]}, r"drafter.layers: layer indices must be distinct"),
                       ({"head": "eagle", "num_layers": 9}, r"drafter.num_layers: Input should be less than"),
                       ({"head": "medusa"}, r"drafter.head: Input should be 'eagle', 'fspad' or 'eagle3' \(got 'medusa'\)"),
                       ({"derive": "drafter", "keep_layers": 2}, r"drafter.derive: a drafter is derived from the target"),
                       ({"derive": "target", "keep_layers": 2, "hub": "a/b"}, r"drafter: give exactly one of")]:
        with pytest.raises(RecipeError, match=where):
            validate_recipe(base(tiny_target) | {"drafter": bad})


def test_a_derive_needs_exactly_one_of_keep_layers_or_layers(tiny_target):
    data = base(tiny_target)
    data["drafter"] = {"derive": "target"}
    with pytest.raises(RecipeError, match="drafter: give exactly one of keep_layers or layers"):
        validate_recipe(data)


def test_derived_target_is_refused(tiny_target):
    data = base(tiny_target)
    data["target"] = {"derive": "target", "keep_layers": 2}
    with pytest.raises(RecipeError, match="target cannot be derived"):
        validate_recipe(data)


def test_overrides_apply_and_bad_paths_error():
    data = {"evaluate": {"gamma": 4}, "branches": {"s": [{"prune": {"sparsity": 0.5}}]}}
    apply_overrides(data, ["evaluate.gamma=[2,4]", "branches.s.0.prune.sparsity=0.6", "seed=3"])
    assert data["evaluate"]["gamma"] == [2, 4] and data["branches"]["s"][0]["prune"]["sparsity"] == 0.6
    assert data["seed"] == 3
    with pytest.raises(RecipeError, match="must look like key.path=value"):
        apply_overrides(data, ["novalue"])
    with pytest.raises(RecipeError, match="path does not exist"):
        apply_overrides(data, ["branches.s.7.prune.sparsity=1"])


def test_stages_command_lists_registry():
    res = CliRunner().invoke(app, ["stages"])
    assert res.exit_code == 0
    for name in ("derive", "distill", "prune", "finetune", "trim_vocab", "evaluate"):
        assert name in res.output


def test_reserved_branch_names(tiny_target):
    data = base(tiny_target)
    data["branches"]["raw"] = [{"finetune": {}}]
    with pytest.raises(RecipeError, match="branches.raw: 'raw' is reserved"):
        validate_recipe(data)


def test_yaml_syntax_error_names_the_file_and_line(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("name: x\ntarget: {gguf: a\n  b: [\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(bad)
    msg = str(e.value)
    assert f'in "{bad}", line 2' in msg
    assert "<unicode string>" not in msg


def test_a_value_a_validator_already_names_is_not_repeated(tiny_target):
    data = base(tiny_target)
    data["branches"] = {"sparse": [{"prune": {"method": "sparsegpt", "sparsity": 1.5}}]}
    with pytest.raises(RecipeError) as e:
        validate_recipe(data, "r.yaml")
    msg = str(e.value)
    assert "got 1.5" in msg and "(got 1.5)" not in msg


@pytest.mark.parametrize("prompts, where", [({"source": "mtbnech"}, "distill.prompts"),
                                            ([{"source": "mtbench"}, {"source": "mtbnech"}], "distill.prompts[1]")])
def test_prompt_source_errors_name_the_entry_without_union_tags(tiny_target, prompts, where):
    data = base(tiny_target)
    data["distill"]["prompts"] = prompts
    with pytest.raises(RecipeError) as e:
        validate_recipe(data, "r.yaml")
    assert f"{where}:" in str(e.value) and "union-" not in str(e.value) and ".one" not in str(e.value)


def test_drafter_kind_mismatches_are_recipe_errors_naming_the_field(tmp_path, tiny_target):
    """The planner knows which kind of drafter each branch step receives (a causal LM, or a head after
    `- head:` or with drafter: {head: ...}), so options the kind lacks are refused by `sd2 validate`,
    before any model loads, and a `from:` branch carries its kind on."""
    data = base(tiny_target)
    data["branches"] = {
        "dense": [{"finetune": {"epochs": 1, "feature_noise": 0.1}}],                    # a head-only option on an LM
        "head": [{"head": {"type": "eagle"}}, {"prune": {"method": "layer", "n_remove": 1}},  # LM-only on a head
                 {"finetune": {"feature_noise": 0.1, "unroll": 1}}],                     # fine on a head
        "more": [{"from": "head"}, {"prune": {"recipe": "a: {b: 1}"}},                    # a head, via from:
                 {"finetune": {"freeze_embeddings": True}}],
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    res = CliRunner().invoke(app, ["validate", str(path)])
    assert res.exit_code == 1 and "Traceback" not in res.output
    out = " ".join(res.output.split())
    assert "branches.dense[0].finetune.feature_noise: finetune.feature_noise needs a feature-level head" in out
    assert "branches.head[1].prune.method: prune.method needs a standalone causal LM" in out
    assert "use method: sparsegpt, wanda or magnitude" in out
    assert "branches.more[1].prune.recipe" in out and "branches.more[2].finetune.freeze_embeddings" in out
    assert "branches.head[2]" not in out
    with pytest.raises(RecipeError, match=r"branches\.dense\[0\]\.finetune\.feature_noise"):
        validate_recipe(data | {"branches": {"dense": data["branches"]["dense"]}})
    head_first = base(tiny_target) | {"drafter": {"head": "fspad"},
                                      "branches": {"h": [{"prune": {"method": "layer", "keep_layers": 1}}]}}
    with pytest.raises(RecipeError, match=r"branches\.h\[0\]\.prune\.method: prune\.method needs a standalone"):
        validate_recipe(head_first)


def test_step_errors_do_not_breed_false_cross_step_errors(tmp_path, tiny_target):
    """A branch with a step that fails its own validation is left out of the checks across steps (its
    sequence is unknown), indices count a `from:` line, a head step ends layer counting, and derive's
    layers list is not empty (found by a newcomer check: each of these gave a wrong second error)."""
    data = base(tiny_target) | {"drafter": {"derive": "target", "keep_layers": 2}}
    data["branches"] = {
        "h": [{"head": {"type": "eagel"}}, {"finetune": {"loss": "fkl", "feature_noise": 0.1}}],
        "d": [{"finetune": {"lr": -1}}, {"prune": {"method": "layer", "keep_layers": 9}}],
        "a": [{"finetune": {"max_steps": 2}}],
        "e": [{"from": "a"}, {"trim_vocab": {"k": 99999}}],
        "g": [{"head": {"type": "eagle"}}, {"prune": {"method": "layer", "keep_layers": 3}}],
    }
    with pytest.raises(RecipeError) as err:
        validate_recipe(data)
    out = " ".join(str(err.value).split())
    assert "branches.h[0].head.type" in out and "branches.h[1]" not in out          # no false 'standalone' error
    assert "branches.d[0].finetune.lr" in out and "branches.d[1]" not in out and "branches.d[0].prune" not in out
    assert "branches.e[1].trim_vocab.k" in out and "branches.e[0].trim_vocab" not in out
    assert "branches.g[1].prune.method: prune.method needs a standalone causal LM" in out
    assert "keep_layers must be in" not in out                                     # no layer count through a head
    empty = base(tiny_target) | {"drafter": {"derive": "target", "layers": []}}
    with pytest.raises(RecipeError, match=r"drafter\.layers"):
        validate_recipe(empty)


def test_a_broken_drafter_build_and_model_builders_in_the_middle(tiny_target):
    """Found by a newcomer check: a broken `drafter:` build no longer gives a branch step a false
    'standalone causal LM' error (its kind is unknown); `{head: fspad, type: eagle}` is refused, not
    silently built as fspad; and a `- head:` step that would discard the steps (or the `from:` branch)
    before it is refused, naming the step."""
    broken = base(tiny_target) | {"drafter": {"head": "fspad", "num_layers": 99},
                                  "branches": {"a": [{"finetune": {"feature_noise": 0.1}}]}}
    with pytest.raises(RecipeError) as err:
        validate_recipe(broken)
    out = " ".join(str(err.value).split())
    assert "drafter.num_layers" in out and "feature_noise" not in out
    with pytest.raises(RecipeError, match=r"drafter\.type: the head's type is the value of head: write head: 'eagle'"):
        validate_recipe(base(tiny_target) | {"drafter": {"head": "fspad", "type": "eagle"}})
    middle = base(tiny_target) | {"drafter": {"derive": "target", "keep_layers": 1}, "branches": {
        "a": [{"prune": {"method": "magnitude", "sparsity": 0.5}}, {"head": {"type": "fspad"}}],
        "b": [{"head": {"type": "eagle"}}],
        "c": [{"from": "b"}, {"head": {"type": "fspad"}}]}}
    with pytest.raises(RecipeError) as err:
        validate_recipe(middle)
    out = " ".join(str(err.value).split())
    assert "branches.a[1].head: head builds a new drafter from the target, so it would discard the steps before it" in out
    assert "branches.c[1].head: head builds a new drafter from the target, so it would discard branch 'b'" in out
    assert "branches.b[0]" not in out


def test_evaluate_drafters_picks_the_branches_evaluated(tmp_path, tiny_target):
    from sd2.pipeline.runner import plan

    data = base(tiny_target)
    data["branches"]["sparse"] = [{"prune": {"method": "magnitude", "sparsity": 0.5}}]
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(data))
    every = plan(load_recipe(p))[-1]
    assert every.stage == "evaluate" and list(every.sources["drafters"]) == ["raw", "dense", "sparse"]

    data["evaluate"]["drafters"] = ["sparse"]
    p.write_text(yaml.safe_dump(data))
    chosen = plan(load_recipe(p))[-1]
    assert chosen.sources["drafters"] == {"sparse": "sparse.prune"}

    data["evaluate"]["drafters"] = ["sparse", "dens", "raw"]
    p.write_text(yaml.safe_dump(data))
    with pytest.raises(RecipeError) as err:
        load_recipe(p)
    assert len(err.value.issues) == 1
    assert ("evaluate.drafters[1]: names no drafter of this recipe (did you mean 'dense'?); give a branch name or "
            "'raw' (the un-branched drafter): raw, dense, sparse") in str(err.value)

    data["evaluate"]["prompt_lookup"] = {}
    data["evaluate"]["drafters"] = ["sparse", "target", "prompt_lookup", "sparse"]
    p.write_text(yaml.safe_dump(data))
    with pytest.raises(RecipeError) as err:
        load_recipe(p)
    msg = str(err.value)
    assert len(err.value.issues) == 3
    assert "evaluate.drafters[1]: 'target' is the baseline, always timed" in msg
    assert "evaluate.drafters[2]: 'prompt_lookup' is prompt lookup, which evaluate.prompt_lookup turns on or off" in msg
    assert "evaluate.drafters[3]: 'sparse' is listed twice" in msg

    for bad, says in (([], "an empty list evaluates no drafter; leave drafters out"),
                      ("sparse", "give a list of branch names, e.g. drafters: [sparse]")):
        data["evaluate"]["drafters"] = bad
        p.write_text(yaml.safe_dump(data))
        with pytest.raises(RecipeError, match=r"evaluate\.drafters: .*" + re.escape(says)):
            load_recipe(p)


def test_a_bad_drafter_name_shows_beside_other_evaluate_errors_and_prompt_lookup_takes_no_branch_name(
        tmp_path, tiny_target):
    """An error elsewhere in evaluate: (here a bad gamma) still lets evaluate.drafters be checked, so
    both show at once; prompt lookup's name may not be a branch's (the report names each drafter once)."""
    data = base(tiny_target)
    data["evaluate"]["gamma"] = "lots"
    data["evaluate"]["drafters"] = ["dens"]
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(data))
    with pytest.raises(RecipeError) as err:
        load_recipe(p)
    where = [i.path for i in err.value.issues]
    assert "evaluate.drafters[0]" in where and any(w.startswith("evaluate.gamma") for w in where), where
    assert "names no drafter of this recipe (did you mean 'dense'?)" in str(err.value)

    data["evaluate"]["gamma"] = 2
    data["evaluate"]["drafters"] = ["dense"]
    data["evaluate"]["prompt_lookup"] = {"name": "dense"}
    p.write_text(yaml.safe_dump(data))
    with pytest.raises(RecipeError) as err:
        load_recipe(p)
    assert [i.path for i in err.value.issues] == ["evaluate.prompt_lookup.name"]      # not "remove dense here"
    assert "evaluate.prompt_lookup.name: 'dense' is a branch's name" in " ".join(str(err.value).split())
    for reserved in ("raw", "target"):      # raw is always evaluated; target is the baseline
        data["evaluate"]["prompt_lookup"] = {"name": reserved}
        p.write_text(yaml.safe_dump(data))
        with pytest.raises(RecipeError, match=rf"evaluate.prompt_lookup.name: '{reserved}' is reserved"):
            load_recipe(p)
    data["evaluate"]["prompt_lookup"] = {"name": "pld"}
    p.write_text(yaml.safe_dump(data))
    assert load_recipe(p).evaluate.prompt_lookup.name == "pld"


def heads_only(target: Path) -> dict:
    """A recipe whose every branch builds its own head, directly or `from:` one that does: no `drafter:`."""
    return {"name": "t", "target": {"path": str(target)},
            "distill": {"prompts": {"source": "mtbench", "limit": 2}, "max_new_tokens": 8},
            "branches": {"fs": [{"head": {"type": "fspad"}}, {"finetune": {"epochs": 1, "feature_noise": 0.1}}],
                         "e3": [{"head": {"type": "eagle3", "draft_vocab_size": 64, "aux_layers": [1, 2, 3]}}],
                         "fs_sparse": [{"from": "fs"}, {"prune": {"method": "magnitude", "sparsity": 0.5}}]},
            "evaluate": {"prompts": {"source": "mtbench", "limit": 2}}}


def test_a_recipe_whose_branches_build_their_own_heads_needs_no_drafter(tmp_path, tiny_target):
    """No `drafter:` where nothing reads one: no drafter source or step is planned, evaluate times the
    branches only (no raw), and the resolved recipe (the run folder's recipe.yaml) leaves it out and
    validates to the same plan."""
    from sd2.pipeline.runner import plan

    for data in (heads_only(tiny_target), heads_only(tiny_target) | {"drafter": None}):
        r = validate_recipe(data)
        assert not r.has_drafter and r.recipe.drafter is None and r.drafter_build is None
        steps = plan(r)
        assert [s.id for s in steps] == ["distill", "fs.head", "fs.finetune", "e3.head", "fs_sparse.prune", "evaluate"]
        assert not any(v == "drafter" or str(v).startswith("drafter.") for s in steps for v in s.sources.values())
        assert steps[-1].sources["drafters"] == {"fs": "fs.finetune", "e3": "e3.head", "fs_sparse": "fs_sparse.prune"}
        assert [s.kind for s in steps[1:5]] == ["head"] * 4
        resolved = r.resolved()
        assert "drafter" not in resolved
        again = validate_recipe(yaml.safe_load(yaml.safe_dump(resolved, sort_keys=False)))
        assert [(s.id, s.config, s.sources) for s in plan(again)] == [(s.id, s.config, s.sources) for s in steps]
    # evaluate.drafters names branches only: fine
    chosen = heads_only(tiny_target)
    chosen["evaluate"]["drafters"] = ["fs_sparse"]
    assert plan(validate_recipe(chosen))[-1].sources["drafters"] == {"fs_sparse": "fs_sparse.prune"}
    p = tmp_path / "h.yaml"
    p.write_text(yaml.safe_dump(heads_only(tiny_target), sort_keys=False))
    res = CliRunner().invoke(app, ["validate", str(p)])
    assert res.exit_code == 0 and "ok (6 stages: distill, fs.head, fs.finetune, e3.head," in res.output, res.output


GIVE = "Give the drafter's weights (hub, path or gguf) or how to build it (derive: target, or head: eagle | fspad)"


@pytest.mark.parametrize("change, reader", [
    (lambda d: d["branches"].update(sparse=[{"prune": {"method": "magnitude", "sparsity": 0.5}}]),
     "branch 'sparse' starts from the recipe's drafter (its first step is prune)"),
    (lambda d: d["branches"].update(plain=[]), "branch 'plain' starts from the recipe's drafter (it has no steps)"),
    (lambda d: d["distill"].update(policy="drafter"), "distill.policy: drafter (the drafter writes the answers)"),
    (lambda d: d["evaluate"].update(drafters=["fs", "raw"]), "evaluate.drafters names raw (the un-branched drafter)"),
    (lambda d: d.update(branches={}), "evaluate has no branch and no prompt_lookup to time, so it would time raw"),
], ids=["branch", "empty_branch", "distill_policy", "evaluate_drafters", "evaluate_nothing_else"])
def test_a_recipe_without_a_drafter_that_reads_one_names_the_reader(tiny_target, change, reader):
    data = heads_only(tiny_target)
    change(data)
    with pytest.raises(RecipeError) as err:
        validate_recipe(data)
    assert [i.path for i in err.value.issues] == ["drafter"]
    msg = " ".join(err.value.issues[0].message.split())
    assert msg.startswith(f"not given, but the recipe reads it: {reader}") and msg.endswith(GIVE), msg
    validate_recipe(data | {"drafter": {"derive": "target", "keep_layers": 2}})   # giving it is the fix


def test_the_readers_of_a_missing_drafter_are_named_once_each_and_breed_no_other_error(tiny_target):
    """Every reader in one issue; a `from:` branch of a reader is not named again, and its steps are
    not checked against a kind the missing drafter does not have; a branch with a broken step is not
    a reader (its sequence is unknown: its own error comes first); with prompt lookup on, evaluate
    has something to time without any branch; a distill section with errors of its own is read as
    written."""
    data = heads_only(tiny_target)
    data["distill"]["policy"] = "drafter"
    data["branches"].update(lm=[{"finetune": {"epochs": 1}}],
                            lm_more=[{"from": "lm"}, {"finetune": {"feature_noise": 0.1}}],
                            broken=[{"head": {"type": "fspda"}}, {"finetune": {"epochs": 1}}])
    with pytest.raises(RecipeError) as err:
        validate_recipe(data)
    issues = {i.path: " ".join(i.message.split()) for i in err.value.issues}
    assert set(issues) == {"drafter", "branches.broken[0].head.type"}, issues
    assert issues["drafter"].startswith("not given, but the recipe reads it: branch 'lm' starts from the recipe's "
                                        "drafter (its first step is finetune); distill.policy: drafter")
    assert "lm_more" not in issues["drafter"] and "broken" not in issues["drafter"]

    lookup_only = heads_only(tiny_target) | {"branches": {}}
    lookup_only["evaluate"]["prompt_lookup"] = {}
    validate_recipe(lookup_only)
    bad_distill = heads_only(tiny_target)
    bad_distill["distill"].update(policy="drafter", max_new_tokens=-1)
    with pytest.raises(RecipeError) as err:
        validate_recipe(bad_distill)
    assert {i.path for i in err.value.issues} == {"distill.max_new_tokens", "drafter"}
    assert "distill.policy: drafter" in str(err.value)


def test_ways_to_give_a_drafter_are_named_and_a_bad_one_is_one_error_at_its_field(tmp_path, tiny_target, monkeypatch):
    """``drafter: {}`` or a misspelt key names all five ways (and that it may be left out); a bare string
    with two slashes is a folder (a Hub id has at most one), so a missing one is the folder error, not a
    Hub id read as a causal LM; a file given as a folder says so; a missing GGUF behind trim_vocab's
    vocabulary check is one error among the others, not a bare exception that hides them."""
    monkeypatch.chdir(tmp_path)

    def problems(**change):
        data = base(tiny_target)
        data.update(change)
        with pytest.raises(RecipeError) as e:
            validate_recipe(data)
        return {i.path: i.message for i in e.value.issues}

    for drafter, got in (({}, "got none)"), ({"paht": "x", "revision": "main"}, "got none; unknown key(s): paht (did you mean 'path'?))"),
                         ({"zzz": "x"}, "got none; unknown key(s): zzz)")):
        p = problems(drafter=drafter)
        assert list(p) == ["drafter"] and p["drafter"] == (
            f"give exactly one of hub, path, gguf, derive, head ({got}; or leave drafter: out where nothing reads it "
            "(every branch starts with - head:)")
    head_options = {"more": [{"finetune": {"epochs": 1, "ttt_depth": 3, "feature_cache_mb": 10}}]}
    p = problems(drafter="runs/up/16_head.finetune", branches=head_options)
    assert list(p) == ["drafter.path"] and p["drafter.path"].startswith("folder not found: runs/up/16_head.finetune")
    (tmp_path / "model.gguf").write_text("x")
    p = problems(drafter={"path": str(tmp_path / "model.gguf")})
    assert p == {"drafter.path": f"{tmp_path / 'model.gguf'} is a file; path is a save_pretrained folder (config.json "
                                 f"and safetensors); a .gguf file is gguf: {tmp_path / 'model.gguf'}"}
    for empty in ("", {"path": ""}, {"hub": " "}):       # Path("") would be the current folder
        p = problems(drafter=empty)
        assert list(p) == ["drafter"] and "empty" in p["drafter"], p
    p = problems(drafter={"gguf": str(tmp_path / "missing.gguf")},
                 branches={"t": [{"trim_vocab": {"k": 10}}, {"finetune": {"epochs": 1}}],
                           "u": [{"finetune": {"epochs": 1, "lr": -1.0}}]})
    assert set(p) == {"drafter.gguf", "branches.u[0].finetune.lr"} and "gguf file not found" in p["drafter.gguf"]
