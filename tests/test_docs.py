"""Docs a reader with only the repository can follow: no citation of files outside it, and every
relative link in the markdown pages points at a file that exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUTSIDE = ("DESIGN" + ".md", "../" + "shared")   # split so this file does not match itself


def _texts():
    for folder in ("sd2", "docs", "benchmarks", "recipes", "scripts", "tests"):
        for p in sorted((ROOT / folder).rglob("*")):
            if p.is_file() and p.suffix in (".py", ".md", ".yaml", ".sh", ".toml"):
                yield p
    for name in ("README.md", "CONTRIBUTING.md", "pyproject.toml"):
        yield ROOT / name


def test_nothing_cites_files_outside_the_repository():
    bad = [f"{p.relative_to(ROOT)}: {needle}" for p in _texts() for needle in OUTSIDE
           if needle in p.read_text(errors="replace")]
    assert bad == []


def test_relative_links_in_the_docs_resolve():
    pages = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if target.startswith(("http://", "https://", "#", "mailto:")):
                continue
            path = target.split("#", 1)[0]
            if path and not (page.parent / path).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert broken == []
