"""README promises (usage example runs, preset table is computed) and wheel packaging."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path


from ofa_ufo.hf.presets import preset_table

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _section(marker: str) -> str:
    match = re.search(rf"<!-- {marker}:start -->\n(.*?)<!-- {marker}:end -->", README, re.S)
    assert match, f"README lacks the {marker} section"
    return match.group(1)


def test_readme_example_runs(tmp_path):
    code = re.search(r"```python\n(.*?)```", _section("readme-example"), re.S).group(1)
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "'text'" in result.stdout and "'boxes'" in result.stdout


def test_readme_preset_table_is_the_computed_one():
    assert _section("preset-table").strip() == preset_table().strip()


def test_readme_has_both_commands():
    assert "bash run_scripts/pretrain_ofa_base.sh" in README and "bash run_scripts/test.sh" in README
    assert "run_scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def test_wheel_ships_prompts_and_task_specs(tmp_path):
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = next(tmp_path.glob("ofa_ufo-*.whl"))
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    names = {p.relative_to(site).as_posix() for p in site.rglob("*") if p.is_file()}
    for source in list((ROOT / "prompts").glob("*.json")) + list((ROOT / "tasks").glob("*.yaml")):
        folder = "prompts" if source.parent.name == "prompts" else "task_specs"
        assert f"ofa_ufo/resources/{folder}/{source.name}" in names
    assert any(n.startswith("ofa_ufo/assets/tokenizer/") for n in names)
    code = (
        "import sys; sys.path = [p for p in sys.path if p and 'work' not in p or 'site-packages' in p]\n"
        "import ofa_ufo, ofa_ufo.resources as r\n"
        f"assert ofa_ufo.__file__.startswith({str(site)!r}), ofa_ufo.__file__\n"
        "from ofa_ufo.core.prompts import format_prompt\n"
        "assert format_prompt('caption') == ' what does the image describe?'\n"
        "print(r.resource_dir('task_specs'), len(ofa_ufo.create_processor('ofa_ufo_tiny').tokenizer))\n"
    )
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-S", "-c", "import site; site.main()\n" + code], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert str(site) in result.stdout
