"""benchmarks/t2i_demo_eval.py end to end on a tiny random model and vqgan_tiny: every figure is
present and in range, the shuffled captions are a derangement, and the caption information of a
model that reads the caption is measured as such."""

from __future__ import annotations

import importlib.util
import json
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
    for row in ("generated", "shuffled_captions (chance)", "scenes (classifier check)", "vqgan_reconstructions"):
        assert set(report[row]) == {"first_color", "any_color", "no_object_color"}
        assert all(0.0 <= v <= 1.0 for v in report[row].values())
    assert report["scenes (classifier check)"]["any_color"] >= 0.75  # the pixel classifier reads real scenes
    for row in report["scene_reader"].values():
        assert set(row) == {"shape_named", "color_named"} and all(0.0 <= v <= 1.0 for v in row.values())
    assert set(report["psnr"]) == {"image_infill (greedy)", "grey centre (baseline)", "vqgan_reconstruction"}


def test_caption_information_sees_a_model_that_reads_its_caption(t2i_eval, model, processor, vqgan_dir):
    """With the codes' log-likelihood made to depend on the caption, the measured information is
    positive; with it independent of the caption, zero."""
    from ofa_ufo.data.demo_scenes import DemoScenes
    from ofa_ufo.vqgan import VQGANModel

    vqgan = VQGANModel.from_pretrained(vqgan_dir).eval()
    scenes = [DemoScenes("val", 3, seed=0)[i] for i in range(3)]
    captions = ["a red circle", "a blue square", "a green star"]
    ignores = t2i_eval.caption_information(model, processor, vqgan, scenes, captions, [1, 2, 0], 3)
    assert ignores["information_nats_per_image"] != 0.0  # a random model reacts to the words a little

    class Blind(torch.nn.Module):  # the same logits whatever the prompt
        def forward(self, labels=None, **batch):
            logits = torch.zeros(*labels.shape, model.config.vocab_size)
            return type("Out", (), {"logits": logits})()

    blind = t2i_eval.caption_information(Blind(), processor, vqgan, scenes, captions, [1, 2, 0], 3)
    assert blind["information_nats_per_image"] == 0.0 and blind["images_more_likely_under_own_caption"] == 0.0
