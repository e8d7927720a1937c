"""The package layering, checked on the source by AST (an import inside a function counts too):
- the base library (sd2.core and the top-level modules) and the stages never import orchestration
  (sd2.pipeline); sd2.core imports neither sd2.data nor anything above it;
- the training loop (sd2.train) knows no drafter kind, no stage and no head;
- heads never import the stages, and the stages never import the heads: they reach every drafter
  kind through sd2.drafters (the Drafter protocol), whose registry names each kind's module;
- sd2.serve (vLLM) never imports a stage: evaluate's vLLM run (stages/evaluate/vllm.py) calls into it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "sd2"

# package prefix -> packages it must never import
FORBIDDEN = {
    "sd2.core": ("sd2.pipeline", "sd2.stages", "sd2.publish", "sd2.engine", "sd2.heads", "sd2.data", "sd2.drafters",
                 "sd2.train", "sd2.serve"),
    "sd2.train": ("sd2.pipeline", "sd2.stages", "sd2.publish", "sd2.heads", "sd2.drafters"),
    "sd2.drafters": ("sd2.pipeline", "sd2.stages", "sd2.publish", "sd2.heads"),
    "sd2.stages": ("sd2.pipeline", "sd2.publish", "sd2.heads"),
    "sd2.engine": ("sd2.pipeline", "sd2.publish"),
    "sd2.heads": ("sd2.pipeline", "sd2.publish", "sd2.stages"),
    "sd2.publish": ("sd2.pipeline",),
    "sd2.serve": ("sd2.pipeline", "sd2.publish", "sd2.stages"),
    "sd2.data": ("sd2.pipeline", "sd2.stages", "sd2.publish"),
}
# the top-level modules (sd2/macs.py, sd2/mal.py, ...) are base library too
BASE_TOP_LEVEL = ("sd2.pipeline", "sd2.stages", "sd2.publish")


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported(path: Path, mod: str = "") -> list[tuple[int, str]]:
    """Every module an `import` or `from ... import` in the file names, with its line; a relative
    import (`from ..data import x` in module ``mod``) is resolved to its absolute name (a newcomer
    check found relative imports slipped past this test)."""
    out = []
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = mod.split(".")[: len(mod.split(".")) - node.level + is_package]
                base = ".".join(parts + ([node.module] if node.module else []))
            if base == "sd2" or not node.module:   # from sd2 import pipeline; from .. import pipeline
                out += [(node.lineno, f"{base}.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, base))
    return out


def rules_for(mod: str) -> tuple[str, ...]:
    for prefix, banned in FORBIDDEN.items():
        if mod == prefix or mod.startswith(prefix + "."):
            return banned
    if mod.count(".") == 1:  # sd2.macs, sd2.vocab, ...
        return BASE_TOP_LEVEL
    return ()


def violations(root: Path = ROOT) -> list[str]:
    bad = []
    for path in sorted(root.rglob("*.py")):
        mod = module_name(path, root)
        banned = rules_for(mod)
        for line, name in imported(path, mod):
            hit = next((b for b in banned if name == b or name.startswith(b + ".")), None)
            if hit:
                bad.append(f"{path.relative_to(root.parent)}:{line} ({mod}) imports {name}")
    return bad


def test_no_module_imports_upward():
    assert violations() == []


def test_the_check_sees_a_violation(tmp_path):
    """The checker itself: a core module importing the runner (even inside a function) is caught."""
    fake = tmp_path / "sd2"
    (fake / "core").mkdir(parents=True)
    (fake / "core" / "bad.py").write_text("def f():\n    from sd2.pipeline.runner import plan\n")
    (fake / "core" / "good.py").write_text("from sd2.core.errors import Sd2Error\n")
    (fake / "core" / "data.py").write_text("import json\n\ndef f():\n    import sd2.data.prompts\n")
    (fake / "stages").mkdir()
    (fake / "stages" / "x.py").write_text("from sd2 import pipeline\n")
    (fake / "stages" / "y.py").write_text("def f():\n    from sd2.heads.io import load\n")
    (fake / "heads").mkdir()
    (fake / "heads" / "z.py").write_text("from sd2.stages.prune.magnitude import magnitude_mask\n")
    (fake / "core" / "rel.py").write_text("def f():\n    from ..data import prompts\n    from .. import pipeline\n")
    (fake / "stages" / "__init__.py").write_text("from ..heads import io\nfrom .x import y\n")
    assert violations(fake) == ["sd2/core/bad.py:2 (sd2.core.bad) imports sd2.pipeline.runner",
                                "sd2/core/data.py:4 (sd2.core.data) imports sd2.data.prompts",
                                "sd2/core/rel.py:2 (sd2.core.rel) imports sd2.data",
                                "sd2/core/rel.py:3 (sd2.core.rel) imports sd2.pipeline",
                                "sd2/heads/z.py:1 (sd2.heads.z) imports sd2.stages.prune.magnitude",
                                "sd2/stages/__init__.py:1 (sd2.stages) imports sd2.heads",
                                "sd2/stages/x.py:1 (sd2.stages.x) imports sd2.pipeline",
                                "sd2/stages/y.py:2 (sd2.stages.y) imports sd2.heads.io"]


@pytest.mark.parametrize("mod,banned", [("sd2.core.models", "sd2.pipeline"), ("sd2.stages.evaluate.collect", "sd2.pipeline"),
                                        ("sd2.macs", "sd2.stages"), ("sd2.core.models", "sd2.data"),
                                        ("sd2.stages.finetune", "sd2.heads"), ("sd2.heads.train", "sd2.stages"),
                                        ("sd2.train.loop", "sd2.heads"), ("sd2.train.loop", "sd2.stages")])
def test_rules_cover_the_layers(mod, banned):
    assert banned in rules_for(mod)
