"""Property-based fuzzing of the two front doors a user types into: recipe files (with overrides) and
prompt files. Whatever the bytes, the outcome is a validated recipe / a list of conversations, or an
Sd2Error with a message; never another exception (a traceback). Hypothesis generates and shrinks the
cases; the example counts are bounded so the suite stays fast (about 10 s)."""

from __future__ import annotations

import copy
import json

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sd2.core.errors import Sd2Error

FUZZ = settings(max_examples=100, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# -- values: what a mistyped YAML can hold -------------------------------------------------------------
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
                    st.sampled_from(["", "~", "~nobody-here/x", "/", ".", "a\x00b", "mtbench", "layer", "2:4",
                                     "-1", "1e309", "{", "]", "*", "&a", "!!python/object:os.system"]))
junk = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                     st.dictionaries(st.one_of(st.text(max_size=8), st.integers()),
                                                                     inner, max_size=4)), max_leaves=12)


def base_recipe(target: str, prompts: str) -> dict:
    return {"name": "fz", "seed": 0, "target": {"path": target}, "drafter": {"derive": "target", "keep_layers": 2},
            "distill": {"prompts": {"source": prompts, "limit": 4}, "max_new_tokens": 8, "batch_size": 2},
            "branches": {"dense": [{"finetune": {"epochs": 1, "lr": 1e-3, "batch_size": 2}}],
                         "sparse": [{"prune": {"method": "magnitude", "sparsity": 0.5}},
                                    {"finetune": {"max_steps": 2}}],
                         "layer": [{"prune": {"method": "layer", "keep_layers": 1}}],
                         "trim": [{"trim_vocab": {"k": 40}}]},
            "evaluate": {"prompts": {"source": prompts, "skip": 4}, "gamma": [2, 4], "temperature": 0.0}}


def paths_of(node, prefix=()):
    """Every (path, container) in a nested recipe, so a mutation can hit any field at any depth."""
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from paths_of(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from paths_of(v, prefix + (i,))


@st.composite
def mutated(draw, base: dict):
    data = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in paths_of(data) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = data
        for part in path[:-1]:
            parent = parent[part]
        action = draw(st.sampled_from(["replace", "delete", "add", "wrap"]))
        key = path[-1]
        if action == "replace":
            parent[key] = draw(junk)
        elif action == "delete":
            del parent[key]
        elif action == "add" and isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=10))] = draw(junk)
        elif action == "wrap":
            parent[key] = [parent[key]] if draw(st.booleans()) else {"x": parent[key]}
    return data


def check_recipe_file(path) -> None:
    """The front door of `sd2 validate` / `sd2 run`: read, validate, plan. Sd2Error is the only failure."""
    from sd2.pipeline.runner import plan
    from sd2.pipeline.schema import load_recipe

    try:
        plan(load_recipe(path))
    except Sd2Error as e:
        assert str(e).strip(), "an Sd2Error without a message"


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    from tiny import write_mtbench

    return write_mtbench(tmp_path_factory.mktemp("fz") / "q.jsonl", n=8, turns=1)


def test_fuzz_mutated_recipes(tmp_path, tiny_target, prompts_file):
    base = base_recipe(str(tiny_target), str(prompts_file))
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(base))
    check_recipe_file(path)  # the unmutated base is valid

    @FUZZ
    @given(mutated(base))
    def prop(data):
        try:
            text = yaml.safe_dump(data, allow_unicode=True)
        except yaml.YAMLError:
            return
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        check_recipe_file(path)
    prop()


def test_fuzz_recipe_bytes_and_text(tmp_path):
    path = tmp_path / "r.yaml"
    yamlish = st.lists(st.sampled_from(["name: x", "target:", "  path: /nope", "branches: {a: [1]}", "- x", "{", "}",
                                        ": :", "\t", "&a [*a]", "!!binary AAAA", "? [a]", "evaluate: {gamma: -1}",
                                        "seed: 1e400", "drafter: {derive: target, keep_layers: 0}", "[" * 50]),
                       max_size=8).map("\n".join)

    @FUZZ
    @given(st.one_of(st.binary(max_size=200), st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
                     yamlish.map(str.encode)))
    def prop(raw):
        path.write_bytes(raw)
        check_recipe_file(path)
    prop()


