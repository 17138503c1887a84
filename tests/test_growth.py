"""Growing a trained small model into a larger preset (`ofa_ufo.models.growth`, the `grow_from` field)
and the blind baseline (`eval_blind`, `ofa_ufo.evaluate --blind`).

The grown model's expected outputs are the small model's own outputs on the same inputs: growth must
not change what the model computes, only how many units compute it."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY, tiny_model
from PIL import Image

import ofa_ufo
from ofa_ufo.core.images import BLIND_GREY, blind_examples
from ofa_ufo.models.growth import GrowthError, grow_model
from ofa_ufo.training.config import ConfigError, load_config
from ofa_ufo.training.model_setup import grow_heads
from ofa_ufo.training.trainer import Trainer

SMALL = {**TINY, "encoder_attention_heads": 2, "decoder_attention_heads": 2}  # d 32, 2 layers, heads of 16
LARGE = {**SMALL, "d_model": 96, "encoder_layers": 3, "decoder_layers": 4, "encoder_attention_heads": 6,
         "decoder_attention_heads": 6, "encoder_ffn_dim": 192, "decoder_ffn_dim": 192}  # 3x wide, deeper


def trained_looking(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Move every norm and BatchNorm statistic off its init (1 / 0), so that a growth that lost a scale
    or a shift shows in the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point() and ("norm" in name or "bn" in name or "c_attn" in name):
                noise = torch.randn(tensor.shape, generator=generator) * 0.2
                tensor.copy_(tensor.abs() + noise.abs() if "running_var" in name else tensor + noise)
    return model


def large_model(**overrides) -> ofa_ufo.OFAUFOForConditionalGeneration:
    torch.manual_seed(5)
    return ofa_ufo.create_model("ofa_ufo_base", **{**LARGE, **overrides}).eval()


def inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(4, 8000, (3, 6), generator=generator),
            "pixel_values": torch.randn(3, 3, 64, 64, generator=generator),
            "decoder_input_ids": torch.randint(4, 8000, (3, 5), generator=generator)}


def test_grown_model_computes_the_small_models_logits():
    small = trained_looking(tiny_model(**SMALL))  # resnet50 stem
    large = grow_model(small, large_model())  # resnet101: stage 3 has 17 more blocks
    batch = inputs()
    with torch.no_grad():
        expected = small(**batch).logits
        got = large(**batch).logits
    assert got.shape == expected.shape == (3, 5, small.config.vocab_size)
    assert expected.std() > 0.02  # outputs that differ by position and token, not a constant
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_grown_model_generates_the_small_models_answer(processor):
    small = trained_looking(tiny_model(**SMALL))
    large = grow_model(small, large_model())
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    batch = processor(images=image, text="what color is the circle?", return_tensors="pt")
    kwargs = dict(max_new_tokens=6, num_beams=3, do_sample=False)
    with torch.no_grad():
        expected = small.generate(**batch, **kwargs)
        got = large.generate(**batch, **kwargs)
    assert got.tolist() == expected.tolist()


def test_copies_of_a_unit_get_different_weights_so_training_can_separate_them():
    small = tiny_model(**SMALL)
    large = grow_model(small, large_model())
    weight = large.model.encoder.layers[0].fc1.weight  # (192, 96): rows and columns tiled 3 x from (64, 32)
    source = small.model.encoder.layers[0].fc1.weight
    copies = weight[:64].reshape(64, 3, 32)  # the three input copies of each small column, output copy 0
    assert not torch.allclose(copies[:, 0], copies[:, 1])
    torch.testing.assert_close(copies.sum(1), source)  # the shares of a split weight sum to the small weight
    torch.testing.assert_close(large.model.encoder.layers[0].fc1.bias, source.new_tensor(
        small.model.encoder.layers[0].fc1.bias.tolist() * 3))
    one_step = torch.optim.SGD(large.parameters(), lr=0.1)
    large.train()
    large(**inputs(), labels=inputs(1)["decoder_input_ids"]).loss.backward()
    one_step.step()
    rows = large.model.encoder.layers[0].fc1.weight
    assert not torch.allclose(rows[:64], rows[64:128])  # the output copies of a unit moved apart


def test_added_layers_and_blocks_start_as_identity():
    small = tiny_model(**SMALL)
    large = grow_model(small, large_model())
    added = large.model.decoder.layers[3]
    assert added.fc2.weight.abs().sum() == 0 and added.cross_attn_mid_layer_norm.weight.abs().sum() == 0
    block = large.model.encoder.embed_images.layer3[10]
    assert block.bn3.weight.abs().sum() == 0 and block.bn3.bias.abs().sum() == 0
    kept = large.model.encoder.embed_images.layer3[5].conv2.weight
    torch.testing.assert_close(kept, small.model.encoder.embed_images.layer3[5].conv2.weight)


@pytest.mark.parametrize("overrides, field", [
    ({"d_model": 80, "encoder_attention_heads": 5, "decoder_attention_heads": 5, "encoder_ffn_dim": 160,
      "decoder_ffn_dim": 160}, "d_model 80"),
    ({"encoder_attention_heads": 4}, "encoder_attention_heads 4"),
    ({"decoder_ffn_dim": 128}, "decoder_ffn_dim 128"),
    ({"encoder_layers": 1}, "encoder_layers 1"),
    ({"image_size": 96}, "image_size differs"),
])
def test_growth_that_cannot_preserve_the_function_names_the_field(overrides, field):
    with pytest.raises(GrowthError, match=field):
        grow_model(tiny_model(**SMALL), large_model(**overrides))


def test_smaller_resnet_stage_is_refused():
    with pytest.raises(GrowthError, match="ResNet blocks per stage"):
        grow_model(tiny_model(**SMALL, vision_config={"resnet_type": "resnet101"}),
                   large_model(vision_config={"resnet_type": "resnet50"}))


# precision=fp32: growth preserves the function exactly in fp32; where `auto` picks bf16 (a CPU with AVX512-BF16 or
# AMX), the trainer's bf16 autocast would round the small and the grown model differently
QUICK = ["max_steps=1", "eval_examples=2", "num_threads=1", "show_photos=false", "batch_size=4",
         "tasks={caption: 1.0, vqa: 1.0}", "data_workers=0", "precision=fp32"]


def small_config_file(tmp_path) -> str:
    path = tmp_path / "small.yaml"
    width = ", ".join(f"{k}: {v}" for k, v in SMALL.items())
    path.write_text(f"model: ofa_ufo_tiny\nmodel_overrides: {{{width}}}\ntasks: {{caption: 1.0, vqa: 1.0}}\n"
                    f"batch_size: 4\nmax_steps: 1\neval_examples: 2\nnum_threads: 1\nshow_photos: false\n"
                    f"precision: fp32\noutput_dir: {tmp_path / 'small'}\n")
    return str(path)


def large_overrides() -> str:
    return "model_overrides={" + ", ".join(f"{k}: {v}" for k, v in LARGE.items()) + "}"


def test_grow_from_a_config_trains_it_first_then_starts_from_it(tmp_path, capsys):
    config = load_config("pretrain_demo_base", [*QUICK, large_overrides(), f"grow_from={small_config_file(tmp_path)}",
                                                "grow_overrides=[max_steps=2]", "eval_blind=true",
                                                f"output_dir={tmp_path / 'large'}"])
    Trainer(config, resume="never").fit()
    out = capsys.readouterr().out
    assert "training ofa_ufo_tiny first" in out
    small_report = json.loads((tmp_path / "small" / "metrics.json").read_text())
    assert small_report["steps"] == 2  # grow_overrides reached the small run
    report = json.loads((tmp_path / "large" / "metrics.json").read_text())
    assert report["grown_from"]["model"] == str(tmp_path / "small") and report["grown_from"]["width_factor"] == 3
    # the large run's first evaluation is of the small model's function: same held-out answers, same metrics
    assert report["metrics_untrained"] == small_report["metrics_trained"]
    start_signal = report["eval"][0]["image_signal"]
    assert start_signal == pytest.approx(small_report["eval"][-1]["image_signal"], abs=1e-4)
    assert set(report["metrics_blind"]) == {"caption", "vqa"}
    assert "| start (grown 3x from small) | trained | trained, blind (constant image) |" in out
    saved = json.loads((tmp_path / "large" / "config.json").read_text())
    assert (saved["d_model"], saved["vision_config"]["resnet_type"]) == (96, "resnet101")


def test_grow_from_reuses_a_finished_small_run(tmp_path, capsys):
    small = tiny_model(**SMALL)
    small_dir = tmp_path / "small"
    small.save_pretrained(small_dir)
    (small_dir / "metrics.json").write_text(json.dumps({"metrics_trained": {"caption": {"cider": 0.5}}}))
    config = load_config("pretrain_demo_base", [*QUICK, large_overrides(), f"grow_from={small_config_file(tmp_path)}",
                                                f"output_dir={tmp_path / 'large'}", "max_steps=1"])
    trainer = Trainer(config, resume="never")
    assert "growing ofa_ufo_base from the finished run in" in capsys.readouterr().out
    assert trainer.history["grown_from"]["metrics"] == {"caption": {"cider": 0.5}}
    batch = inputs()
    with torch.no_grad():
        torch.testing.assert_close(trainer.unwrapped.eval()(**batch).logits, small(**batch).logits,
                                   atol=1e-5, rtol=1e-4)


def test_grow_from_a_model_that_cannot_grow_is_a_config_error(tmp_path):
    small_dir = tmp_path / "odd"
    tiny_model(**{**SMALL, "d_model": 40, "encoder_ffn_dim": 80, "decoder_ffn_dim": 80}).save_pretrained(small_dir)
    config = load_config("pretrain_demo_base", [*QUICK, large_overrides(), f"grow_from={small_dir}",
                                                f"output_dir={tmp_path / 'large'}"])
    with pytest.raises(ConfigError, match=r"field 'grow_from': .*odd \(40 wide\) cannot grow into ofa_ufo_base: "
                                          r"d_model 96 is not a whole multiple"):
        Trainer(config, resume="never")


def test_grow_from_into_a_saved_model_is_a_config_error(tmp_path, tiny_checkpoint):
    config = load_config("pretrain_demo_base", [*QUICK, f"model={tiny_checkpoint}", f"grow_from={tiny_checkpoint}",
                                                f"output_dir={tmp_path / 'large'}"])
    with pytest.raises(ConfigError, match=r"grows into a preset built from scratch, but model .* is a saved model"):
        Trainer(config, resume="never")


@pytest.mark.parametrize("overrides, message", [
    (["grow_from=x", "stem_warmup_images=10"], "'grow_from' and 'stem_warmup_images' exclude each other"),
    (["grow_overrides=[max_steps=2]"], "'grow_overrides' changes the grow_from run, but grow_from is empty"),
])
def test_growth_fields_that_contradict_each_other_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("pretrain_demo_tiny", ["stem_warmup_images=0", *overrides])


def test_blind_examples_keep_the_size_and_replace_every_pixel(tmp_path):
    photo = Image.new("RGB", (40, 30), (10, 200, 30))
    photo.putpixel((3, 4), (255, 255, 255))
    path = tmp_path / "photo.png"
    photo.save(path)
    examples = [{"id": "a", "image": photo, "question": "q"}, {"id": "b", "image": str(path)},
                {"id": "c", "image": str(tmp_path / "missing.png")}, {"id": "d", "image": None}]
    blind = blind_examples(examples)
    for example in blind[:2]:
        assert example["image"].size == (40, 30)
        assert set(example["image"].getdata()) == {BLIND_GREY}
    assert blind[0]["question"] == "q"
    assert blind[2]["image"] == str(tmp_path / "missing.png")  # unreadable: kept, so it fails where scored
    assert blind[3]["image"] is None
    assert examples[0]["image"] is photo  # the originals are untouched


def test_the_box_mask_head_grows_with_the_encoder_it_reads():
    torch.manual_seed(0)
    small_head, large_head = torch.nn.Linear(32, 1), torch.nn.Linear(96, 1)
    state = {"box_head": small_head.state_dict()}  # its key in a trainer state
    grown = grow_heads(torch.nn.ModuleDict({"grounding": large_head}), state, seed=0)
    assert grown == ["grounding"]
    states = torch.randn(5, 32)
    with torch.no_grad():
        torch.testing.assert_close(large_head(torch.cat([states] * 3, 1)), small_head(states))  # tiled encoder states
    fresh = torch.nn.Linear(96, 1)
    before = fresh.weight.clone()
    assert grow_heads(torch.nn.ModuleDict({"grounding": fresh}), {}, seed=0) == []  # no saved head: starts fresh
    assert torch.equal(fresh.weight, before)
