"""Every python block of every Markdown page in the repo runs (one process per page, blocks in order).

README.md's usage example (between its `readme-example` markers) is run by
tests/test_readme_and_packaging.py, so here README.md contributes only blocks outside that section.
Pages without python blocks are not collected.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIPPED_DIRS = {"build", "dist", "node_modules"}  # build outputs and tool folders, not the repo's pages
README_EXAMPLE = re.compile(r"<!-- readme-example:start -->.*?<!-- readme-example:end -->", re.S)


def _pages() -> list[Path]:
    """The repo's Markdown files, without hidden folders (.venv, .git, ...), build outputs and what git
    ignores (a trained model's card in checkpoints/ is an output, not a page)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.md"], cwd=ROOT,
                            capture_output=True, text=True)
    if listed.returncode == 0:
        return sorted(ROOT / line for line in listed.stdout.splitlines() if (ROOT / line).is_file())
    pages = []  # not a git checkout (an unpacked sdist): walk the tree
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not (d.startswith(".") or d in SKIPPED_DIRS or d.endswith(".egg-info"))]
        pages += [Path(folder) / name for name in files if name.endswith(".md")]
    return sorted(pages)


def python_blocks(page: Path) -> list[str]:
    text = page.read_text(encoding="utf-8")
    if page == ROOT / "README.md":
        text = README_EXAMPLE.sub("", text)
    return re.findall(r"```python\n(.*?)```", text, re.S)


PAGES = [page for page in _pages() if python_blocks(page)]


def test_pages_with_examples_are_found():
    """The walk finds the pages known to hold examples, so a broken walk cannot pass by finding nothing."""
    names = {str(page.relative_to(ROOT)) for page in PAGES}
    assert {"docs/usage.md", "docs/supernet.md", "docs/data.md"} <= names, names
    assert not any(name.startswith((".venv", "build")) for name in names)


def test_readme_example_is_left_to_the_readme_test():
    example = README_EXAMPLE.search((ROOT / "README.md").read_text(encoding="utf-8")).group(0)
    blocks = re.findall(r"```python\n(.*?)```", example, re.S)
    assert blocks and not set(blocks) & set(python_blocks(ROOT / "README.md"))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_doc_examples_run(page, tmp_path):
    result = subprocess.run([sys.executable, "-c", "\n".join(python_blocks(page))], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{page.relative_to(ROOT)}:\n{result.stderr[-3000:]}"