def test_fuzz_deeply_nested_recipe(tmp_path):
    path = tmp_path / "deep.yaml"
    for depth in (50, 2000):
        path.write_text("name: x\ntarget: " + "[" * depth + "]" * depth + "\n")
        check_recipe_file(path)
        path.write_text("name: x\nbranches: " + "{a: " * depth + "1" + "}" * depth + "\n")
        check_recipe_file(path)


def test_fuzz_overrides(tmp_path, tiny_target, prompts_file):
    from sd2.pipeline.schema import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(base_recipe(str(tiny_target), str(prompts_file))))
    keys = st.sampled_from(["seed", "name", "evaluate.gamma", "branches.sparse.0.prune.sparsity", "branches.x.9",
                            "distill.prompts.limit", "target", "a..b", ".", "branches.dense.-1.finetune", ""])

    @FUZZ
    @given(st.lists(st.one_of(st.text(max_size=20), st.builds(lambda k, v: f"{k}={v}", keys, st.text(max_size=12))),
                    max_size=4))
    def prop(overrides):
        try:
            load_recipe(path, overrides)
        except Sd2Error as e:
            assert str(e).strip()
    prop()


# -- prompt files ------------------------------------------------------------------------------------------
roles = st.one_of(st.sampled_from(["user", "assistant", "system", "human", "gpt", "USER", "tool", "", "bot"]),
                  st.text(max_size=6), st.none(), st.integers())
message = st.one_of(
    st.fixed_dictionaries({"role": roles, "content": st.one_of(st.text(max_size=20), st.none(), st.integers(), junk)}),
    st.fixed_dictionaries({"from": roles, "value": st.one_of(st.text(max_size=20), st.just(""), junk)}),
    junk)
record = st.one_of(
    st.fixed_dictionaries({"messages": st.one_of(st.lists(message, max_size=4), junk)}),
    st.fixed_dictionaries({"conversations": st.one_of(st.lists(message, max_size=4), junk), "id": junk}),
    st.fixed_dictionaries({"turns": st.one_of(st.lists(st.text(max_size=10), max_size=3), junk),
                           "question_id": junk, "category": junk}),
    junk)


def _line(r) -> str:
    try:
        return json.dumps(r, allow_nan=True)
    except (TypeError, ValueError):
        return "{broken"


@pytest.mark.parametrize("fmt", ["auto", "messages", "sharegpt", "mtbench", "text"])
def test_fuzz_prompt_files(tmp_path, fmt):
    from sd2.data.prompts import PromptsConfig, load_prompts

    broken = st.sampled_from(["{", "[", "]", "null", "1", '"x"', "{\"messages\": [}", "\x00", "\ufeff{}", "  "])
    lines = st.lists(st.one_of(record.map(_line), broken), max_size=6)

    @FUZZ
    @given(lines, st.sampled_from([".jsonl", ".json", ".txt"]), st.booleans(), st.integers(1, 3), st.binary(max_size=8))
    def prop(rows, suffix, as_array, max_turns, tail):
        path = tmp_path / f"p{suffix}"
        body = ("[" + ",".join(rows) + "]") if as_array else "\n".join(rows)
        path.write_bytes(body.encode("utf-8", "surrogatepass") + tail)
        try:
            cfg = PromptsConfig(source=str(path), format=fmt, max_turns=max_turns, limit=5)
        except Exception as e:  # pydantic's ValidationError: a recipe error, reported by validation
            from pydantic import ValidationError

            assert isinstance(e, ValidationError), repr(e)
            return
        try:
            convs = load_prompts(cfg)
        except Sd2Error as e:
            assert str(e).strip()
            return
        for c in convs:
            assert isinstance(c.id, str) and isinstance(c.category, str)
            assert all(isinstance(t, str) for t in c.turns)
    prop()
