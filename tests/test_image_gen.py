"""Image generation as VQGAN code sequences (text_to_image, image_infill) on a tiny model + vqgan_tiny:
the codes-only constraint, code-slice logits, OFA's code-target decoder positions with the KV cache,
pipeline results, training batches and bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import pipeline

import ofa_ufo
from ofa_ufo.generation.codes import generate_codes, tokens_to_codes
from ofa_ufo.generation.constraints import CodeSequenceLogitsProcessor
from ofa_ufo.layers.position import code_position_ids
from ofa_ufo.metrics import get_metric
from ofa_ufo.tasks import get_task
from ofa_ufo.tasks.image_gen import CodeSamples, image_to_pixels
from ofa_ufo.training.mixture import build_batch

SIDE = 8  # vqgan_tiny: 64 px / f=8 -> 8x8 codes; infill generates the central 4x4


@pytest.fixture(scope="module")
def vqgan():
    torch.manual_seed(0)
    return ofa_ufo.create_vqgan("vqgan_tiny").eval()


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
    return pipeline("ofa-ufo", model=str(tiny_checkpoint))


@pytest.fixture(scope="module")
def photo():
    return Image.fromarray(np.random.default_rng(5).integers(0, 255, (48, 64, 3), dtype=np.uint8))


def _prompt(processor, text="a red circle"):
    batch = processor(text=[f" what is the complete image? caption: {text}"], return_tensors="pt")
    return {k: batch[k] for k in ("input_ids", "attention_mask")}


def _code_range(model, vqgan):
    return model.config.code_offset, model.config.code_offset + vqgan.config.n_embed


def test_code_constraint_allows_codes_then_forces_eos():
    proc = CodeSequenceLogitsProcessor(10, 20, count=3, eos_token_id=2)
    scores = torch.zeros(2, 30)
    for done in range(3):
        allowed = torch.isfinite(proc(torch.zeros(2, 1 + done, dtype=torch.long), scores))
        assert allowed[:, 10:20].all() and allowed.sum() == 2 * 10
    forced = proc(torch.zeros(2, 4, dtype=torch.long), torch.full((2, 30), float("-inf")))  # </s> itself -inf
    assert (forced[:, 2] == 0).all() and torch.isinf(forced).sum() == 2 * 29


def test_generation_yields_exactly_the_grid_of_code_tokens(model, processor, vqgan):
    count = SIDE * SIDE
    start, end = _code_range(model, vqgan)
    proc = CodeSequenceLogitsProcessor(start, end, count, processor.tokenizer.eos_token_id)
    torch.manual_seed(0)
    with torch.inference_mode():
        out = model.generate(**_prompt(processor), do_sample=True, top_k=256, max_new_tokens=count + 5,
                             logits_processor=[proc], code_grid=SIDE, logits_range=(start, end),
                             num_return_sequences=2)
    assert out.shape == (2, 1 + count + 1)
    assert ((out[:, 1:-1] >= start) & (out[:, 1:-1] < end)).all()
    assert (out[:, -1] == processor.tokenizer.eos_token_id).all()


def test_sliced_logits_equal_full_logits_on_the_slice(model, processor, vqgan):
    inputs = _prompt(processor)
    start, end = _code_range(model, vqgan)
    decoder_input_ids = torch.tensor([[0, start + 3, start + 7, start + 1]])
    with torch.inference_mode():
        full = model(**inputs, decoder_input_ids=decoder_input_ids, code_grid=SIDE).logits
        sliced = model(**inputs, decoder_input_ids=decoder_input_ids, code_grid=SIDE, logits_range=(start, end)).logits
    assert sliced.shape == full.shape
    torch.testing.assert_close(sliced[..., start:end], full[..., start:end], rtol=1e-5, atol=1e-5)
    assert torch.isinf(sliced[..., :start]).all() and torch.isinf(sliced[..., end:]).all()
    with pytest.raises(ValueError, match="logits_range must satisfy"):
        model(**inputs, decoder_input_ids=decoder_input_ids, logits_range=(5, 5))


def test_code_positions_follow_ofa():
    assert code_position_ids(2, 7, 42, torch.device("cpu")).tolist() == [0, 1, 2, 43, 44, 1024, 1024]
    with pytest.raises(ValueError, match="image_bucket_size=42"):
        code_position_ids(43, 3, 42, torch.device("cpu"))


def test_code_rows_use_image_positions_and_cache_matches_full_pass(model, processor):
    """Code rows differ from text rows; cached step-by-step decoding equals one full pass; in a mixed
    batch every row equals its own single-kind run."""
    inputs = _prompt(processor)
    ids = torch.tensor([[0, 8003, 8010, 8001, 8040, 8002]])
    with torch.inference_mode():
        text = model(**inputs, decoder_input_ids=ids).logits
        code = model(**inputs, decoder_input_ids=ids, code_grid=SIDE).logits
        assert not torch.allclose(text, code)
        encoded, cache, steps = model.get_encoder()(**inputs), None, []
        for t in range(ids.shape[1]):  # one encoder output: the position keys are memoised step by step
            out = model(encoder_outputs=encoded, decoder_input_ids=ids[:, t : t + 1], cache=cache, use_cache=True,
                        code_grid=SIDE)
            cache = out.cache
            steps.append(out.logits)
        torch.testing.assert_close(torch.cat(steps, 1), code, rtol=1e-4, atol=1e-4)
        assert encoded.self_position_keys[SIDE].shape[2] == ids.shape[1]
        both = {k: v.repeat(2, 1) for k, v in inputs.items()}
        mixed = model(**both, decoder_input_ids=ids.repeat(2, 1), code_grid=torch.tensor([0, SIDE])).logits
    torch.testing.assert_close(mixed[0], text[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mixed[1], code[0], rtol=1e-4, atol=1e-4)


def test_cache_and_slice_do_not_change_greedy_codes(model, processor, vqgan):
    inputs, code_range = _prompt(processor), _code_range(model, vqgan)
    runs = [generate_codes(model, inputs, code_range, 4, 2, code_slice=s, use_cache=c, do_sample=False)
            for s, c in [(True, True), (False, True), (True, False)]]
    for tokens, logprobs in runs[1:]:
        assert torch.equal(tokens, runs[0][0])
        torch.testing.assert_close(logprobs, runs[0][1], rtol=1e-4, atol=1e-3)
    assert runs[0][0].shape == (1, 1, 16) and runs[0][1].shape == (1, 1) and runs[0][1].item() < 0


def test_text_to_image_pipeline_returns_every_sample(pipe, vqgan):
    torch.manual_seed(0)
    result = pipe(None, task="text_to_image", text="a red circle", vqgan=vqgan, num_return_sequences=3)
    assert isinstance(result["image"], Image.Image) and result["image"].size == (64, 64)
    assert len(result["images"]) == len(result["logprobs"]) == 3 and result["images"][0] is result["image"]
    assert result["logprobs"] == sorted(result["logprobs"], reverse=True)
    two = pipe([None, None], task="text_to_image", text=["a red circle", "a blue square"], vqgan=vqgan,
               batch_size=2, do_sample=False)
    assert [len(r["images"]) for r in two] == [1, 1]


def test_vqgan_saved_beside_the_model_is_found(tiny_checkpoint, vqgan, tmp_path):
    import shutil

    shutil.copytree(tiny_checkpoint, tmp_path / "m")
    vqgan.save_pretrained(tmp_path / "m" / "vqgan")
    result = pipeline("ofa-ufo", model=str(tmp_path / "m"))(None, task="text_to_image", text="a dot", image_size=32)
    assert result["image"].size == (32, 32)


def test_image_infill_pastes_the_centre_into_the_image_codes(pipe, photo, vqgan, processor):
    result = pipe(photo, task="image_infill", vqgan=vqgan, num_return_sequences=2)
    assert len(result["images"]) == 2 and result["image"].size == (64, 64)
    # Generated centre = the image's own centre codes -> exactly the VQGAN reconstruction.
    codes = vqgan.encode(image_to_pixels(photo, 64, vqgan))[0]  # (8, 8)
    task = get_task("image_infill")
    tokens = (task.target_codes(codes).flatten() + processor.tokenizer.code_offset)[None]  # (1, 16)
    out = task.postprocess(CodeSamples(tokens, [0.0], vqgan, SIDE // 2), processor.tokenizer, {"image": photo})
    with torch.inference_mode():
        expected = vqgan.decode(codes[None])
    got = torch.from_numpy(np.asarray(out["image"], np.float32)).permute(2, 0, 1) / 127.5 - 1
    assert (got - expected[0]).abs().max() < 2 / 127.5  # uint8 rounding only
    pixels = task.prepare_pixels(torch.ones(1, 3, 64, 64))
    assert pixels[..., 16:48, 16:48].abs().sum() == 0 and pixels.sum() == 3 * (64 * 64 - 32 * 32)


def test_real_photo_infill(pipe, vqgan):
    pytest.importorskip("skimage")
    from ofa_ufo.data.real_photos import real_photo_examples

    (example,) = real_photo_examples("caption")[:1]
    result = pipe(example["image"], task="image_infill", vqgan=vqgan)
    assert set(result) == {"image", "images", "logprobs"}
    prediction, reference = get_task("image_infill").metric_pair(result, example)
    assert get_metric("psnr")([prediction], [reference])["psnr"] > 0
    assert get_metric("psnr")([reference], [reference])["psnr"] == 100.0


def test_bad_code_sequences_and_sizes(pipe, photo, processor, vqgan, model):
    offset = processor.tokenizer.code_offset
    with pytest.raises(ValueError, match=r"expected 64 code tokens \(8x8 grid\), got a sequence of 63"):
        tokens_to_codes(torch.full((1, 63), offset), offset, 64, 64)
    bad = torch.full((1, 64), offset)
    bad[0, 5], bad[0, 9] = 7, offset + 64
    with pytest.raises(ValueError, match=rf"token ids \[7, {offset + 64}\] are not VQGAN code tokens"):
        get_task("text_to_image").postprocess(CodeSamples(bad, [0.0], vqgan, SIDE), processor.tokenizer, {})
    with pytest.raises(ValueError, match="not a multiple of the VQGAN downsampling factor 8"):
        pipe(None, task="text_to_image", text="a dot", vqgan=vqgan, image_size=60)
    with pytest.raises(ValueError, match="multiple of 4: image_size=40 gives 5; use a multiple of 32"):
        pipe(photo, task="image_infill", vqgan=vqgan, image_size=40)
    with pytest.raises(ValueError, match=r"pass vqgan=.*<model dir>/vqgan"):
        pipe(None, task="text_to_image", text="a dot")
    with pytest.raises(ValueError, match="code count is fixed by the image size"):
        pipe(None, task="text_to_image", text="a dot", vqgan=vqgan, max_new_tokens=12)
    with pytest.raises(ValueError, match="takes no input image"):
        pipe(photo, task="text_to_image", text="a dot", vqgan=vqgan)
    assert "takes no input image" in pipe([photo], task="text_to_image", text="a dot", vqgan=vqgan)[0]["error"]
    assert "needs an input image" in pipe([None], task="image_infill", vqgan=vqgan)[0]["error"]
    big = ofa_ufo.create_vqgan("vqgan_tiny", n_embed=model.config.num_codes + 1)
    with pytest.raises(ValueError, match="codes but the model's vocabulary only"):
        pipe(None, task="text_to_image", text="a dot", vqgan=big)


def test_training_batch_mixes_code_and_text_targets(model, processor, vqgan, photo):
    examples = [
        dict(task="text_to_image", image=photo, text="a red circle"),
        dict(task="image_infill", image=photo, text=None),
        dict(task="caption", image=photo, text=None, target="a photo"),
    ]
    with pytest.raises(ValueError, match="build_batch"):
        build_batch(processor, examples, model.config)
    batch = build_batch(processor, examples, model.config, vqgan=vqgan)
    assert batch["code_grid"].tolist() == [SIDE, SIDE // 2, 0]
    assert batch["image_mask"].tolist() == [False, True, True]  # text_to_image: the image is the target
    centre = batch["pixel_values"][:, :, 16:48, 16:48].abs().sum((1, 2, 3))
    assert centre[1] == 0 and centre[2] > 0  # image_infill rows are blanked in the middle, others not
    labels, offset, eos = batch["labels"], processor.tokenizer.code_offset, processor.tokenizer.eos_token_id
    codes = vqgan.encode(image_to_pixels(photo, 64, vqgan))[0]
    assert labels[0, : SIDE * SIDE].tolist() == (codes.flatten() + offset).tolist() and labels[0, SIDE * SIDE] == eos
    assert labels[1, :16].tolist() == (codes[2:6, 2:6].flatten() + offset).tolist() and labels[1, 16] == eos
    trained = model.__class__(model.config)
    trained.load_state_dict(model.state_dict())
    loss = trained.train()(**batch).loss
    loss.backward()
    assert torch.isfinite(loss) and trained.model.decoder.code_layernorm_embedding.weight.grad.abs().sum() > 0


def test_trainer_mixes_image_generation_with_text_tasks(tmp_path, vqgan):
    from conftest import TINY

    from ofa_ufo.training import Trainer
    from ofa_ufo.training.config import config_from_dict

    vqgan.save_pretrained(tmp_path / "vqgan")
    fields = dict(model_overrides=dict(TINY), tasks={"text_to_image": 1, "image_infill": 1, "caption": 1},
                  batch_size=3, max_steps=2, eval_examples=0, demo_train_scenes=8, num_threads=1,
                  output_dir=str(tmp_path / "run"))
    trainer = Trainer(config_from_dict({**fields, "vqgan": str(tmp_path / "vqgan")}, "test"), resume="never")
    losses = [trainer.train_step() for _ in range(2)]
    assert all(np.isfinite(losses))
    without = Trainer(config_from_dict(fields, "test"), resume="never")
    with pytest.raises(ValueError, match="config field `vqgan: DIR`"):
        without.train_step()


def test_text_rows_padded_past_the_position_table_next_to_long_code_rows(processor):
    """A code target may be longer than max_position_embeddings (OFA: 1,024 codes + </s>); text rows
    padded to its length keep their logits on their real positions."""
    from conftest import tiny_model

    small = tiny_model(max_position_embeddings=16)
    inputs = {k: v.repeat(2, 1) for k, v in _prompt(processor).items()}
    text = torch.tensor([[0, 50, 60, 70, 2]])
    codes = torch.cat([torch.zeros(1, 1, dtype=torch.long), torch.full((1, 25), 8003)], 1)  # 5x5 grid
    rows = torch.cat([torch.nn.functional.pad(text, (0, 21), value=1), codes])  # (2, 26)
    with torch.inference_mode():
        alone = small(**{k: v[:1] for k, v in inputs.items()}, decoder_input_ids=text).logits
        mixed = small(**inputs, decoder_input_ids=rows, code_grid=torch.tensor([0, 5])).logits
        code_alone = small(**{k: v[:1] for k, v in inputs.items()}, decoder_input_ids=codes, code_grid=5).logits
        with pytest.raises(ValueError, match="exceeds max_position_embeddings=16"):
            small(**{k: v[:1] for k, v in inputs.items()}, decoder_input_ids=rows[:1])
    torch.testing.assert_close(mixed[0, :5], alone[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mixed[1], code_alone[0], rtol=1e-4, atol=1e-4)


def test_guidance_against_the_same_prompt_changes_nothing(model, processor, vqgan):
    """log p_u = log p_c makes the guided distribution the conditional one, whatever the scale: the
    unconditional decoder must follow generate's tokens and positions step by step (cache included)."""
    inputs, code_range = _prompt(processor), _code_range(model, vqgan)
    plain = generate_codes(model, inputs, code_range, 4, 2, do_sample=False)
    guided = generate_codes(model, inputs, code_range, 4, 2, do_sample=False, guidance_scale=3.0, unconditional=inputs)
    assert torch.equal(guided[0], plain[0])
    torch.testing.assert_close(guided[1], plain[1], rtol=1e-4, atol=1e-3)
    two = {k: v.repeat(2, 1) for k, v in inputs.items()}
    torch.manual_seed(0)
    sampled = generate_codes(model, two, code_range, 4, 2, num_return_sequences=2, do_sample=True, top_k=20)
    torch.manual_seed(0)
    sampled_guided = generate_codes(model, two, code_range, 4, 2, num_return_sequences=2, do_sample=True, top_k=20,
                                    guidance_scale=2.0, unconditional=inputs)
    assert sampled_guided[0].shape == (2, 2, 16) and torch.equal(sampled_guided[0], sampled[0])


