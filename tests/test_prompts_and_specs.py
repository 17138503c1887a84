"""Prompt tables and task specs: OFA strings verbatim, styles, spec validation."""

from __future__ import annotations

import pytest

import ofa_ufo
from ofa_ufo.metrics import get_metric
from ofa_ufo.core.prompts import format_prompt, list_styles
from ofa_ufo.data.specs import list_specs, load_spec


def test_ofa_prompts_are_verbatim():
    assert format_prompt("caption") == " what does the image describe?"
    assert format_prompt("grounding", text="a dog") == ' which region does the text " a dog " describe?'
    assert ofa_ufo.get_task("vqa").prompt("What color is the car") == " what color is the car?"


def test_second_style_and_errors():
    assert {"ofa", "instruct"} <= set(list_styles())
    assert format_prompt("caption", "instruct") != format_prompt("caption")
    with pytest.raises(ValueError, match="Unknown prompt style 'poetic'"):
        format_prompt("caption", "poetic")
    with pytest.raises(ValueError, match="needs \\['text'\\]"):
        format_prompt("grounding")


@pytest.mark.parametrize("name", list_specs())
def test_shipped_specs_load(name):
    spec = load_spec(name)
    assert spec.name == name and spec.task in ofa_ufo.list_tasks()


def test_spec_validation_names_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntask: caption\ndata: {source: demo_scenes}\nmetric: cider\nbatchsize: 3\n")
    with pytest.raises(ValueError, match="bad.yaml: unknown key\\(s\\) \\['batchsize'\\]"):
        load_spec(bad)
    bad.write_text("name: x\ntask: segmentation\ndata: {}\nmetric: miou\n")
    with pytest.raises(ValueError, match="field 'task': Unknown task 'segmentation'"):
        load_spec(bad)
    bad.write_text("name: x\ntask: caption\ndata: {source: demo_scenes}\nmetric: spice\n")
    with pytest.raises(ValueError, match="field 'metric' must be one of .*'cider'"):
        load_spec(bad)
    bad.write_text("name: x\ntask: caption\ndata: {format: parquet}\nmetric: cider\n")
    with pytest.raises(ValueError, match="field 'data' needs .*coco_captions"):
        load_spec(bad)
    bad.write_text("name: x\ntask: caption\ndata: {source: demo_scenes}\nmetric: cider\nprompt_style: poetic\n")
    with pytest.raises(ValueError, match="field 'prompt_style' must be one of"):
        load_spec(bad)
    with pytest.raises(ValueError, match="Unknown task spec 'nope'"):
        load_spec("nope")


def test_spec_metric_defaults_to_the_task_metric(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text("name: s\ntask: vqa\ndata: {source: demo_scenes}\n")
    assert load_spec(spec).metric == ofa_ufo.get_task("vqa").metric == "vqa_accuracy"
    assert all(get_metric(ofa_ufo.get_task(t).metric) for t in ofa_ufo.list_tasks())
