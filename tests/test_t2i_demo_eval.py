"""benchmarks/t2i_demo_eval.py end to end on a tiny random model and vqgan_tiny: every figure is
present and in range, the shuffled captions are a derangement, and the caption information of a
model that reads the caption is measured as such."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ofa_ufo

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def t2i_eval():
    spec = importlib.util.spec_from_file_location("t2i_demo_eval", ROOT / "benchmarks" / "t2i_demo_eval.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["t2i_demo_eval"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def vqgan_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vqgan")
    ofa_ufo.create_vqgan("vqgan_tiny").save_pretrained(path)
    return path


def test_derangement_moves_every_caption(t2i_eval):
    order = t2i_eval.derangement(7, np.random.default_rng(0))
    assert sorted(order) == list(range(7)) and all(i != j for i, j in enumerate(order))


def test_full_report_on_a_tiny_model(t2i_eval, tiny_checkpoint, vqgan_dir, tmp_path):
    out = tmp_path / "eval"
    args = ["--model", str(tiny_checkpoint), "--vqgan", str(vqgan_dir), "--scenes", "4", "--reader-images", "16",
            "--batch-size", "4", "--grid", "2", "--guidance-scale", "2", "--output", str(out)]
    assert t2i_eval.main(args) == 0
    report = json.loads((out / "t2i_eval.json").read_text())
    assert report["guidance_scale"] == 2.0 and (out / "t2i_samples.png").is_file()
    info = report["caption_information"]
    assert info["nll_own_caption"] > 0 and info["nll_shuffled_caption"] > 0
    assert info["information_nats_per_image"] == pytest.approx(info["nll_shuffled_caption"] - info["nll_own_caption"],
                                                               abs=2e-3)
    for part in ("shape", "color"):
        assert math.isfinite(info[f"{part}_information_nats_per_image"])
        assert 0.0 <= info[f"images_more_likely_than_with_another_{part}"] <= 1.0
    for row in ("generated", "shuffled_captions (chance)", "scenes (classifier check)", "vqgan_reconstructions"):
        assert set(report[row]) == {"first_color", "any_color", "no_object_color"}
        assert all(0.0 <= v <= 1.0 for v in report[row].values())
    assert report["scenes (classifier check)"]["any_color"] >= 0.75  # the pixel classifier reads real scenes
    for row in report["scene_reader"].values():
        assert set(row) == {"shape_named", "color_named"} and all(0.0 <= v <= 1.0 for v in row.values())
    assert set(report["psnr"]) == {"image_infill (greedy)", "grey centre (baseline)", "vqgan_reconstruction"}


def test_scene_settings_default_to_the_models_training_config(t2i_eval, tmp_path):
    (tmp_path / "train_config.yaml").write_text("demo_max_objects: 1\ndemo_object_size: [0.35, 0.6]\n")
    args = t2i_eval.parse_args(["--model", str(tmp_path)])
    assert (args.max_objects, args.object_size) == (1, (0.35, 0.6))
    args = t2i_eval.parse_args(["--model", str(tmp_path), "--max-objects", "2", "--object-size", "0.2", "0.3"])
    assert (args.max_objects, args.object_size) == (2, (0.2, 0.3))
    args = t2i_eval.parse_args(["--model", str(tmp_path / "elsewhere")])
    assert (args.max_objects, args.object_size) == (3, (0.15, 0.45))


def test_swapped_caption_changes_one_word_of_the_first_object(t2i_eval):
    from ofa_ufo.data.demo_examples import caption_example
    from ofa_ufo.data.demo_scenes import DemoScenes, SceneObject

    scene = DemoScenes("val", 1, seed=0)[0]
    scene.objects = [SceneObject("star", "red", (0, 0, 9, 9)), SceneObject("circle", "white", (20, 0, 29, 9))]
    assert caption_example(scene)["target"] == "a red star and a white circle"
    assert t2i_eval.swapped_caption(scene, "shape") == "a red cross and a white circle"  # SHAPES: ... star, cross
    assert t2i_eval.swapped_caption(scene, "color") == "a green star and a white circle"  # COLORS: red, green, ...


def test_caption_information_sees_a_model_that_reads_its_caption(t2i_eval, model, processor, vqgan_dir):
    """With the codes' log-likelihood made to depend on the caption, the measured information is
    positive; with it independent of the caption, zero."""
    from ofa_ufo.data.demo_scenes import DemoScenes
    from ofa_ufo.hf.modeling_vqgan import VQGANModel

    vqgan = VQGANModel.from_pretrained(vqgan_dir).eval()
    scenes = [DemoScenes("val", 3, seed=0)[i] for i in range(3)]
    captions = ["a red circle", "a blue square", "a green star"]
    ignores = t2i_eval.caption_information(model, processor, vqgan, scenes, captions, [1, 2, 0], 3)
    assert ignores["information_nats_per_image"] != 0.0  # a random model reacts to the words a little

    class Blind(torch.nn.Module):  # the same logits whatever the prompt
        config = model.config  # build_batch routes rows by the model's task vocabulary

        def forward(self, labels=None, **batch):
            logits = torch.zeros(*labels.shape, model.config.vocab_size)
            return type("Out", (), {"logits": logits})()

    blind = t2i_eval.caption_information(Blind(), processor, vqgan, scenes, captions, [1, 2, 0], 3)
    assert blind["information_nats_per_image"] == 0.0 and blind["images_more_likely_under_own_caption"] == 0.0
    assert blind["shape_information_nats_per_image"] == 0.0 and blind["color_information_nats_per_image"] == 0.0