def test_guidance_follows_the_formula(model, processor, vqgan):
    from ofa_ufo.generation.codes import CodeGuidance

    conditional, unconditional = _prompt(processor, "a red circle"), _prompt(processor, "")
    start, end = _code_range(model, vqgan)
    ids = torch.tensor([[0], [0]])  # two rows served by one unconditional encoder row
    with torch.inference_mode():
        cond = model(**conditional, decoder_input_ids=ids[:1], code_grid=SIDE).logits[:, -1].log_softmax(-1)
        uncond = model(**unconditional, decoder_input_ids=ids[:1], code_grid=SIDE).logits[:, -1].log_softmax(-1)
        scores = cond.repeat(2, 1)
        scores[:, :start] = float("-inf")  # what the code constraint leaves
        scores[:, end:] = float("-inf")
        guided = CodeGuidance(model, unconditional, 2.5, SIDE, (start, end))(ids, scores)
    uncond = uncond[0, start:end].log_softmax(-1)  # renormalised over the codes, as the conditional
    expected = uncond + 2.5 * (scores[0, start:end].log_softmax(-1) - uncond)
    torch.testing.assert_close(guided[1, start:end], expected, rtol=1e-4, atol=1e-4)
    assert torch.isinf(guided[:, :start]).all() and torch.isinf(guided[:, end:]).all()
    with pytest.raises(ValueError, match="unconditional"):
        generate_codes(model, conditional, (start, end), 4, 2, guidance_scale=2.0)
    with pytest.raises(ValueError, match="guidance_scale must be >= 0"):
        generate_codes(model, conditional, (start, end), 4, 2, guidance_scale=-1.0, unconditional=unconditional)


