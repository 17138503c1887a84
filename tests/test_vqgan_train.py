"""VQGAN training on demo scenes (ofa_ufo.training.vqgan_train) and the OFA mixture with text_to_image +
image_infill on demo data, with tiny models: the loss falls, the report is written, the metrics are right."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

import ofa_ufo
from ofa_ufo.training.config import ConfigError
from ofa_ufo.training.vqgan_train import (
    VQGANTrainer, codebook_usage, gumbel_temperature, make_config, object_weights, parse_args, pixel_loss,
    restart_dead_codes, train_vqgan,
)

# vqgan_tiny at 32 px (4x4 codes), 32 codes, on 8 scenes: about 0.1 s per step on one thread
SMALL = dict(preset="vqgan_tiny", image_size=32, batch_size=8, train_scenes=8, eval_scenes=4, grid_images=4,
             num_threads=1, warmup_steps=0, lr=3e-3, end_lr=3e-3, flip=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 20-step plain-VQ run; its output directory (a VQGAN usable as the trainer's `vqgan`)."""
    out = tmp_path_factory.mktemp("vqgan")
    config = make_config({**SMALL, "steps": 20, "vqgan_overrides": {"quantizer": "vq", "n_embed": 32},
                          "restart_every": 5, "output_dir": str(out)})
    return train_vqgan(config)


def test_codebook_usage_on_a_hand_made_histogram():
    half = codebook_usage(torch.tensor([3, 3, 0, 0]))
    assert half["perplexity"] == pytest.approx(2.0) and half["usage"] == 0.5 and half["codes_used"] == 2
    assert codebook_usage(torch.ones(8))["perplexity"] == pytest.approx(8.0)
    assert codebook_usage(torch.tensor([5, 0, 0]))["perplexity"] == pytest.approx(1.0)
    skewed = codebook_usage(torch.tensor([1, 3]))  # entropy -(1/4 ln 1/4 + 3/4 ln 3/4)
    assert skewed["perplexity"] == pytest.approx(math.exp(0.25 * math.log(4) + 0.75 * math.log(4 / 3)))
    assert codebook_usage(torch.zeros(4)) == {"perplexity": 0.0, "usage": 0.0, "codes_used": 0}


def test_training_lowers_the_loss_and_writes_the_report(trained):
    losses = trained.losses
    # single batches are noisy at this size: the held-out scenes measure the fall
    assert len(losses) == 20 and sum(losses[-5:]) < sum(losses[:5])
    assert trained.metrics_after["l1"] < 0.9 * trained.metrics_before["l1"]
    assert trained.metrics_after["psnr"] > trained.metrics_before["psnr"]
    out = trained.output_dir
    report = json.loads((out / "metrics.json").read_text())
    assert set(report["metrics_trained"]) == {"psnr", "l1", "perplexity", "usage", "codes_used"}
    assert report["steps"] == 20 and len(report["losses"]) == 20 and report["config"]["image_size"] == 32
    grid = Image.open(out / "reconstructions.png")
    assert grid.size[1] > 3 * 64 and grid.size[0] > 4 * 64  # 3 rows (original, untrained, trained) x 4, 2x scale
    vqgan = ofa_ufo.VQGANModel.from_pretrained(out)
    assert vqgan.config.resolution == 32 and vqgan.config.attn_resolutions == [4]  # attention kept at the 4th level
    assert vqgan.encode(torch.zeros(1, 3, 32, 32)).shape == (1, 4, 4)
    assert not list(out.glob(".final*"))


def test_gumbel_annealing_discriminator_and_config_checks(tmp_path):
    assert gumbel_temperature(0, 100, 0.9, 0.1) == pytest.approx(0.9)
    assert gumbel_temperature(50, 100, 0.9, 0.1) == pytest.approx(0.5)
    assert gumbel_temperature(100, 100, 0.9, 0.1) == pytest.approx(0.1)
    config = make_config({**SMALL, "steps": 10, "disc_weight": 0.1, "disc_start": 1, "output_dir": str(tmp_path)})
    trainer = VQGANTrainer(config)
    first, second = trainer.train_step(0), trainer.train_step(5)
    assert "gan" not in first and {"gan", "disc"} <= set(second) and "restarted" not in second  # Gumbel: no restarts
    assert trainer.vqgan.quantize.temperature == pytest.approx(gumbel_temperature(5, 10, 0.9, 0.0625))
    with pytest.raises(ConfigError, match="unknown key"):
        make_config({"stepz": 3})
    with pytest.raises(ConfigError, match="pixel_loss"):
        make_config({"pixel_loss": "l3"})
    with pytest.raises(ConfigError, match="steps"):
        make_config({"steps": 0})
    with pytest.raises(ConfigError, match=r"field 'object_size': object_size must be \(min, max\) fractions"):
        make_config({"object_size": [0.6, 0.3]})


