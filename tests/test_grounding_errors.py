"""benchmarks/grounding_errors.py: each predicted box is filed under the scene object it hits, on hand-made
objects and on generated demo scenes with boxes placed by hand; bad specs and ids are named; the image
tokens' dependence on the phrase is 0 for a model whose image tokens cannot attend to it."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

import ofa_ufo
from ofa_ufo.data.demo_scenes import DemoScenes, SceneObject
from ofa_ufo.data.specs import load_spec

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def errors():
    spec = importlib.util.spec_from_file_location("grounding_errors", ROOT / "benchmarks" / "grounding_errors.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["grounding_errors"] = module
    spec.loader.exec_module(module)
    return module


RED_CIRCLE = SceneObject("circle", "red", (0.0, 0.0, 10.0, 10.0))
RED_CIRCLE_2 = SceneObject("circle", "red", (100.0, 0.0, 110.0, 10.0))
BLUE_CIRCLE = SceneObject("circle", "blue", (2.0, 50.0, 12.0, 60.0))
RED_STAR = SceneObject("star", "red", (50.0, 50.0, 60.0, 60.0))
GREEN_SQUARE = SceneObject("square", "green", (50.0, 100.0, 60.0, 110.0))
OBJECTS = [RED_CIRCLE, RED_CIRCLE_2, BLUE_CIRCLE, RED_STAR, GREEN_SQUARE]


@pytest.mark.parametrize("box, referent, kind, leftmost", [
    ((0, 0, 10, 10), RED_CIRCLE, "right", True),
    ((1, 1, 10, 10), RED_CIRCLE_2, "twin", True),  # IoU 0.81 with the leftmost red circle
    ((2, 50, 12, 60), RED_CIRCLE, "same shape", False),
    ((50, 50, 60, 60), RED_CIRCLE_2, "same colour", False),
    ((50, 100, 60, 110), RED_CIRCLE, "unrelated", False),
    ((0, 0, 30, 30), RED_CIRCLE, "no object", False),  # IoU 100/900 with the best object
    (None, RED_CIRCLE, "no object", False),
])
def test_classify_files_each_pick(errors, box, referent, kind, leftmost):
    assert errors.classify(box, referent, OBJECTS) == (kind, leftmost)


def test_breakdown_on_generated_scenes(errors, tmp_path):
    """Boxes copied from the scenes themselves: the referent's, another object's, a box far off, none."""
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text("name: tiny_grounding\ntask: grounding\nmetric: acc@0.5\n"
                         "data: {source: demo_scenes, val_scenes: 12, size: 64, seed: 3}\n")
    spec = load_spec(str(spec_path))
    scenes = DemoScenes("val", 12, size=64, seed=3)
    examples = {e["id"]: e for e in errors.open_examples(spec.data, "grounding")}
    predictions, expected = [], {"right": 0, "no object": 0, "other": 0}
    for index in range(12):
        objects, target = scenes[index].objects, tuple(examples[f"val-{index}"]["box"])
        others = [o for o in objects if tuple(o.box) != target]
        if index % 3 == 0:
            predictions.append({"id": f"val-{index}", "boxes": [list(target)]})
            expected["right"] += 1
        elif index % 3 == 1 and others:
            predictions.append({"id": f"val-{index}", "boxes": [list(others[0].box)]})
            expected["other"] += 1
        else:
            predictions.append({"id": f"val-{index}", "boxes": []})
            expected["no object"] += 1
    counts = errors.breakdown(spec, predictions)
    assert counts["right"] == expected["right"] and counts["no object"] == expected["no object"]
    assert sum(counts[k] for k in ("twin", "same shape", "same colour", "unrelated")) == expected["other"]
    path = tmp_path / "predictions.json"
    path.write_text(json.dumps({"predictions": predictions}))
    assert errors.main(["--spec", str(spec_path), str(path)]) == 0


def test_bad_input_is_named(errors, tmp_path):
    spec_path = tmp_path / "vqa.yaml"
    spec_path.write_text("name: tiny_vqa\ntask: vqa\nmetric: vqa_accuracy\n"
                         "data: {source: demo_scenes, val_scenes: 4}\n")
    with pytest.raises(SystemExit, match="needs task grounding on source demo_scenes, got task 'vqa'"):
        errors.breakdown(load_spec(str(spec_path)), [])
    spec_path.write_text("name: g\ntask: grounding\nmetric: acc@0.5\ndata: {source: demo_scenes, val_scenes: 4}\n")
    with pytest.raises(SystemExit, match="prediction id 'val-9' is not an example of spec 'g'"):
        errors.breakdown(load_spec(str(spec_path)), [{"id": "val-9", "boxes": []}])


def test_prompt_dependence_is_zero_when_image_tokens_cannot_see_the_phrase(errors, tmp_path):
    """A random tiny model mixes the phrase into its image tokens; with every encoder attention's values
    zeroed, each image token sees only itself, so the two phrases leave its states exactly equal."""
    torch.manual_seed(0)
    kwargs = dict(image_size=64, dropout=0.0, d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
                  decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64)
    model = ofa_ufo.create_model("ofa_ufo_tiny", **kwargs)
    ofa_ufo.create_processor("ofa_ufo_tiny", image_size=64).save_pretrained(tmp_path / "random")
    model.save_pretrained(tmp_path / "random")
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text("name: tiny_grounding\ntask: grounding\nmetric: acc@0.5\nprompt_style: ofa\n"
                         "data: {source: demo_scenes, val_scenes: 20, size: 64, seed: 1}\n")
    spec = load_spec(str(spec_path))
    change, scenes = errors.prompt_dependence(str(tmp_path / "random"), spec, scenes=20)
    expected_scenes = sum(len(s.objects) >= 2 for s in DemoScenes("val", 20, size=64, seed=1))
    assert scenes == expected_scenes > 0 and change > 0.01
    with torch.no_grad():
        for layer in model.model.encoder.layers:
            layer.self_attn.v_proj.weight.zero_()
            layer.self_attn.v_proj.bias.zero_()
    model.save_pretrained(tmp_path / "blind")
    ofa_ufo.create_processor("ofa_ufo_tiny", image_size=64).save_pretrained(tmp_path / "blind")
    assert errors.prompt_dependence(str(tmp_path / "blind"), spec, scenes=20) == (0.0, expected_scenes)
