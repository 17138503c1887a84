"""OFAUFOProcessor: OFA's source/target layout, image masks, truncation, save/load, box codec."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoProcessor

import ofa_ufo  # noqa: F401  (importing the package registers the Auto classes from_pretrained uses)
from ofa_ufo.core.box_codec import BoxCodec
from ofa_ufo.hf.image_processing import OFAUFOImageProcessor
from ofa_ufo.hf.processing import OFAUFOProcessor
from ofa_ufo.hf.tokenization import build_tokenizer

PROMPTS = [" what does the image describe?", ' which region does the text " the small red circle " describe?']
SIZE = 32


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def processor(tokenizer):
    return OFAUFOProcessor(OFAUFOImageProcessor(size=SIZE), tokenizer)


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)


def test_batched_prompts_are_right_padded(processor, tokenizer, image):
    out = processor(images=[image, image], text=PROMPTS)
    rows = [tokenizer(p)["input_ids"] for p in PROMPTS]
    assert all(r[0] == tokenizer.bos_token_id and r[-1] == tokenizer.eos_token_id for r in rows)
    longest = max(len(r) for r in rows)
    assert out["input_ids"].shape == out["attention_mask"].shape == (2, longest)
    assert out["input_ids"].dtype == torch.int64
    for i, row in enumerate(rows):
        assert out["input_ids"][i, : len(row)].tolist() == row
        assert out["input_ids"][i, len(row) :].eq(tokenizer.pad_token_id).all()
        assert out["attention_mask"][i].sum() == len(row) and out["attention_mask"][i, : len(row)].all()
    assert out["pixel_values"].shape == (2, 3, SIZE, SIZE) and out["pixel_values"].dtype == torch.float32
    assert out["image_mask"].tolist() == [True, True]
    assert "labels" not in out and "original_sizes" not in out


def test_samples_without_an_image(processor, image):
    out = processor(images=[None, image], text=PROMPTS)
    assert out["image_mask"].dtype == torch.bool and out["image_mask"].tolist() == [False, True]
    assert out["pixel_values"][0].eq(0).all() and not out["pixel_values"][1].eq(0).all()
    text_only = processor(text=PROMPTS)
    assert text_only["image_mask"].tolist() == [False, False]
    assert text_only["pixel_values"].shape == (2, 3, SIZE, SIZE) and text_only["pixel_values"].eq(0).all()


def test_single_inputs_and_image_only(processor, image):
    out = processor(images=image, text=PROMPTS[0])
    assert out["input_ids"].shape[0] == 1 and out["image_mask"].tolist() == [True]
    images_only = processor(images=[image, image])
    assert set(images_only) == {"pixel_values", "image_mask"}
    np_out = processor(images=image, text=PROMPTS[0], return_tensors="np")
    assert isinstance(np_out["input_ids"], np.ndarray)


@pytest.mark.parametrize("images", [[None, "image"], ["image", "image"], None])
def test_only_model_inputs_unless_original_sizes_are_asked_for(processor, image, images):
    """By default the keys are exactly what the model takes, so `model.generate(**inputs)` works;
    box post-processing asks for the original sizes, (0, 0) where a sample has no image."""
    images = None if images is None else [image if entry == "image" else None for entry in images]
    out = processor(images=images, text=PROMPTS)
    assert sorted(out) == sorted(processor.model_input_names)
    sized = processor(images=images, text=PROMPTS, return_original_sizes=True)
    expected = [[0, 0] if images is None or entry is None else [30, 20] for entry in images or [None, None]]
    assert sized["original_sizes"].tolist() == expected and sized["original_sizes"].dtype == torch.int64
    assert all(torch.equal(sized[key], out[key]) for key in out)


def test_labels(processor, tokenizer, image):
    targets = [" a red circle on a white background", "<bin_1> <bin_2> <bin_3> <bin_4>"]
    out = processor(images=[image, image], text=PROMPTS, text_target=targets)
    first = tokenizer(targets[0], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    bins = [tokenizer.bin_offset + k for k in (1, 2, 3, 4)] + [tokenizer.eos_token_id]
    assert out["labels"].shape == (2, len(first))
    assert out["labels"][0].tolist() == first
    assert out["labels"][1].tolist() == bins + [-100] * (len(first) - len(bins))


def test_truncation_warns_and_keeps_eos(processor, tokenizer, image):
    full = tokenizer(PROMPTS[1])["input_ids"]
    with pytest.warns(UserWarning, match=rf"prompt 1 has {len(full)} tokens.*truncated by {len(full) - 8} tokens"):
        out = processor(images=[image, image], text=PROMPTS, max_length=8)
    assert out["input_ids"].shape == (2, 8)
    assert out["input_ids"][1].tolist() == full[:7] + [tokenizer.eos_token_id]
    target = " one two three four five six seven eight nine"
    with pytest.warns(UserWarning, match="target 0 has 10 tokens") as record:
        out = processor(text=PROMPTS[0], text_target=target, max_length=8)
    assert len(record) == 1  # the 8-token prompt itself fits
    assert out["labels"][0].tolist() == tokenizer(target, add_special_tokens=False)["input_ids"][:7] + [2]


def test_default_max_length_is_the_tokenizer_limit(image):
    tokenizer = build_tokenizer()
    tokenizer.model_max_length = 6
    processor = OFAUFOProcessor(OFAUFOImageProcessor(size=SIZE), tokenizer)
    with pytest.warns(UserWarning, match="prompt 0 .* max_length=6"):
        assert processor(images=image, text=PROMPTS[1])["input_ids"].shape == (1, 6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(images=[None], text=PROMPTS), "got 1 images for 2 prompts"),
        (dict(images=np.zeros((4, 4, 3), np.uint8), text=PROMPTS), "got 1 images for 2 prompts"),
        (dict(text=PROMPTS, text_target=[" a"]), "got 1 targets for 2 samples"),
        (dict(), "at least one of"),
        (dict(text=[]), "empty batch"),
    ],
)
def test_input_errors(processor, kwargs, match):
    with pytest.raises(ValueError, match=match):
        processor(**kwargs)


def test_constructor_checks(tokenizer):
    with pytest.raises(ValueError, match="mode must be"):
        OFAUFOProcessor(OFAUFOImageProcessor(), tokenizer, box_mode="pixels")
    with pytest.raises(TypeError, match="needs an OFAUFOTokenizer"):
        OFAUFOProcessor(OFAUFOImageProcessor(), object())


def test_box_codec_per_mode(tokenizer):
    assert OFAUFOProcessor(OFAUFOImageProcessor(), tokenizer).box_codec == BoxCodec(1000, "normalized", 512)
    ofa = OFAUFOProcessor(OFAUFOImageProcessor(), tokenizer, box_mode="ofa", max_image_size=480)
    assert ofa.box_codec == BoxCodec(num_bins=tokenizer.num_bins, mode="ofa", max_image_size=480)


def test_decode_passes_through(processor, tokenizer):
    ids = processor(text=PROMPTS)["input_ids"]
    assert processor.batch_decode(ids, skip_special_tokens=True) == PROMPTS
    assert processor.decode(ids[0], skip_special_tokens=True) == PROMPTS[0]
    assert processor.model_input_names == ["input_ids", "attention_mask", "pixel_values", "image_mask"]


@pytest.mark.parametrize("load", [OFAUFOProcessor.from_pretrained, AutoProcessor.from_pretrained])
def test_save_load_round_trip(tmp_path, tokenizer, image, load):
    processor = OFAUFOProcessor(OFAUFOImageProcessor(size=SIZE), tokenizer, box_mode="ofa", max_image_size=480)
    processor.save_pretrained(tmp_path)
    loaded = load(tmp_path)
    assert type(loaded) is OFAUFOProcessor
    assert loaded.box_codec == processor.box_codec
    assert loaded.image_processor.to_dict() == processor.image_processor.to_dict()
    kwargs = dict(images=[image, None], text=PROMPTS, text_target=[" yes", "<bin_5> <bin_6> <bin_7> <bin_8>"])
    expected, got = processor(**kwargs), loaded(**kwargs)
    assert set(got) == set(expected)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