def test_object_pixels_weigh_more_in_the_pixel_loss():
    target = torch.full((1, 3, 4, 4), -0.5)  # a plain background ...
    target[0, 2, 1, 1] = 0.9  # ... with one blue-ish object pixel
    weights = object_weights(target, 4.0)
    assert weights.shape == (1, 1, 4, 4) and weights[0, 0, 1, 1] == 5 and (weights.sum() - 5) == 15
    reconstruction = target.clone()
    reconstruction[0, 2, 1, 1] = -0.5  # the object lost: error 1.4 on one of 48 values
    assert pixel_loss(reconstruction, target) == pytest.approx(1.4 / 48)
    assert pixel_loss(reconstruction, target, "l1", weights) == pytest.approx(1.4 * 5 / (48 * 20 / 16))
    assert pixel_loss(reconstruction, target, "l2", weights) == pytest.approx(1.96 * 5 / (48 * 20 / 16))
    with pytest.raises(ConfigError, match="object_weight"):
        make_config({"object_weight": -1})


def test_dead_codes_restart_to_encoder_outputs():
    codebook = torch.nn.Embedding(4, 2)
    before = codebook.weight.detach().clone()
    features = torch.full((1, 2, 2, 2), 7.0)
    assert restart_dead_codes(codebook, torch.tensor([1, 0, 2, 0]), features) == 2
    assert torch.equal(codebook.weight[[0, 2]], before[[0, 2]]) and (codebook.weight[[1, 3]] == 7).all()


def test_command_line_flags_and_config_file(tmp_path):
    file = tmp_path / "vq.yaml"
    file.write_text("preset: vqgan_tiny\nsteps: 7\nvqgan_overrides: {n_embed: 16}\n")
    config = parse_args(["--config", str(file), "--steps", "3", "--image-size", "32", "--betas", "[0.9, 0.99]"])
    assert (config.preset, config.steps, config.image_size, config.betas) == ("vqgan_tiny", 3, 32, (0.9, 0.99))
    assert config.vqgan_overrides == {"n_embed": 16}
    with pytest.raises(ConfigError, match="image_size 36 is not a multiple"):
        VQGANTrainer(make_config({**SMALL, "image_size": 36}))


def test_ofa_mixture_with_text_to_image_and_infill_on_demo_data(trained, tmp_path):
    """The shipped t2i config, 2 steps with a tiny OFA model and the VQGAN trained above; the exported model
    carries the VQGAN in <dir>/vqgan, so the pipeline generates without vqgan=."""
    from conftest import TINY
    from transformers import pipeline

    from ofa_ufo.training.__main__ import main

    out = tmp_path / "run"
    tiny = "{" + ", ".join(f"{k}: {v}" for k, v in TINY.items()) + "}"
    code = main(["--config", "pretrain_demo_t2i", f"vqgan={trained.output_dir}", f"output_dir={out}", "max_steps=2",
                 "batch_size=4", "eval_examples=0", "demo_train_scenes=8", "num_threads=1", "save_every=0",
                 f"model_overrides={tiny}", "tasks={caption: 1, text_to_image: 1, image_infill: 1}"])
    assert code == 0
    report = json.loads((out / "metrics.json").read_text())
    assert len(report["losses"]) == 2 and all(math.isfinite(v) for v in report["losses"])
    assert (out / "vqgan" / "config.json").is_file()
    pipe = pipeline("ofa-ufo", model=str(out))
    result = pipe(None, task="text_to_image", text="a red circle")
    assert result["image"].size == (32, 32)  # the VQGAN's resolution
