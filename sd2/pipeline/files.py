"""Recipe checks of the files a recipe names, before any model loads: the model references' folders
and GGUF files (``target``, ``drafter``), and the local prompt files of every section."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from sd2.core.errors import Issue, Sd2Error
from sd2.core.gguf_header import gguf_info, gguf_problem
from sd2.core.models import ModelRef, locate_gguf
from sd2.core.paths import expand, read_from


def check_prompt_files(sections: list[tuple[str, Any]]) -> list[Issue]:
    """Every local prompt file a section names (any PromptsConfig field, in a mix too), read through
    once (sd2.data.prompts.check_file), so a broken file is a recipe error naming its field."""
    from sd2.data.prompts import PromptsConfig, check_file

    def walk(obj, path):
        if isinstance(obj, PromptsConfig):
            yield path, obj
        elif isinstance(obj, list):
            for i, x in enumerate(obj):
                yield from walk(x, f"{path}[{i}]")
        elif isinstance(obj, BaseModel):
            for name in type(obj).model_fields:
                yield from walk(getattr(obj, name), f"{path}.{name}")

    issues = []
    for section, cfg in sections:
        for path, pc in walk(cfg, section):
            try:
                check_file(pc)
            except Sd2Error as e:
                issues.append(Issue(f"{path}.source", str(e)))
    return issues


def check_model_paths(recipe) -> list[Issue]:
    issues = []
    for role in ("target", "drafter"):
        ref: ModelRef | None = getattr(recipe, role)
        if ref is None:
            continue
        if ref.path is not None:
            p = expand(ref.path)
            if p.exists() and not p.is_dir():
                gguf = f"; a .gguf file is gguf: {p}" if p.suffix == ".gguf" else ""
                issues.append(Issue(f"{role}.path", f"{p} is a file; path is a save_pretrained folder (config.json and "
                                                    f"safetensors){gguf}"))
            elif not p.is_dir():
                issues.append(Issue(f"{role}.path", f"folder not found: {p}{read_from(p)}; if another recipe's run writes it, "
                                                    "run that recipe first"))
            elif not (p / "config.json").is_file():
                issues.append(Issue(f"{role}.path", f"{p} has no config.json; expected a save_pretrained folder"))
        if ref.gguf is not None:
            try:
                problem = gguf_problem(gguf_info(locate_gguf(ref)))  # the header only: no model loads
            except (FileNotFoundError, Sd2Error) as e:
                problem = str(e)
            if problem:
                issues.append(Issue(f"{role}.gguf", problem))
    return issues
