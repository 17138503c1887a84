"""The evaluation command: a spec + a model directory -> metric table and predictions JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ofa_ufo.data.sources import DataSourceError, open_examples
from ofa_ufo.data.specs import load_spec
from ofa_ufo.evaluate import main

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples" / "data"


@pytest.mark.parametrize("spec", ["demo_vqa", "demo_grounding"])
def test_evaluate_demo_spec(tiny_checkpoint, tmp_path, capsys, spec):
    output = tmp_path / "preds.json"
    assert main(["--spec", spec, "--model", str(tiny_checkpoint), "--limit", "3", "--output", str(output)]) == 0
    table = capsys.readouterr().out
    metric = load_spec(spec).metric
    assert f"| {spec} (3 examples) |" in table and metric in table
    saved = json.loads(output.read_text())
    assert len(saved["predictions"]) == 3 and 0.0 <= saved["scores"][metric] <= 1.0


def test_evaluate_dataset_format_spec(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("EXAMPLES", str(EXAMPLES))
    spec = tmp_path / "toy_detection.yaml"
    spec.write_text(
        "name: toy_detection\ntask: detection\nmetric: coco_map\n"
        "data: {format: coco_instances, input: '${EXAMPLES}/instances.json', images: '${EXAMPLES}/images'}\n"
        "generation: {max_new_tokens: 12}\n"
    )
    output = tmp_path / "preds.json"
    assert main(["--spec", str(spec), "--model", str(tiny_checkpoint), "--output", str(output)]) == 0
    assert "| map |" in capsys.readouterr().out
    assert {p["id"] for p in json.loads(output.read_text())["predictions"]}


def test_unset_data_variable_is_named(tmp_path, monkeypatch):
    monkeypatch.delenv("NO_SUCH_ROOT", raising=False)
    spec = tmp_path / "s.yaml"
    spec.write_text("name: s\ntask: caption\nmetric: cider\ndata: {format: coco_captions, input: '${NO_SUCH_ROOT}/c.json', images: x}\n")
    with pytest.raises(DataSourceError, match="NO_SUCH_ROOT"):
        next(open_examples(load_spec(spec).data, "caption"))