def test_text_to_image_pipeline_guidance_scale(pipe, vqgan):
    torch.manual_seed(0)
    plain = pipe(None, task="text_to_image", text="a red circle", vqgan=vqgan, do_sample=False)
    torch.manual_seed(0)
    same = pipe(None, task="text_to_image", text="a red circle", vqgan=vqgan, do_sample=False, guidance_scale=1.0)
    guided = pipe([None, None], task="text_to_image", text=["a red circle", "a blue star"], vqgan=vqgan,
                  batch_size=2, do_sample=False, guidance_scale=4.0)
    assert np.array_equal(np.asarray(plain["image"]), np.asarray(same["image"]))
    assert [r["image"].size for r in guided] == [(64, 64), (64, 64)]
    assert guided[0]["logprobs"] != plain["logprobs"]  # scored under the guided distribution


def test_caption_dropout_trains_the_unconditional_prompt(processor, vqgan, photo):
    from ofa_ufo.training.config import ConfigError, config_from_dict
    from ofa_ufo.training.mixture import build_sources

    prompt, target = get_task("text_to_image").build_example(dict(task="text_to_image", image=photo, text=""),
                                                           dict(vqgan=vqgan), "ofa")
    assert prompt == " what is the complete image? caption: " and target.startswith("<code_")
    with pytest.raises(ValueError, match="needs a caption"):
        get_task("text_to_image").prompt("")
    fields = dict(tasks={"text_to_image": 1, "caption": 1}, demo_train_scenes=50, caption_dropout=0.25)
    sources = build_sources(config_from_dict(fields, "test"))
    texts = [sources["text_to_image"].draw(k)["text"] for k in range(400)]
    again = [sources["text_to_image"].draw(k)["text"] for k in range(400)]
    assert texts == again  # fixed per draw: a resumed run drops the same captions
    assert 0.18 < texts.count("") / 400 < 0.32
    assert all(sources["caption"].draw(k)["target"] for k in range(20))
    with pytest.raises(ConfigError, match="caption_dropout"):
        config_from_dict({**fields, "caption_dropout": 1.0}, "test")
    with pytest.raises(ConfigError, match="no text_to_image"):
        config_from_dict({"tasks": {"caption": 1}, "caption_dropout": 0.1}, "test")


def test_tasks_know_the_vqgan_model_type_they_load_through_the_auto_class(tmp_path):
    from ofa_ufo.tasks.image_gen import VQGAN_MODEL_TYPE, resolve_vqgan

    assert VQGAN_MODEL_TYPE == ofa_ufo.VQGANConfig.model_type
    vqgan = ofa_ufo.create_vqgan("vqgan_tiny")
    vqgan.save_pretrained(tmp_path / "vqgan")
    assert type(resolve_vqgan(tmp_path / "vqgan")) is ofa_ufo.VQGANModel
    model = ofa_ufo.create_model("ofa_ufo_tiny", d_model=32, encoder_layers=1, decoder_layers=1,
                                 encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                 decoder_ffn_dim=64, image_size=64)
    with pytest.raises(ValueError, match="not a VQGANModel"):
        resolve_vqgan(model)
