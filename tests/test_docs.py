"""Every python block in docs/*.md runs (one process per page, blocks in order)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = sorted((Path(__file__).resolve().parents[1] / "docs").glob("*.md"))


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.name)
def test_doc_examples_run(page, tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), re.S)
    if not blocks:
        pytest.skip(f"{page.name} has no python examples")
    result = subprocess.run([sys.executable, "-c", "\n".join(blocks)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{page.name}:\n{result.stderr[-3000:]}"
